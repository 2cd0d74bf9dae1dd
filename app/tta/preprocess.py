"""Decode once, resize once per resolution, normalise once; views are slices of those tensors."""

from __future__ import annotations

import io
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import ImageTooLargeError, InvalidImageError
from app.tta.limits import DecodeLimits
from app.tta.views import View, resized_shape

# Formats a browser or camera produces; anything else (SVG, PDF, EPS, ...) is refused.
ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF"})
RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


class Preprocessing(Protocol):
    """What preprocessing needs of a model: the shorter side of its single resize, its
    interpolation and its normalisation (``app.model_config.ModelConfig`` has them; tta
    does not import it, being the layer below)."""

    @property
    def resize_size(self) -> int: ...

    @property
    def interpolation(self) -> str: ...

    @property
    def mean(self) -> tuple[float, float, float]: ...

    @property
    def std(self) -> tuple[float, float, float]: ...


@dataclass(frozen=True)
class Normaliser:
    """Resize with the model's interpolation, then normalise with its mean and std."""

    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device

    @classmethod
    def for_model(cls, cfg: Preprocessing, device: torch.device) -> Normaliser:
        return cls(cfg.interpolation, cfg.mean, cfg.std, device)

    def __call__(self, img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
        """[H, W, 3] float32 of ``img`` resized to ``size`` (width, height), on the device."""
        resized = img if img.size == size else img.resize(size, RESAMPLE[self.interpolation])
        mean = np.asarray(self.mean, dtype=np.float32) * 255.0
        std = np.asarray(self.std, dtype=np.float32) * 255.0
        if self.device.type == "cpu":
            # numpy, not torch: torch ops here would start a second OpenMP team in this
            # worker thread, whose spinning threads steal the cores from the forward pass
            pixels = np.asarray(resized, dtype=np.float32)  # [H, W, 3], a fresh array
            pixels -= mean
            pixels /= std
            return torch.from_numpy(pixels)
        raw = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy())  # upload bytes
        on_device = raw.to(self.device, non_blocking=True).float()
        return (on_device - torch.from_numpy(mean).to(self.device)) / torch.from_numpy(std).to(
            self.device
        )


@dataclass
class PreparedImage:
    """The normalised tensors views are cut from: one per resolution the views ask for,
    each made once, on first use.

    Kept height x width x channels: a stack of views cut from it is already in the
    channels_last layout the network runs fastest in, so no view is copied twice.
    """

    original_size: tuple[int, int]  # (width, height) after EXIF orientation
    format: str
    resized_size: tuple[int, int]  # the model's own scale: shorter side = its resize size
    source: Image.Image | None = None  # the decoded image, for other resolutions
    normalise: Normaliser | None = None
    scaled: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_tensor(
        cls, hwc: torch.Tensor, original_size: tuple[int, int], image_format: str = ""
    ) -> PreparedImage:
        size = (int(hwc.shape[1]), int(hwc.shape[0]))
        return cls(original_size, image_format, size, scaled={size: hwc})

    def at(self, resized: tuple[int, int]) -> torch.Tensor:
        """[H, W, 3] of the image resized to ``resized`` (width, height)."""
        if resized not in self.scaled:
            if self.source is None or self.normalise is None:
                raise ValueError(f"no source image to resize to {resized}")
            self.scaled[resized] = self.normalise(self.source, resized)
        return self.scaled[resized]

    @property
    def decoded_size(self) -> tuple[int, int]:
        """(width, height) of the pixels views are planned on: the decoded image's."""
        return self.source.size if self.source is not None else self.resized_size

    @property
    def hwc(self) -> torch.Tensor:
        return self.at(self.resized_size)

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
    least that long (studies/jpeg_draft.py: 3000 px photos prepared about 3x faster)."""
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


def prepare_image(
    img: Image.Image,
    cfg: Preprocessing,
    device: torch.device,
    image_format: str = "",
    original_size: tuple[int, int] | None = None,
) -> PreparedImage:
    """The image ready for views at any resolution; tensors are made on first use, with
    the model's interpolation and normalisation, on ``device``. ``original_size``: the
    image's size before a reduced-scale decode, for view boxes."""
    w, h = img.size
    return PreparedImage(
        original_size=original_size or (w, h),
        format=image_format,
        resized_size=resized_shape(w, h, cfg.resize_size),
        source=img,
        normalise=Normaliser.for_model(cfg, device),
    )


def _cut(image: PreparedImage, views: list[View]) -> torch.Tensor:
    """[N, 3, H, W] channels_last: views of one shape, slices of their resized tensors
    (one copy per view), flipped where asked."""
    if image.at(views[0].resized).device.type == "cpu":  # numpy: no torch op off the forward
        arrays = []
        for v in views:
            a = image.at(v.resized).numpy()[v.y : v.y + v.height, v.x : v.x + v.width]
            arrays.append(a[:, ::-1] if v.flip else a)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    tensors = []
    for v in views:
        c = image.at(v.resized)[v.y : v.y + v.height, v.x : v.x + v.width]
        tensors.append(c.flip(1) if v.flip else c)
    return torch.stack(tensors).permute(0, 3, 1, 2)


def cut_views(image: PreparedImage, views: list[View]) -> torch.Tensor:
    """Views of one shape stacked on the batch dimension: [N, 3, H, W], channels_last."""
    if len({v.shape for v in views}) > 1:
        raise ValueError("views of several shapes: use cut_view_groups")
    return _cut(image, views)


@dataclass
class ViewGroup:
    """The views of one shape: their positions in the plan and their stacked tensor."""

    indices: list[int]
    batch: torch.Tensor  # [n, 3, H, W], channels_last


def cut_view_groups(image: PreparedImage, views: list[View]) -> list[ViewGroup]:
    """Views grouped by shape (a forward runs one shape), in order of first appearance."""
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, v in enumerate(views):
        by_shape[v.shape].append(i)
    return [ViewGroup(idx, _cut(image, [views[i] for i in idx])) for idx in by_shape.values()]
