"""Image folders for offline jobs (evaluate, finetune), read into lists of (file, class index).

Labelled layouts, detected in this order by ``read_labelled_folder``:

``imagefolder``  one sub-folder per class, images at any depth below it. With class order
                 ``ids`` (the default) a folder is named by the class id (an ImageNet synset
                 such as ``n01440764``, or an id of the model's labels file) or by the class
                 index (``0`` ... ``999``). With class order ``sorted`` (torchvision's
                 ImageFolder convention) the i-th folder in sorted order is class i.
``labels-file``  a flat folder plus a labels file in the ILSVRC2012 val formats:
                 ``val.txt`` style lines ``ILSVRC2012_val_00000001.JPEG 65`` (class index or
                 synset after the file name), or ``LOC_val_solution.csv``
                 (``ImageId,PredictionString``, the synset is the first token), or a
                 ``file,synset[,index]`` CSV (shared/data/imagenet-compatible-500). Given with
                 ``labels_file`` or found in the folder under one of ``LABEL_FILE_NAMES``.
``prefix``       a flat folder whose file names start with the class id and an underscore
                 (``n01440764_tench.JPEG``), as in shared/data/imagenet-samples.

Labels that are not classes of the model raise DataError naming them; files without a
label are left out and counted. ``scan_unlabelled`` lists every image of a folder, for
label-free work (batch-norm recalibration). Images that cannot be decoded are skipped (and
counted) by the jobs, not here: this module never opens an image.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from app.errors import DataError, InvalidRequestError
from app.labels import LabelSet

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif"}
)
LABEL_FILE_NAMES = (
    "LOC_val_solution.csv", "val.txt", "val_labels.txt", "labels.txt", "labels.csv",
)  # fmt: skip
ClassOrder = Literal["ids", "sorted"]
CLASS_ORDERS: tuple[ClassOrder, ...] = ("ids", "sorted")
_PREFIX_RE = re.compile(r"^([^_]+)_")
_SHOWN = 10  # unknown labels named in an error


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    target: int  # class index in the model's label set; -1 for unlabelled images


@dataclass
class LabelledFolder:
    """Every labelled image of a folder, in a stable (sorted) order."""

    root: Path
    layout: str
    items: list[LabelledImage]
    unlabelled: list[str] = field(default_factory=list)  # files left out: no label found

    def __len__(self) -> int:
        return len(self.items)


def is_image(path: Path) -> bool:
    """An image file by its suffix; hidden files are not."""
    return (
        path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()
    )


def images_in(folder: Path) -> list[Path]:
    """The images directly in ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if is_image(p))


