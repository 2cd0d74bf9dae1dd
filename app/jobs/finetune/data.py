"""FixRes transforms and the torch Dataset that decodes the images of app.jobs.datasets.

Transforms reuse the serving path (decode_image, prepare_image, plan_views, cut_views), so
the "test DA" crop a job trains on is exactly the center crop the server classifies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch.utils.data import Dataset

from app.errors import InvalidRequestError, MidserveError
from app.jobs.datasets import LabelledImage
from app.jobs.finetune.options import AUGMENTS, Augment
from app.model_config import ModelConfig
from app.runtime.plan import DecodeLimits
from app.tta.decode import decode_image
from app.tta.preprocess import RESAMPLE, cut_views, prepare_image
from app.tta.views import View, parse_view_spec, plan_views

# FixRes "test DA2": light colour jitter (brightness, contrast, saturation factors).
DA2_JITTER = 0.1
# Training DA as in the FixRes paper's initial training (torchvision's ImageNet recipe).
TRAIN_JITTER = 0.4


def _jitter(img: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
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
            img = img.resize((size, size), RESAMPLE[self.cfg.interpolation])
            tensor = prepare_image(
                img, self.cfg.with_changes(crop_pct=1.0), self.cpu, uint8=False
            ).chw
            return (tensor.flip(-1) if rng.random() < 0.5 else tensor).contiguous()
        if self.augment == "test2":
            img = _jitter(img, DA2_JITTER, rng)
        image = prepare_image(img, self.cfg, self.cpu, uint8=False)  # float32 for training
        w, h = image.resized_size
        view = plan_views(parse_view_spec("center"), w, h, size, 0)[0]
        if self.augment == "test2":
            x = int(rng.integers(0, w - size + 1))
            view = View("da2", x, view.y, size, size, bool(rng.random() < 0.5), (w, h))
        return cut_views(image, [view])[0].contiguous()


class ImageDataset(Dataset):
    """Decodes with the serving limits; an unreadable image yields None (skipped, counted)."""

    def __init__(
        self,
        samples: list[LabelledImage],
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
            img = decode_image(sample.path.read_bytes(), self.limits).image
            rng = np.random.default_rng((self.seed, self.epoch, index))
            return self.transform(img, rng), sample.target
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
