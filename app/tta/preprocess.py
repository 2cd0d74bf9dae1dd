"""Decode once, resize once, normalise once; views are then slices of one tensor."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import ImageTooLargeError, InvalidImageError
from app.model_config import ModelConfig
from app.options import DecodeLimits
from app.tta.views import View

# Formats a browser or camera produces; anything else (SVG, PDF, EPS, ...) is refused.
ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF"})
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass
class PreparedImage:
    """The one normalised tensor every view of this image is cut from.

    Kept height x width x channels: a stack of views cut from it is already in the
    channels_last layout the network runs fastest in, so no view is copied twice.
    """

    hwc: torch.Tensor  # [H, W, 3] float32, normalised, on the model's device
    original_size: tuple[int, int]  # (width, height) after EXIF orientation
    format: str

    @property
    def resized_size(self) -> tuple[int, int]:
        return int(self.hwc.shape[1]), int(self.hwc.shape[0])

    @property
    def chw(self) -> torch.Tensor:
        """[3, H, W] view of the same memory."""
        return self.hwc.permute(2, 0, 1)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB. 16-bit and float modes are rescaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


class DecodedImage(NamedTuple):
    image: Image.Image  # upright RGB
    format: str
    original_size: tuple[int, int]  # (width, height) upright, before any reduced-size decode


def _draft_size(width: int, height: int, min_side: int) -> tuple[int, int] | None:
    """The size to ask a JPEG's reduced-scale (DCT) decoder for, so that the shorter side
    stays at least ``min_side``; None when no 1/2, 1/4 or 1/8 scale could apply."""
    if min_side <= 0 or min(width, height) < 2 * min_side:
        return None
    k = min_side / min(width, height)
    return max(1, int(width * k + 0.999)), max(1, int(height * k + 0.999))


def decode_image(data: bytes, limits: DecodeLimits, draft_min_side: int = 0) -> DecodedImage:
    """Bytes -> upright RGB PIL image, or a domain error saying what is wrong.

    ``draft_min_side``: a JPEG at least twice that on its shorter side is decoded at a
    reduced scale (1/2, 1/4 or 1/8, libjpeg's DCT scaling) that keeps the shorter side at
    least that long (bench/jpeg_draft.py: 3000 px photos prepared about 3x faster)."""
    if not data:
        raise InvalidImageError("empty image: no bytes received")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as exc:
            raise InvalidImageError(
                "not a recognised image (expected JPEG, PNG, GIF, WebP, BMP or TIFF)"
            ) from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLargeError(f"image has too many pixels: {exc}") from exc
        except Exception as exc:  # PIL parses hostile bytes: any failure means unreadable
            raise InvalidImageError(f"cannot read image header: {exc}") from exc
        if img.format not in ALLOWED_FORMATS:
            raise InvalidImageError(f"image format {img.format} is not accepted")
        width, height = img.size
        if width < 1 or height < 1:
            raise InvalidImageError(f"image has zero size ({width}x{height})")
        if width * height > limits.max_pixels:
            raise ImageTooLargeError(
                f"image is {width}x{height} = {width * height} pixels; "
                f"the limit is {limits.max_pixels}"
            )
        ratio = max(width, height) / min(width, height)
        if ratio > limits.max_aspect_ratio:
            raise InvalidImageError(
                f"image is {width}x{height}, aspect ratio {ratio:.1f} > "
                f"{limits.max_aspect_ratio:g}; crop it before classifying"
            )
        try:
            img.seek(0)  # animated GIF/WebP: the first frame
            image_format = str(img.format)
            draft = _draft_size(width, height, draft_min_side)
            if draft is not None and image_format in ("JPEG", "MPO"):
                img.draft("RGB", draft)
            img.load()
            decoded_size = img.size
            upright = ImageOps.exif_transpose(img) or img
            turned = upright.size != decoded_size  # a 90-degree EXIF orientation
            original = (height, width) if turned else (width, height)
            return DecodedImage(_to_rgb(upright), image_format, original)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLargeError(f"image has too many pixels: {exc}") from exc
        except Exception as exc:  # OSError, EOFError, ... and TypeError seen from TIFF fuzzing
            raise InvalidImageError(f"cannot decode image (truncated or corrupt?): {exc}") from exc


def resized_shape(width: int, height: int, shorter: int) -> tuple[int, int]:
    """Shorter side to ``shorter``, aspect kept; truncation as torchvision's Resize(int)."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def prepare_image(
    img: Image.Image,
    cfg: ModelConfig,
    device: torch.device,
    image_format: str = "",
    original_size: tuple[int, int] | None = None,
) -> PreparedImage:
    """Resize once with the model's interpolation, then normalise once on ``device``.
    ``original_size``: the image's size before a reduced-scale decode, for view boxes."""
    w, h = img.size
    new_w, new_h = resized_shape(w, h, cfg.resize_size)
    resized = img.resize((new_w, new_h), _RESAMPLE[cfg.interpolation])
    mean = np.asarray(cfg.mean, dtype=np.float32) * 255.0
    std = np.asarray(cfg.std, dtype=np.float32) * 255.0
    if device.type == "cpu":
        # numpy, not torch: torch ops here would start a second OpenMP team in this worker
        # thread, whose spinning threads steal the cores from the forward pass
        pixels = np.asarray(resized, dtype=np.float32)  # [H, W, 3], a fresh array
        pixels -= mean
        pixels /= std
        hwc = torch.from_numpy(pixels)
    else:  # upload bytes, normalise on the device
        raw = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy())
        on_device = raw.to(device, non_blocking=True).float()
        hwc = (on_device - torch.from_numpy(mean).to(device)) / torch.from_numpy(std).to(device)
    return PreparedImage(hwc=hwc, original_size=original_size or (w, h), format=image_format)


def cut_views(image: PreparedImage, views: list[View]) -> torch.Tensor:
    """Stack the views on the batch dimension: slices of the one tensor, flipped where asked.

    Returns [N, 3, S, S] in channels_last memory (one copy per view, numpy on the CPU).
    """
    t = image.hwc
    if t.device.type == "cpu":
        a = t.numpy()
        crops = [a[v.y : v.y + v.size, v.x : v.x + v.size] for v in views]
        flipped = [c[:, ::-1] if v.flip else c for c, v in zip(crops, views, strict=True)]
        batch = torch.from_numpy(np.stack(flipped))
    else:
        gpu = [t[v.y : v.y + v.size, v.x : v.x + v.size] for v in views]
        batch = torch.stack([c.flip(1) if v.flip else c for c, v in zip(gpu, views, strict=True)])
    return batch.permute(0, 3, 1, 2)
