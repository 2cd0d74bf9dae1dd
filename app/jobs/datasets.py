"""Labelled image folders for offline evaluation, read into one list of (file, class index).

Layouts, detected in this order:

``imagefolder``  one sub-folder per class, named by the class id (an ImageNet synset such
                 as ``n01440764``) or by the class index (``0`` ... ``999``).
``labels-file``  a flat folder plus a labels file in the ILSVRC2012 val formats:
                 ``val.txt`` style lines ``ILSVRC2012_val_00000001.JPEG 65`` (class index or
                 synset after the file name), or ``LOC_val_solution.csv``
                 (``ImageId,PredictionString``, the synset is the first token). Given with
                 ``labels_file`` or found in the folder under one of ``LABEL_FILE_NAMES``.
``prefix``       a flat folder whose file names start with the class id and an underscore
                 (``n01440764_tench.JPEG``), as in shared/data/imagenet-samples.

Labels that are not classes of the model raise DataError naming them; files without a
label are left out and counted. Images that cannot be decoded are skipped (and counted) by
the evaluation, not here: this module never opens an image.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import DataError
from app.labels import LabelSet

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif"}
)
LABEL_FILE_NAMES = ("LOC_val_solution.csv", "val.txt", "val_labels.txt", "labels.txt")
_PREFIX_RE = re.compile(r"^([^_]+)_")


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    target: int  # class index in the model's label set


@dataclass
class LabelledFolder:
    """Every labelled image of a folder, in a stable (sorted) order."""

    root: Path
    layout: str
    items: list[LabelledImage]
    unlabelled: list[str] = field(default_factory=list)  # files left out: no label found

    def __len__(self) -> int:
        return len(self.items)


def _is_image(path: Path) -> bool:
    return (
        path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
    )


def _resolve(labels: LabelSet, raw: str, where: str, unknown: dict[str, str]) -> int | None:
    idx = labels.index_of(raw)
    if idx is None:
        unknown.setdefault(raw, where)
    return idx


def _raise_unknown(unknown: dict[str, str], labels: LabelSet, what: str) -> None:
    if not unknown:
        return
    shown = ", ".join(f"{k!r} ({v})" for k, v in list(unknown.items())[:8])
    example = ", ".join(labels.ids[:3])
    raise DataError(
        f"{len(unknown)} {what} are not classes of the model ({len(labels)} classes, "
        f"ids like {example}, or indices 0..{len(labels) - 1}): {shown}"
    )


def _read_imagefolder(root: Path, labels: LabelSet) -> LabelledFolder:
    items: list[LabelledImage] = []
    unknown: dict[str, str] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.iterdir() if _is_image(p))
        if not files:
            continue
        target = _resolve(labels, folder.name, f"folder {folder.name}/", unknown)
        if target is not None:
            items.extend(LabelledImage(p, target) for p in files)
    _raise_unknown(unknown, labels, "folder names")
    return LabelledFolder(root, "imagefolder", items)


def _read_label_lines(path: Path) -> dict[str, str]:
    """File name -> raw label, from a val.txt style file or LOC_val_solution.csv."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read labels file {path}: {exc}") from exc
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"labels file {path} is empty")
    if lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        out: dict[str, str] = {}
        for row in csv.reader(lines[1:]):
            if len(row) >= 2 and row[1].split():
                out[row[0].strip()] = row[1].split()[0]
        return out
    if all(ln.isdigit() for ln in lines[:50]):
        raise DataError(
            f"{path} holds bare numbers (the devkit's ILSVRC2012_validation_ground_truth.txt): "
            "those are devkit ILSVRC2012_IDs, not class indices; give a val.txt "
            "('<file> <class index or synset>' lines) or LOC_val_solution.csv instead"
        )
    out = {}
    for n, ln in enumerate(lines, 1):
        parts = ln.replace(",", " ").split()
        if len(parts) < 2:
            raise DataError(f"{path}:{n}: expected '<file name> <label>', got {ln!r}")
        out[parts[0]] = parts[1]
    return out


def _read_with_labels_file(root: Path, labels_file: Path, labels: LabelSet) -> LabelledFolder:
    raw = _read_label_lines(labels_file)
    files = sorted(p for p in root.iterdir() if _is_image(p))
    by_name = {p.name: p for p in files}
    by_stem = {p.stem: p for p in files}
    items: list[LabelledImage] = []
    unknown: dict[str, str] = {}
    seen: set[Path] = set()
    for name, label in sorted(raw.items()):
        path = by_name.get(name) or by_stem.get(name) or by_stem.get(Path(name).stem)
        if path is None:
            continue  # listed but absent: a subset of the split is fine
        target = _resolve(labels, label, name, unknown)
        if target is not None:
            items.append(LabelledImage(path, target))
            seen.add(path)
    _raise_unknown(unknown, labels, f"labels in {labels_file.name}")
    unlabelled = [p.name for p in files if p not in seen]
    items.sort(key=lambda it: it.path.name)
    return LabelledFolder(root, "labels-file", items, unlabelled)


def _read_prefixed(root: Path, files: list[Path], labels: LabelSet) -> LabelledFolder:
    items: list[LabelledImage] = []
    unknown: dict[str, str] = {}
    unlabelled: list[str] = []
    for p in files:
        m = _PREFIX_RE.match(p.name)
        if not m:
            unlabelled.append(p.name)
            continue
        target = _resolve(labels, m.group(1), p.name, unknown)
        if target is not None:
            items.append(LabelledImage(p, target))
    _raise_unknown(unknown, labels, "file-name prefixes")
    return LabelledFolder(root, "prefix", items, unlabelled)


def read_labelled_folder(
    root: Path, labels: LabelSet, labels_file: Path | None = None
) -> LabelledFolder:
    """Detect the layout of ``root`` and list its labelled images (see the module doc)."""
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    if labels_file is not None:
        if not labels_file.is_file():
            raise DataError(f"labels file {labels_file} does not exist")
        found = _read_with_labels_file(root, labels_file, labels)
    elif any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        found = _read_imagefolder(root, labels)
    else:
        candidates = [root / n for n in LABEL_FILE_NAMES if (root / n).is_file()]
        if candidates:
            found = _read_with_labels_file(root, candidates[0], labels)
        else:
            files = sorted(p for p in root.iterdir() if _is_image(p))
            if not files:
                raise DataError(f"no images in {root}")
            found = _read_prefixed(root, files, labels)
    if not found.items:
        extra = f" ({len(found.unlabelled)} images without a label)" if found.unlabelled else ""
        raise DataError(f"no labelled images in {root} (layout {found.layout}){extra}")
    return found
