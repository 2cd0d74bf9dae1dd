"""View plans: which crops of the resized image to classify, as boxes plus flip flags.

Kinds (MID paper, AlexNet):
  center   the single central crop (what timm's eval transform takes)
  fixed    the 5 AlexNet crops, in order: center, top-left, top-right, bottom-left, bottom-right
  mfixed   the same 5, mirrored
  random   full-size crops at uniformly random positions inside the resized image
  mrandom  independent random positions, mirrored
A spec is an ordered mix such as ``fixed:5,mfixed:5,random:10,mrandom:10``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from app.errors import InvalidRequestError

KINDS = ("center", "fixed", "mfixed", "random", "mrandom")
MAX_PER_KIND = {"center": 1, "fixed": 5, "mfixed": 5}
MAX_SPEC_LENGTH = 200


@dataclass(frozen=True)
class ViewSpec:
    """An ordered, validated mix of view kinds and counts, or the adaptive ``auto`` policy
    (``adaptive=True``, no parts: resolved per image by app.tta.adaptive.resolve_spec)."""

    parts: tuple[tuple[str, int], ...]
    adaptive: bool = False

    @property
    def total(self) -> int:
        return sum(n for _, n in self.parts)

    @property
    def has_random(self) -> bool:
        return any(kind in ("random", "mrandom") for kind, _ in self.parts)

    def __str__(self) -> str:
        if self.adaptive:
            return "auto"
        return ",".join(f"{kind}:{n}" for kind, n in self.parts)


AUTO_SPEC = ViewSpec((), adaptive=True)


@dataclass(frozen=True)
class View:
    """One crop of the resized image: top-left corner, square side, mirrored or not."""

    kind: str
    x: int
    y: int
    size: int
    flip: bool


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
        kind, sep, count_text = item.partition(":")
        kind = kind.strip().lower()
        if kind not in KINDS:
            raise InvalidRequestError(
                f"unknown view kind {kind!r} in {text!r}; known kinds: {', '.join(KINDS)}"
            )
        count_text = count_text.strip()
        if sep and not (count_text.isascii() and count_text.isdigit()):
            raise InvalidRequestError(f"view count in {item!r} must be a positive integer")
        count = int(count_text) if sep else 1
        if count < 1:
            raise InvalidRequestError(f"view count in {item!r} must be at least 1")
        if kind not in counts:
            order.append(kind)
        counts[kind] = counts.get(kind, 0) + count
        if counts[kind] > MAX_PER_KIND.get(kind, 10**6):
            raise InvalidRequestError(
                f"at most {MAX_PER_KIND[kind]} {kind!r} view(s) exist, asked for {counts[kind]}"
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
    """Boxes for every view of a ``width`` x ``height`` resized image; ``seed`` fixes randoms."""
    if width < size or height < size:
        raise InvalidRequestError(f"resized image {width}x{height} is smaller than crop {size}")
    if spec.adaptive:
        raise InvalidRequestError("the auto policy must be resolved for the image first")
    rng = np.random.default_rng(seed)
    corners = _fixed_corners(width, height, size)
    views: list[View] = []
    for kind, count in spec.parts:
        if kind == "center":
            views.append(View(kind, *corners[0], size, False))
        elif kind in ("fixed", "mfixed"):
            views.extend(View(kind, x, y, size, kind == "mfixed") for x, y in corners[:count])
        else:
            xs = rng.integers(0, width - size, size=count, endpoint=True)
            ys = rng.integers(0, height - size, size=count, endpoint=True)
            views.extend(
                View(kind, int(x), int(y), size, kind == "mrandom")
                for x, y in zip(xs, ys, strict=True)
            )
    return views


def boxes_in_original(
    views: Iterable[View], resized: tuple[int, int], original: tuple[int, int]
) -> list[list[float]]:
    """[x0, y0, x1, y1] of each view in the uploaded image's pixel coordinates."""
    sx = original[0] / resized[0]
    sy = original[1] / resized[1]
    return [
        [
            round(v.x * sx, 1),
            round(v.y * sy, 1),
            round((v.x + v.size) * sx, 1),
            round((v.y + v.size) * sy, 1),
        ]
        for v in views
    ]
