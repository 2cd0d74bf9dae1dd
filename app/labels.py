"""Class labels: index -> (synset or id, human-readable name)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

from app.errors import ModelConfigError


@dataclass(frozen=True)
class LabelSet:
    ids: tuple[str, ...]  # synsets for ImageNet, or whatever ids the labels file gives
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def index_of(self, label: str | int) -> int | None:
        """Accept a class index (int or digits) or an id/synset; None when unknown."""
        if isinstance(label, int) or (isinstance(label, str) and label.strip().isdigit()):
            idx = int(label)
            return idx if 0 <= idx < len(self.ids) else None
        return self._positions.get(str(label).strip())

    @cached_property
    def _positions(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.ids)}


@lru_cache(maxsize=1)
def imagenet_1k() -> LabelSet:
    """ImageNet-1k synsets in sorted order (class 0 = n01440764) with their descriptions."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    ids = tuple(info.label_names())
    names = tuple(info.index_to_description(i) for i in range(len(ids)))
    return LabelSet(ids, names)


def generic(num_classes: int) -> LabelSet:
    ids = tuple(str(i) for i in range(num_classes))
    return LabelSet(ids, ids)


def load_labels(spec: str, num_classes: int, folder: Path | None) -> LabelSet:
    """``imagenet-1k``, ``none`` (class indices) or a file of ``id name`` lines in the folder."""
    if spec == "imagenet-1k":
        labels = imagenet_1k()
    elif spec == "none":
        labels = generic(num_classes)
    else:
        path = (folder / spec) if folder else Path(spec)
        try:
            lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        except OSError as exc:
            raise ModelConfigError(f"labels file {path}: {exc}") from exc
        pairs = [ln.split(maxsplit=1) for ln in lines]
        labels = LabelSet(tuple(p[0] for p in pairs), tuple(p[-1] for p in pairs))
    if len(labels) != num_classes:
        raise ModelConfigError(f"labels {spec!r} has {len(labels)} classes, model {num_classes}")
    return labels
