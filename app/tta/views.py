"""View plans: which regions of the image to classify, at which resolution, mirrored or not.

A view is a region of the uploaded image, a flip, and an output size. Kinds:
  center   the single central crop (what timm's eval transform takes)
  fixed    the 5 AlexNet crops, in order: center, top-left, top-right, bottom-left, bottom-right
  mfixed   the same 5, mirrored
  random   crops at uniformly random positions inside the resized image
  mrandom  independent random positions, mirrored
  full     the whole image, shorter side S, aspect kept (long side rounded to the network's
           stride so shapes recur and batch together); the FixRes lesson: let the network
           see the whole object, at a test resolution above the training one
  mfull    the same, mirrored
Crop kinds take their crops of side S from the image resized to floor(S / crop_pct) (the
model's own preprocessing, scaled); S defaults to the model's input size, and for the full
kinds to its resize size. ``kind@S`` asks for another S (multi-scale TTA).
A spec is an ordered mix such as ``fixed:5,mfixed:5,random:10`` or ``center,full@288,mfull@288``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from app.errors import InvalidRequestError

KINDS = ("center", "fixed", "mfixed", "random", "mrandom", "full", "mfull")
CROP_KINDS = ("center", "fixed", "mfixed", "random", "mrandom")
MAX_PER_KIND = {"center": 1, "fixed": 5, "mfixed": 5, "full": 1, "mfull": 1}
MAX_SPEC_LENGTH = 200
MIN_VIEW_SIZE, MAX_VIEW_SIZE = 16, 2048  # ``@S`` outside this range is refused at parse time
# what full views round their long side to when the network's stride is not known: the
# total stride of ResNets and EfficientNets (app.repository.LoadedModel.stride)
DEFAULT_STRIDE = 32


def split_kind(token: str) -> tuple[str, int]:
    """``"full@288"`` -> ``("full", 288)``; ``"fixed"`` -> ``("fixed", 0)`` (the default S)."""
    kind, _, size = token.partition("@")
    return kind, int(size) if size else 0


def resize_for(crop: int, crop_pct: float) -> int:
    """The shorter side a crop of side ``crop`` is taken from: timm's eval convention
    floor(crop / crop_pct), never below the crop itself."""
    return max(crop, math.floor(crop / crop_pct))


@dataclass(frozen=True)
class ViewGeometry:
    """The model's view sizes: crop side, crop_pct (crop side / resized shorter side), the
    default resize for full views, and the stride long sides are rounded to."""

    input_size: int
    crop_pct: float
    resize_size: int
    stride: int = DEFAULT_STRIDE

    def shorter_side(self, token: str) -> int:
        """The shorter side of the resized image a view kind is taken from."""
        kind, size = split_kind(token)
        if kind in ("full", "mfull"):
            return size or self.resize_size
        return resize_for(size, self.crop_pct) if size else self.resize_size

    def largest_resize(self, spec: ViewSpec) -> int:
        """The largest shorter side any of ``spec``'s views is resized to (``auto``: the
        model's resize, the scale its crop mixes are cut at)."""
        return max([self.resize_size, *(self.shorter_side(t) for t, _ in spec.parts)])


@dataclass(frozen=True)
class ViewSpec:
    """An ordered, validated mix of view kinds and counts, or the adaptive ``auto`` policy
    (``adaptive=True``, no parts: resolved per image by app.tta.adaptive.resolve_spec).
    A part's kind may carry a size: ``("full@288", 1)``."""

    parts: tuple[tuple[str, int], ...]
    adaptive: bool = False

    @property
    def total(self) -> int:
        return sum(n for _, n in self.parts)

    @property
    def has_random(self) -> bool:
        return any(split_kind(kind)[0] in ("random", "mrandom") for kind, _ in self.parts)

    def __str__(self) -> str:
        if self.adaptive:
            return "auto"
        return ",".join(f"{kind}:{n}" for kind, n in self.parts)


AUTO_SPEC = ViewSpec((), adaptive=True)


