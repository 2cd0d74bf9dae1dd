"""The ``auto`` view policy: spend views where the resized image has room for them.

The MID paper explains its gains by the spare area around the center crop: a 224 crop of
a 256 x 256 image covers 77 % of it, but of a 341 x 256 (4:3) image only 57 %, and of a
very wide image far less (the object is laid out along the long side). Its Fig. 4 notes
that "a strategy to choose the number of crops as a function of image size is effective
both computationally and performance-wise"; this module is that strategy.

Rule, from the size of the image *after* the single resize (shorter side = the model's
resize size) and the crop size (the model's input size):

=================================  ==================================================  =====
resized image                      views                                               count
=================================  ==================================================  =====
no room (w == h == crop)           ``center:1``                                            1
room along one axis only           ``center:1,random:n,mrandom:n``                     1 + 2n
(shorter side == crop)             (the 5 fixed crops collapse to 3 positions there)
room along both axes               ``fixed:5,mfixed:5`` (+ ``random:n,mrandom:n``)    10 + 2n
=================================  ==================================================  =====

with ``n`` from the aspect ratio ``long / short`` of the resized image:
``n = 0`` below 1.25 (near square: the 5 fixed crops and their mirrors already cover it),
``n = 5`` below 1.5 (4:3 and 3:2 photos), ``n = 10`` from 1.5 on (elongated images, where
Tab. VIII shows random crops add coverage that fixed crops miss). In the one-axis case
``n`` is at least 2, so some random positions are always spent on the free axis.

Server use (``views=auto``): decode and resize the image once, then call
``auto_policy(*image.resized_size, cfg.input_size)`` and hand the returned spec to
``plan_views`` with the request's seed, exactly as for an explicit spec.
"""

from __future__ import annotations

from app.errors import InvalidRequestError
from app.tta.views import ViewSpec

AUTO = "auto"
NEAR_SQUARE = 1.25  # aspect ratios below this get no random views
ELONGATED = 1.5  # aspect ratios from this on get the most random views
RANDOM_PAIRS = (0, 5, 10)  # random + mirrored random views, per aspect band
MIN_PAIRS_ONE_AXIS = 2


def random_pairs(aspect: float) -> int:
    """How many random (and as many mirrored random) views an aspect ratio earns."""
    if aspect < NEAR_SQUARE:
        return RANDOM_PAIRS[0]
    if aspect < ELONGATED:
        return RANDOM_PAIRS[1]
    return RANDOM_PAIRS[2]


def auto_policy(resized_width: int, resized_height: int, crop_size: int) -> ViewSpec:
    """The view mix for one image, from its resized size and the model's crop size."""
    if min(resized_width, resized_height, crop_size) < 1:
        raise InvalidRequestError("auto policy needs positive image and crop sizes")
    if resized_width < crop_size or resized_height < crop_size:
        raise InvalidRequestError(
            f"resized image {resized_width}x{resized_height} is smaller than crop {crop_size}"
        )
    long_side = max(resized_width, resized_height)
    short_side = min(resized_width, resized_height)
    if long_side == crop_size:
        return ViewSpec((("center", 1),))
    n = random_pairs(long_side / short_side)
    if short_side == crop_size:
        n = max(n, MIN_PAIRS_ONE_AXIS)
        return ViewSpec((("center", 1), ("random", n), ("mrandom", n)))
    parts: list[tuple[str, int]] = [("fixed", 5), ("mfixed", 5)]
    if n:
        parts += [("random", n), ("mrandom", n)]
    return ViewSpec(tuple(parts))


def resolve_spec(
    spec: ViewSpec,
    resized_width: int,
    resized_height: int,
    crop: int,
    measured: ViewSpec | None = None,
) -> ViewSpec:
    """The spec itself, or for ``auto`` the model's measured policy when it has one, else
    the mix this image's resized size earns."""
    if not spec.adaptive:
        return spec
    if measured is not None:
        return measured
    return auto_policy(resized_width, resized_height, crop)
