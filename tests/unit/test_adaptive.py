"""The auto view policy: views follow the room the resized image leaves around the crop."""

from __future__ import annotations

import pytest

from app.errors import InvalidRequestError
from app.tta.adaptive import auto_policy
from app.tta.views import plan_views


def test_no_room_gives_the_center_crop_only() -> None:
    assert str(auto_policy(224, 224, 224)) == "center:1"


def test_near_square_with_room_gives_fixed_and_mirrored_fixed() -> None:
    assert str(auto_policy(256, 256, 224)) == "fixed:5,mfixed:5"
    assert str(auto_policy(300, 256, 224)) == "fixed:5,mfixed:5"  # aspect 1.17


def test_photo_and_elongated_images_get_more_random_views() -> None:
    four_three = auto_policy(341, 256, 224)  # 4:3 photo
    wide = auto_policy(512, 256, 224)  # 2:1
    assert str(four_three) == "fixed:5,mfixed:5,random:5,mrandom:5"
    assert str(wide) == "fixed:5,mfixed:5,random:10,mrandom:10"
    assert auto_policy(256, 512, 224) == wide  # orientation does not matter


def test_room_along_one_axis_spends_random_views_there() -> None:
    spec = auto_policy(240, 240 * 4 // 3, 240)  # e.g. a model with crop_pct 1.0
    assert str(spec) == "center:1,random:5,mrandom:5"
    views = plan_views(spec, 240, 320, 240, seed=3)
    assert {v.x for v in views} == {0} and len({v.y for v in views}) > 1
    assert str(auto_policy(250, 240, 240)) == "center:1,random:2,mrandom:2"


def test_views_never_decrease_with_elongation() -> None:
    totals = [auto_policy(w, 256, 224).total for w in range(256, 1200, 7)]
    assert totals == sorted(totals)
    assert totals[0] == 10 and totals[-1] == 30


def test_every_planned_view_lies_inside_the_image() -> None:
    for w, h in [(224, 224), (224, 500), (256, 256), (341, 256), (256, 900)]:
        for v in plan_views(auto_policy(w, h, 224), w, h, 224, seed=0):
            assert 0 <= v.x <= w - 224 and 0 <= v.y <= h - 224


@pytest.mark.parametrize("size", [(200, 300, 224), (0, 10, 5), (300, 300, 0)])
def test_images_smaller_than_the_crop_are_refused(size: tuple[int, int, int]) -> None:
    with pytest.raises(InvalidRequestError):
        auto_policy(*size)