@dataclass(frozen=True)
class View:
    """A box of a resized copy of the image, mirrored or not: the resized copy's size
    (``resized``, width x height) sets the resolution, the box the region and output size."""

    kind: str
    x: int
    y: int
    width: int
    height: int
    flip: bool
    resized: tuple[int, int]

    @property
    def size(self) -> int:
        """The side of a square crop."""
        return self.width

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the view tensor: views of one shape share a forward."""
        return self.height, self.width


def parse_view_spec(text: str) -> ViewSpec:
    """Parse ``kind:count[,kind:count...]`` (a bare ``kind`` means count 1) or ``auto``."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequestError("views spec is empty; expected e.g. 'fixed:5,mfixed:5'")
    if len(text) > MAX_SPEC_LENGTH:
        raise InvalidRequestError(f"views spec is longer than {MAX_SPEC_LENGTH} characters")
    if text.strip().lower() == "auto":
        return AUTO_SPEC
    counts: dict[str, int] = {}
    order: list[str] = []
    for raw in text.split(","):
        item = raw.strip()
        token, sep, count_text = item.partition(":")
        kind, at, size_text = token.strip().lower().partition("@")
        kind = kind.strip()
        if kind not in KINDS:
            raise InvalidRequestError(
                f"unknown view kind {kind!r} in {text!r}; known kinds: {', '.join(KINDS)}"
            )
        if at:
            size_text = size_text.strip()
            if not (size_text.isascii() and size_text.isdigit()) or len(size_text) > 6:
                raise InvalidRequestError(f"view size in {item!r} must be a positive integer")
            size = int(size_text)
            if not MIN_VIEW_SIZE <= size <= MAX_VIEW_SIZE:
                raise InvalidRequestError(
                    f"view size in {item!r} must be between {MIN_VIEW_SIZE} and {MAX_VIEW_SIZE}"
                )
            kind = f"{kind}@{size}"
        count_text = count_text.strip()
        if sep and not (count_text.isascii() and count_text.isdigit()):
            raise InvalidRequestError(f"view count in {item!r} must be a positive integer")
        count = int(count_text) if sep else 1
        if count < 1:
            raise InvalidRequestError(f"view count in {item!r} must be at least 1")
        if kind not in counts:
            order.append(kind)
        counts[kind] = counts.get(kind, 0) + count
        most = MAX_PER_KIND.get(split_kind(kind)[0], 10**6)
        if counts[kind] > most:
            raise InvalidRequestError(
                f"at most {most} {kind!r} view(s) exist, asked for {counts[kind]}"
            )
    return ViewSpec(tuple((k, counts[k]) for k in order))


