from __future__ import annotations

import pytest
import torch

from app.errors import InvalidRequestError
from app.tta.preprocess import PreparedImage, cut_views
from app.tta.views import boxes_in_original, default_policy, parse_view_spec, plan_views


def test_parse_spec_keeps_order_and_merges_repeats() -> None:
    spec = parse_view_spec(" fixed:5, mfixed:5,random:3,random:2 ,mrandom")
    assert spec.parts == (("fixed", 5), ("mfixed", 5), ("random", 5), ("mrandom", 1))
    assert spec.total == 16
    assert str(spec) == "fixed:5,mfixed:5,random:5,mrandom:1"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty"),
        ("bogus:3", "unknown view kind"),
        ("random:0", "at least 1"),
        ("random:-2", "positive integer"),
        ("random:x", "positive integer"),
        ("random:1.5", "positive integer"),
        ("fixed:6", "at most 5"),
        ("center:2", "at most 1"),
        ("random:1," * 60, "longer than"),
        ("random:٣", "positive integer"),  # non-ASCII digit
    ],
)
def test_parse_spec_rejects_with_a_reason(text: str, needle: str) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        parse_view_spec(text)


def test_default_policy_follows_the_paper() -> None:
    assert str(default_policy(1)) == "center:1"
    assert str(default_policy(3)) == "center:1,random:1,mrandom:1"
    assert str(default_policy(4)) == "center:1,random:2,mrandom:1"
    assert str(default_policy(5)) == "fixed:5"
    assert str(default_policy(10)) == "fixed:5,mfixed:5"
    assert str(default_policy(30)) == "fixed:5,mfixed:5,random:10,mrandom:10"
    for n in range(1, 60):
        assert default_policy(n).total == n
    with pytest.raises(InvalidRequestError):
        default_policy(0)


def test_fixed_crops_sit_at_center_and_corners() -> None:
    views = plan_views(parse_view_spec("fixed:5,mfixed:5"), 300, 256, 224, seed=0)
    boxes = [(v.x, v.y) for v in views]
    assert boxes[:5] == [(38, 16), (0, 0), (76, 0), (0, 32), (76, 32)]
    assert boxes[5:] == boxes[:5]
    assert [v.flip for v in views] == [False] * 5 + [True] * 5


def test_random_views_in_bounds_distinct_and_seeded() -> None:
    spec = parse_view_spec("random:20,mrandom:20")
    a = plan_views(spec, 341, 256, 224, seed=7)
    b = plan_views(spec, 341, 256, 224, seed=7)
    c = plan_views(spec, 341, 256, 224, seed=8)
    assert a == b and a != c
    for v in a:
        assert 0 <= v.x <= 341 - 224 and 0 <= v.y <= 256 - 224
    assert len({(v.x, v.y) for v in a}) > 30  # positions differ from each other
    assert [v.flip for v in a] == [False] * 20 + [True] * 20


def test_random_positions_cover_the_whole_range() -> None:
    views = plan_views(parse_view_spec("random:2000"), 236, 234, 224, seed=1)
    xs = {v.x for v in views}
    ys = {v.y for v in views}
    assert xs == set(range(13)) and ys == set(range(11))  # both ends reachable, uniform ints


def test_views_are_slices_and_mirrors_of_the_one_tensor() -> None:
    tensor = torch.arange(3 * 10 * 14, dtype=torch.float32).view(3, 10, 14)
    image = PreparedImage.from_tensor(tensor.permute(1, 2, 0).contiguous(), (28, 20), "PNG")
    views = plan_views(parse_view_spec("fixed:2,mfixed:2,random:3"), 14, 10, 8, seed=3)
    batch = cut_views(image, views)
    assert batch.shape == (7, 3, 8, 8)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    for out, v in zip(batch, views, strict=True):
        crop = tensor[:, v.y : v.y + 8, v.x : v.x + 8]
        assert torch.equal(out, crop.flip(-1) if v.flip else crop)
    assert boxes_in_original(views[:1], (14, 10), (28, 20)) == [[6.0, 2.0, 22.0, 18.0]]


def test_crop_larger_than_image_is_refused() -> None:
    with pytest.raises(InvalidRequestError):
        plan_views(parse_view_spec("center"), 100, 50, 64, seed=0)


def test_resize_and_compute_units_are_stated_once() -> None:
    from app.tta.views import (
        ViewGeometry,
        plan_image_views,
        resize_for,
        view_equivalents,
        view_pixels,
    )

    assert resize_for(224, 0.875) == 256 and resize_for(64, 0.8) == 80  # floor(S / crop_pct)
    assert resize_for(64, 1.0) == 64
    geometry = ViewGeometry(64, 0.8, resize_for(64, 0.8))
    views = plan_image_views(parse_view_spec("center,center@96,full"), 120, 90, geometry, 0)
    assert views[1].resized[1] == resize_for(96, 0.8)  # a crop at @S: the same rule, scaled
    pixels = sum(v.width * v.height for v in views)
    assert view_equivalents(views, 64) == pixels / view_pixels(64) == pixels / 64**2