def images_under(folder: Path) -> list[Path]:
    """The images at any depth below ``folder``, sorted; hidden files and folders are skipped."""
    return sorted(
        p
        for p in folder.rglob("*")
        if is_image(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _check_folder(root: Path, what: str) -> None:
    if not root.exists():
        raise DataError(f"{what} folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{what} folder {root} is not a folder")


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _resolve(labels: LabelSet, raw: str, where: str, unknown: dict[str, str]) -> int | None:
    idx = labels.index_of(raw)
    if idx is None:
        unknown.setdefault(raw, where)
    return idx


def _raise_unknown(
    unknown: dict[str, str], labels: LabelSet, what: str, where: str, hint: str = ""
) -> None:
    if not unknown:
        return
    shown = ", ".join(f"{k} ({v})" for k, v in list(unknown.items())[:_SHOWN])
    more = " ..." if len(unknown) > _SHOWN else ""
    example = ", ".join(labels.ids[:3])
    raise DataError(
        f"{where}: {len(unknown)} {what} are not classes of the model ({len(labels)} classes, "
        f"ids like {example}, or indices 0..{len(labels) - 1}); those that do not match the "
        f"model's classes: {shown}{more}{hint}"
    )


def _read_imagefolder(
    root: Path, class_dirs: list[Path], labels: LabelSet, class_order: ClassOrder, what: str
) -> LabelledFolder:
    if class_order == "sorted":
        if len(class_dirs) != len(labels):
            raise DataError(
                f"{what} folder {root} has {len(class_dirs)} class folders; with class order "
                f"'sorted' it needs exactly one per model class ({len(labels)})"
            )
        targets: dict[Path, int | None] = {d: i for i, d in enumerate(class_dirs)}
    else:
        targets = {}
    items: list[LabelledImage] = []
    unknown: dict[str, str] = {}
    for folder in class_dirs:
        files = images_under(folder)
        if not files:
            continue  # an empty folder adds nothing, whatever its name
        if class_order == "sorted":
            target = targets[folder]
        else:
            target = _resolve(labels, folder.name, f"folder '{folder.name}'", unknown)
        if target is not None:
            items.extend(LabelledImage(p, target) for p in files)
    _raise_unknown(
        unknown,
        labels,
        "folder names",
        f"{what} folder {root}",
        "; or use class order 'sorted' (the i-th folder is class i)",
    )
    if not items:
        raise DataError(f"{what} folder {root} has class folders but no images in them")
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


def _read_with_labels_file(
    root: Path, labels_file: Path, labels: LabelSet, what: str
) -> LabelledFolder:
    raw = _read_label_lines(labels_file)
    files = images_in(root)
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
    _raise_unknown(unknown, labels, f"labels in {labels_file.name}", f"{what} folder {root}")
    unlabelled = [p.name for p in files if p not in seen]
    items.sort(key=lambda it: it.path.name)
    return LabelledFolder(root, "labels-file", items, unlabelled)


def _read_prefixed(root: Path, files: list[Path], labels: LabelSet, what: str) -> LabelledFolder:
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
    _raise_unknown(unknown, labels, "file-name prefixes", f"{what} folder {root}")
    return LabelledFolder(root, "prefix", items, unlabelled)


def read_labelled_folder(
    root: Path,
    labels: LabelSet,
    labels_file: Path | None = None,
    class_order: ClassOrder = "ids",
    what: str = "data",
) -> LabelledFolder:
    """Detect the layout of ``root`` and list its labelled images (see the module doc).

    ``what`` names the folder in error messages (``data``, ``val``).
    """
    if class_order not in CLASS_ORDERS:
        raise InvalidRequestError(
            f"class order must be one of {', '.join(CLASS_ORDERS)}, not {class_order!r}"
        )
    _check_folder(root, what)
    if labels_file is not None:
        if not labels_file.is_file():
            raise DataError(f"labels file {labels_file} does not exist")
        if class_order == "sorted":
            raise InvalidRequestError(
                "class order 'sorted' numbers class folders; it does not apply to a labels file"
            )
    class_dirs = _class_dirs(root) if labels_file is None else []
    if class_dirs:
        return _read_imagefolder(root, class_dirs, labels, class_order, what)
    if class_order == "sorted":
        raise DataError(
            f"{what} folder {root} has no class folders; class order 'sorted' numbers the "
            "class folders (root/<class>/<image>)"
        )
    if labels_file is None:
        candidates = [root / n for n in LABEL_FILE_NAMES if (root / n).is_file()]
        labels_file = candidates[0] if candidates else None
    if labels_file is not None:
        found = _read_with_labels_file(root, labels_file, labels, what)
    else:
        files = images_in(root)
        if not files:
            raise DataError(f"{what} folder {root} is empty: no class folders, no images")
        found = _read_prefixed(root, files, labels, what)
    if not found.items:
        extra = f" ({len(found.unlabelled)} images without a label)" if found.unlabelled else ""
        raise DataError(
            f"no labelled images in {what} folder {root} (layout {found.layout}){extra}; "
            "labelled data needs one folder per class (root/<class>/<image>), a labels file "
            f"({', '.join(LABEL_FILE_NAMES)}) or file names that start with the class id "
            "(<class>_<name>)"
        )
    return found


def scan_unlabelled(root: Path, what: str = "data") -> list[LabelledImage]:
    """Every image under ``root`` (any depth), target -1; enough for BN recalibration."""
    _check_folder(root, what)
    items = [LabelledImage(p, -1) for p in images_under(root)]
    if not items:
        raise DataError(
            f"{what} folder {root} has no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return items