def default_policy(crops: int) -> ViewSpec:
    """Turn a crop count into a mix, following the MID paper's evidence.

    1: the center crop.  2-4: the center crop plus random and mirrored random crops (the
    paper's Fig. 3: the center crop helps while there are fewer than 5 random crops).
    5-10: the 5 AlexNet crops, then their mirrors (Tab. I: 5 FC + 5 MFC beat 10 RC).
    More: 5 FC + 5 MFC, the rest split between random and mirrored random crops (Tab. VIII:
    combining all four kinds is best).
    """
    if crops < 1:
        raise InvalidRequestError("crops must be at least 1")
    if crops == 1:
        return ViewSpec((("center", 1),))
    if crops < 5:
        rest = crops - 1
        parts = [("center", 1), ("random", (rest + 1) // 2), ("mrandom", rest // 2)]
    elif crops <= 10:
        parts = [("fixed", 5), ("mfixed", crops - 5)]
    else:
        rest = crops - 10
        parts = [("fixed", 5), ("mfixed", 5), ("random", (rest + 1) // 2), ("mrandom", rest // 2)]
    return ViewSpec(tuple((k, n) for k, n in parts if n > 0))


def _fixed_corners(width: int, height: int, size: int) -> list[tuple[int, int]]:
    """Center (rounded as torchvision's CenterCrop does) and the four corners."""
    cx = int(round((width - size) / 2.0))
    cy = int(round((height - size) / 2.0))
    right, bottom = width - size, height - size
    return [(cx, cy), (0, 0), (right, 0), (0, bottom), (right, bottom)]


def plan_views(spec: ViewSpec, width: int, height: int, size: int, seed: int) -> list[View]:
    """Square crops of side ``size`` of one ``width`` x ``height`` resized image (the
    model's own scale); ``seed`` fixes random positions."""
    if spec.adaptive:
        raise InvalidRequestError("the auto policy must be resolved for the image first")
    return _plan_crops(spec.parts, width, height, size, _Draws(seed))


class _Draws:
    """One plan's random positions, from a generator seeded at its first draw: most plans
    (a center crop, the fixed crops, whole images) draw none, and seeding numpy's
    generator costs four times what planning a center crop does (about 12 us against 3)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._rng: np.random.Generator | None = None

    def up_to(self, high: int, count: int) -> np.ndarray:
        """``count`` integers in [0, high]."""
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        return self._rng.integers(0, high, size=count, endpoint=True)


def _plan_crops(
    parts: Iterable[tuple[str, int]], width: int, height: int, size: int, rng: _Draws
) -> list[View]:
    if width < size or height < size:
        raise InvalidRequestError(f"resized image {width}x{height} is smaller than crop {size}")
    resized = (width, height)
    corners = _fixed_corners(width, height, size)
    views: list[View] = []
    for token, count in parts:
        kind = split_kind(token)[0]
        if kind == "center":
            views.append(View(token, *corners[0], size, size, False, resized))
        elif kind in ("fixed", "mfixed"):
            views.extend(
                View(token, x, y, size, size, kind == "mfixed", resized) for x, y in corners[:count]
            )
        else:
            xs = rng.up_to(width - size, count)
            ys = rng.up_to(height - size, count)
            views.extend(
                View(token, int(x), int(y), size, size, kind == "mrandom", resized)
                for x, y in zip(xs, ys, strict=True)
            )
    return views


def resized_shape(width: int, height: int, shorter: int) -> tuple[int, int]:
    """Shorter side to ``shorter``, aspect kept; truncation as torchvision's Resize(int)."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def full_shape(width: int, height: int, shorter: int, stride: int) -> tuple[int, int]:
    """The whole image at shorter side ``shorter``, its long side rounded to a multiple of
    ``stride`` (at most stride / 2 pixels of stretch), so images of similar aspect share a
    shape and batch together."""
    w, h = resized_shape(width, height, shorter)
    if w > h:
        w = max(stride, math.floor(w / stride + 0.5) * stride)  # half up
    elif h > w:
        h = max(stride, math.floor(h / stride + 0.5) * stride)
    return w, h


def plan_image_views(
    spec: ViewSpec, width: int, height: int, geometry: ViewGeometry, seed: int
) -> list[View]:
    """Every view of a decoded ``width`` x ``height`` image, in spec order: crops at the
    model's scale or at ``@S``, and whole-image views. One random generator, in spec order,
    so a spec of crops at the model's scale plans exactly what ``plan_views`` plans."""
    if spec.adaptive:
        raise InvalidRequestError("the auto policy must be resolved for the image first")
    rng = _Draws(seed)
    views: list[View] = []
    for token, count in spec.parts:
        kind, size = split_kind(token)
        shorter = geometry.shorter_side(token)
        if kind in ("full", "mfull"):
            w, h = full_shape(width, height, shorter, geometry.stride)
            views.append(View(token, 0, 0, w, h, kind == "mfull", (w, h)))
            continue
        crop = size or geometry.input_size
        w, h = resized_shape(width, height, shorter)
        views.extend(_plan_crops([(token, count)], w, h, crop, rng))
    return views


def view_pixels(input_size: int) -> int:
    """The unit compute is counted in: the pixels of one view at the model's input size."""
    return input_size**2


def view_equivalents(views: Iterable[View], input_size: int) -> float:
    """Compute of ``views`` in views of the model's input size: their pixels over one such
    view's (what batch, queue and request bounds count)."""
    return sum(v.width * v.height for v in views) / view_pixels(input_size)


def boxes_in_original(
    views: Iterable[View], resized: tuple[int, int], original: tuple[int, int]
) -> list[list[float]]:
    """[x0, y0, x1, y1] of each view in the uploaded image's pixel coordinates (``resized``:
    the size views without their own resized copy were planned on)."""
    boxes = []
    for v in views:
        sx = original[0] / (v.resized or resized)[0]
        sy = original[1] / (v.resized or resized)[1]
        boxes.append(
            [
                round(v.x * sx, 1),
                round(v.y * sy, 1),
                round((v.x + v.width) * sx, 1),
                round((v.y + v.height) * sy, 1),
            ]
        )
    return boxes
