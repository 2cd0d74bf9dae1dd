"""Image folders for offline jobs: labelled ImageFolders, unlabelled folders, FixRes transforms.

Transforms reuse the serving path (decode_image, prepare_image, plan_views, cut_views), so
the "test DA" crop a job trains on is exactly the center crop the server classifies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from app.errors import DataError, InvalidRequestError, MidserveError
from app.labels import LabelSet
from app.model_config import ModelConfig
from app.tta.preprocess import _RESAMPLE, DecodeLimits, decode_image, prepare_image
from app.tta.views import View, parse_view_spec, plan_views

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
Augment = Literal["test", "test2", "train", "center"]
AUGMENTS = ("test", "test2", "train")
ClassOrder = Literal["ids", "sorted"]
# FixRes "test DA2": light colour jitter (brightness, contrast, saturation factors).
DA2_JITTER = 0.1
# Training DA as in the FixRes paper's initial training (torchvision's ImageNet recipe).
TRAIN_JITTER = 0.4


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # -1 for unlabelled images


def _images_under(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _check_folder(root: Path, what: str) -> None:
    if not root.exists():
        raise DataError(f"{what} folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{what} folder {root} is not a folder")


def scan_image_folder(
    root: Path, labels: LabelSet, class_order: ClassOrder = "ids", what: str = "data"
) -> list[Sample]:
    """Labelled images from ``root/<class>/**/<image>``.

    ``ids``: folder names are the model's label ids (ImageNet synsets such as n01440764, or
    the ids of the model's labels file), mapped to the model's class order.
    ``sorted``: torchvision's ImageFolder convention; the i-th folder in sorted order is
    class i, so there must be exactly as many folders as the model has classes.
    """
    _check_folder(root, what)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        loose = _images_under(root)
        if loose:
            raise DataError(
                f"{what} folder {root} holds {len(loose)} images but no class folders; labelled "
                "data needs one folder per class (root/<class>/<image>)"
            )
        raise DataError(f"{what} folder {root} is empty: no class folders, no images")
    if class_order == "sorted":
        if len(class_dirs) != len(labels):
            raise DataError(
                f"{what} folder {root} has {len(class_dirs)} class folders; with class order "
                f"'sorted' it needs exactly one per model class ({len(labels)})"
            )
        mapping = {d: i for i, d in enumerate(class_dirs)}
    else:
        found = {d: labels.index_of(d.name) for d in class_dirs}
        unknown = sorted(d.name for d, i in found.items() if i is None)
        if unknown:
            example = ", ".join(labels.ids[:3])
            raise DataError(
                f"{what} folder {root}: {len(unknown)} class folder(s) do not match the model's "
                f"classes: {', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}; "
                f"folder names must be label ids such as {example} (or use class order 'sorted')"
            )
        mapping = {d: int(i) for d, i in found.items() if i is not None}
    samples = [Sample(p, mapping[d]) for d in class_dirs for p in _images_under(d)]
    if not samples:
        raise DataError(f"{what} folder {root} has class folders but no image files in them")
    return samples


def scan_unlabelled(root: Path, what: str = "data") -> list[Sample]:
    """Every image under ``root`` (any depth); enough for label-free BN recalibration."""
    _check_folder(root, what)
    samples = [Sample(p, -1) for p in _images_under(root)]
    if not samples:
        raise DataError(f"{what} folder {root} has no image files ({', '.join(IMAGE_SUFFIXES)})")
    return samples


def _jitter(img: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    from PIL import ImageEnhance

    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(float(rng.uniform(1.0 - strength, 1.0 + strength)))
    return img


def _random_resized_box(
    w: int, h: int, rng: np.random.Generator, scale: tuple[float, float] = (0.08, 1.0)
) -> tuple[int, int, int, int]:
    """Inception-style random area/aspect box (left, top, width, height), as RandomResizedCrop."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        bw = int(round(np.sqrt(target * ratio)))
        bh = int(round(np.sqrt(target / ratio)))
        if 0 < bw <= w and 0 < bh <= h:
            return int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1)), bw, bh
    side = min(w, h)
    return (w - side) // 2, (h - side) // 2, side, side


class FixResTransform:
    """One decoded image -> one normalised crop [3, S, S] at the model's input size.

    test    resize (shorter side = resize_size) + center crop (FixRes "test DA")
    test2   resize + random horizontal shift of the center crop + flip + light jitter ("DA2")
    train   random-resized crop + flip + colour jitter (the usual training DA)
    center  test without randomness (evaluation)
    """

    def __init__(self, cfg: ModelConfig, augment: Augment) -> None:
        if augment not in (*AUGMENTS, "center"):
            raise InvalidRequestError(f"augment must be one of {', '.join(AUGMENTS)}")
        self.cfg = cfg
        self.augment = augment
        self.cpu = torch.device("cpu")

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        size = self.cfg.input_size
        if self.augment == "train":
            left, top, bw, bh = _random_resized_box(img.width, img.height, rng)
            img = img.crop((left, top, left + bw, top + bh))
            img = _jitter(img, TRAIN_JITTER, rng)
            img = img.resize((size, size), _RESAMPLE[self.cfg.interpolation])
            tensor = prepare_image(img, self.cfg.with_changes(crop_pct=1.0), self.cpu).tensor
            return tensor.flip(-1) if rng.random() < 0.5 else tensor
        if self.augment == "test2":
            img = _jitter(img, DA2_JITTER, rng)
        image = prepare_image(img, self.cfg, self.cpu)
        w, h = image.resized_size
        view = plan_views(parse_view_spec("center"), w, h, size, 0)[0]
        if self.augment == "test2":
            x = int(rng.integers(0, w - size + 1))
            view = View("da2", x, view.y, size, bool(rng.random() < 0.5))
        crop = image.tensor[:, view.y : view.y + size, view.x : view.x + size]
        return (crop.flip(-1) if view.flip else crop).contiguous()


class ImageDataset(Dataset):
    """Decodes with the serving limits; an unreadable image yields None (skipped, counted)."""

    def __init__(
        self,
        samples: list[Sample],
        transform: FixResTransform,
        seed: int = 0,
        limits: DecodeLimits | None = None,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.limits = limits or DecodeLimits()

    def set_epoch(self, epoch: int) -> None:
        """Random augmentation depends on (seed, epoch, index) only: any process count agrees."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        sample = self.samples[index]
        try:
            img, _ = decode_image(sample.path.read_bytes(), self.limits)
            rng = np.random.default_rng((self.seed, self.epoch, index))
            return self.transform(img, rng), sample.label
        except (OSError, MidserveError):
            return None


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    skipped: int


def collate(items: list[tuple[torch.Tensor, int] | None]) -> Batch:
    """Stack the readable images; count the unreadable ones instead of failing."""
    good = [it for it in items if it is not None]
    skipped = len(items) - len(good)
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    images = torch.stack([it[0] for it in good])
    labels = torch.tensor([it[1] for it in good], dtype=torch.long)
    return Batch(images, labels, skipped)
