"""Decode once, resize once per resolution (only the box the views cover); views are slices
of those uint8 pixels, normalised inside the forward."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from app.tta.decode import Picture
from app.tta.views import View, resized_shape

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) in pixels of a resized image

RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
# torch's antialiased uint8 resize uses PIL's filters (bicubic a = -0.5, the same support):
# PIL's pixels within rounding (tests/unit/test_preprocess.py); no "nearest" matches PIL's.
TORCH_ANTIALIASED = frozenset({"bicubic", "bilinear"})

Source = Image.Image | torch.Tensor  # a decoded image: PIL, or [H, W, 3] uint8 pixels


def picture_size(picture: Picture) -> tuple[int, int]:
    """(width, height) of a decoded picture either way it is held."""
    if isinstance(picture, np.ndarray):
        return int(picture.shape[1]), int(picture.shape[0])
    return picture.size


def source_size(source: Source) -> tuple[int, int]:
    """(width, height) of a decoded image either way it is held."""
    if isinstance(source, torch.Tensor):
        return int(source.shape[1]), int(source.shape[0])
    return source.size


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
class Resizer:
    """Resizes with the model's interpolation into the pixels views are cut from.

    ``uint8`` (served): the image is held as uint8 pixels and resized whole by torch's
    antialiased resize (PIL's filters, its values within rounding, on the calling
    thread only: no OpenMP team; 0.3 ms for a 500 x 375 photo where PIL takes 1.5, and
    0.9 for just a center crop's box), kept as uint8 and normalised by the engine inside
    the forward (4x fewer bytes cut and copied, no float pass on the host). A model with
    "nearest" interpolation keeps PIL, resizing only the box the views cover when the
    image is shrunk (PIL's ``box`` reads the pixels around it, so the values are those of
    the whole-image resize).
    Otherwise (fine-tuning, and the older served path that ``midserve bench`` compares
    against): the whole image by PIL, normalised to float32 here, on ``device``."""

    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device
    uint8: bool = True

    @classmethod
    def for_model(cls, cfg: Preprocessing, device: torch.device, uint8: bool = True) -> Resizer:
        return cls(cfg.interpolation, cfg.mean, cfg.std, device, uint8)

    @property
    def on_pixels(self) -> bool:
        """Whether it resizes uint8 pixels with torch (the decoded image is held as those)."""
        return self.uint8 and self.interpolation in TORCH_ANTIALIASED

    def resizes_boxes(self, source: tuple[int, int], size: tuple[int, int]) -> bool:
        """Whether a box can be resized alone, its values those of the whole-image resize:
        PIL's box, and only when both sides shrink (enlarging, it differs by a few levels)."""
        return self.uint8 and not self.on_pixels and source[0] >= size[0] and source[1] >= size[1]

    def source(self, img: Picture) -> Source:
        """The decoded image as this resizer reads it (PIL's: one copy, then it can go;
        libjpeg-turbo's pixels: no copy)."""
        if isinstance(img, np.ndarray):
            return torch.from_numpy(img) if self.on_pixels else Image.fromarray(img)
        return torch.from_numpy(np.array(img, dtype=np.uint8)) if self.on_pixels else img

    def __call__(self, img: Source, size: tuple[int, int], box: Box) -> torch.Tensor:
        """[h, w, 3] of ``box`` (x0, y0, x1, y1) of ``img`` resized to ``size`` (width, height)."""
        x0, y0, x1, y1 = box
        if isinstance(img, torch.Tensor):
            # channels_last with unambiguous strides: unsqueeze after the permute gives
            # the batch a stride of 3, which torch reads as planes, and it then resizes
            # by its slower planar kernel and returns planes, each view's cut a strided
            # gather (0.50 + 0.26 ms against 0.31 + 0.01 for a 500 x 376 photo's center
            # crop on AVX2; the same values)
            chw = img.unsqueeze(0).permute(0, 3, 1, 2)
            if source_size(img) != size:
                chw = torch.nn.functional.interpolate(
                    chw, size=(size[1], size[0]), mode=self.interpolation, antialias=True
                )
            # HWC rows as a view, not a copy: views are cut from it by one stacking copy
            # each (``_cut``), which leaves them channels_last
            return chw[0].permute(1, 2, 0)[y0:y1, x0:x1]
        if img.size == size:
            resized = img.crop(box) if box != (0, 0, *size) else img
        else:
            kx, ky = img.width / size[0], img.height / size[1]
            source = (x0 * kx, y0 * ky, x1 * kx, y1 * ky)
            resized = img.resize((x1 - x0, y1 - y0), RESAMPLE[self.interpolation], box=source)
        if self.uint8:
            return torch.from_numpy(np.array(resized, dtype=np.uint8))  # [h, w, 3], writable
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


def normalise(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [N, 3, H, W] -> the network's float32 input, layout kept; ``mean`` and
    ``std`` on the 0-255 scale, shaped to broadcast."""
    return pixels.float().sub_(mean).div_(std)


@dataclass
class Resized:
    """The image resized to one size, as far as views have needed it: the pixels of the box
    whose top-left corner is (x0, y0) in the resized image."""

    pixels: torch.Tensor  # [h, w, 3]
    x0: int = 0
    y0: int = 0

    @property
    def box(self) -> Box:
        h, w = int(self.pixels.shape[0]), int(self.pixels.shape[1])
        return self.x0, self.y0, self.x0 + w, self.y0 + h

    def covers(self, box: Box) -> bool:
        a = self.box
        return a[0] <= box[0] and a[1] <= box[1] and box[2] <= a[2] and box[3] <= a[3]


def union(boxes: list[Box]) -> Box:
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


@dataclass
class PreparedImage:
    """The resized pixels views are cut from: per resolution the views ask for, made on
    first use, covering the views asked for so far (a later stage's views that reach
    further resize a larger box, once).

    Kept height x width x channels: a stack of views cut from it is already in the
    channels_last layout the network runs fastest in, so no view is copied twice.
    """

    original_size: tuple[int, int]  # (width, height) after EXIF orientation
    format: str
    resized_size: tuple[int, int]  # the model's own scale: shorter side = its resize size
    source: Source | None = None  # the decoded image, for other resolutions
    resize: Resizer | None = None
    scaled: dict[tuple[int, int], Resized] = field(default_factory=dict)

    @classmethod
    def from_tensor(
        cls, hwc: torch.Tensor, original_size: tuple[int, int], image_format: str = ""
    ) -> PreparedImage:
        size = (int(hwc.shape[1]), int(hwc.shape[0]))
        return cls(original_size, image_format, size, scaled={size: Resized(hwc)})

    def region(self, resized: tuple[int, int], boxes: list[Box]) -> Resized:
        """The image resized to ``resized`` (width, height), at least over ``boxes``."""
        have = self.scaled.get(resized)
        need = union(boxes)
        if have is not None and have.covers(need):
            return have
        if self.source is None or self.resize is None:
            raise ValueError(f"no source image to resize to {resized}")
        if have is not None:
            need = union([need, have.box])
        if not self.resize.resizes_boxes(source_size(self.source), resized):
            need = (0, 0, *resized)
        x0, y0 = need[0], need[1]
        self.scaled[resized] = Resized(self.resize(self.source, resized, need), x0, y0)
        return self.scaled[resized]

    def at(self, resized: tuple[int, int]) -> torch.Tensor:
        """[H, W, 3] of the whole image resized to ``resized`` (width, height)."""
        return self.region(resized, [(0, 0, *resized)]).pixels

    @property
    def decoded_size(self) -> tuple[int, int]:
        """(width, height) of the pixels views are planned on: the decoded image's."""
        return source_size(self.source) if self.source is not None else self.resized_size

    @property
    def hwc(self) -> torch.Tensor:
        return self.at(self.resized_size)

    @property
    def chw(self) -> torch.Tensor:
        """[3, H, W] view of the same memory."""
        return self.hwc.permute(2, 0, 1)


def prepare_image(
    img: Picture,
    cfg: Preprocessing,
    device: torch.device,
    image_format: str = "",
    original_size: tuple[int, int] | None = None,
    uint8: bool = True,
) -> PreparedImage:
    """The image ready for views at any resolution; tensors are made on first use, with
    the model's interpolation (and, unless ``uint8``, its normalisation, on ``device``).
    ``original_size``: the image's size before a reduced-scale decode, for view boxes."""
    w, h = picture_size(img)
    resize = Resizer.for_model(cfg, device, uint8)
    return PreparedImage(
        original_size=original_size or (w, h),
        format=image_format,
        resized_size=resized_shape(w, h, cfg.resize_size),
        source=resize.source(img),
        resize=resize,
    )


def _cut(views: list[View], by_size: dict[tuple[int, int], Resized]) -> torch.Tensor:
    """[N, 3, H, W] channels_last: views of one shape, slices of their resized pixels
    (``by_size``, one copy per view), flipped where asked."""
    regions = [by_size[v.resized] for v in views]
    if regions[0].pixels.device.type == "cpu":  # numpy: no torch op off the forward
        first = views[0]
        # filled view by view: C order whatever the resized pixels' strides (np.stack
        # would keep a planar source's layout), so the batch is channels_last
        dtype = regions[0].pixels.numpy().dtype  # uint8, or the older path's float32
        out = np.empty((len(views), first.height, first.width, 3), dtype=dtype)
        for i, (v, r) in enumerate(zip(views, regions, strict=True)):
            x, y = v.x - r.x0, v.y - r.y0
            a = r.pixels.numpy()[y : y + v.height, x : x + v.width]
            out[i] = a[:, ::-1] if v.flip else a
        return torch.from_numpy(out).permute(0, 3, 1, 2)
    tensors = []
    for v, r in zip(views, regions, strict=True):
        x, y = v.x - r.x0, v.y - r.y0
        c = r.pixels[y : y + v.height, x : x + v.width]
        tensors.append(c.flip(1) if v.flip else c)
    return torch.stack(tensors).permute(0, 3, 1, 2)


def view_box(v: View) -> Box:
    return v.x, v.y, v.x + v.width, v.y + v.height


def resize_regions(image: PreparedImage, views: list[View]) -> dict[tuple[int, int], Resized]:
    """One resize per resolution, covering all of ``views`` at once."""
    boxes: dict[tuple[int, int], list[Box]] = defaultdict(list)
    for v in views:
        boxes[v.resized].append(view_box(v))
    return {size: image.region(size, b) for size, b in boxes.items()}


def cut_views(image: PreparedImage, views: list[View]) -> torch.Tensor:
    """Views of one shape stacked on the batch dimension: [N, 3, H, W], channels_last."""
    if len({v.shape for v in views}) > 1:
        raise ValueError("views of several shapes: use cut_view_groups")
    return _cut(views, resize_regions(image, views))


@dataclass
class ViewGroup:
    """The views of one shape: their positions in the plan and their stacked tensor."""

    indices: list[int]
    batch: torch.Tensor  # [n, 3, H, W], channels_last


def cut_view_groups(image: PreparedImage, views: list[View]) -> list[ViewGroup]:
    """Views grouped by shape (a forward runs one shape), in order of first appearance."""
    regions = resize_regions(image, views)  # every resolution's box before any group is cut
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, v in enumerate(views):
        by_shape[v.shape].append(i)
    return [ViewGroup(idx, _cut([views[i] for i in idx], regions)) for idx in by_shape.values()]
