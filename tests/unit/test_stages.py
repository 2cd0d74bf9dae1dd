from __future__ import annotations

import pytest
import torch

from app.answers import gate_signal
from app.errors import InvalidRequestError
from app.tta.stages import Gate, parse_gate, parse_policy
from app.tta.views import parse_view_spec


def test_a_plain_spec_is_one_stage_and_prints_as_before() -> None:
    for text in ("center", "fixed:5,mfixed:5", "center,full@288,mfull@288", "auto"):
        policy = parse_policy(text)
        assert not policy.staged
        assert str(policy) == str(parse_view_spec(text))


def test_a_staged_policy_parses_and_prints_back() -> None:
    policy = parse_policy("center | margin<0.4 | full@288,mfull@288")
    assert policy.staged and policy.answer == "all"
    assert policy.stages[1].gate == Gate("margin", 0.4)
    assert policy.total == 3
    assert str(policy) == "center:1|margin<0.4|full@288:1,mfull@288:1"
    assert parse_policy(str(policy)) == policy
    last = parse_policy("center|prob<0.5|fixed:5|agree<1|full@320|last")
    assert len(last.stages) == 3 and last.answer == "last"
    assert parse_policy(str(last)) == last


@pytest.mark.parametrize(
    "text",
    [
        "center|",
        "center|margin<0.4",
        "center|full@288",
        "center|margin|full@288",
        "center|margin<1.5|full@288",
        "center|margin<-0.1|full@288",
        "center|margin<nan|full@288",
        "center|entropy<0.4|full@288",
        "center|margin<0.4|auto",
        "auto|margin<0.4|full@288",
        "center|margin<0.4|nope",
        "center|prob<0.5|center|prob<0.5|center|prob<0.5|center",
    ],
)
def test_bad_staged_policies_are_domain_errors(text: str) -> None:
    with pytest.raises(InvalidRequestError):
        parse_policy(text)


def test_gate_signals() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    assert gate_signal("prob", probs, torch.tensor([0])) == pytest.approx(0.6)
    assert gate_signal("margin", probs, torch.tensor([0])) == pytest.approx(0.3)
    assert gate_signal("agree", probs, torch.tensor([0, 1, 0, 2])) == pytest.approx(0.5)
    assert parse_gate("margin<0.4").goes_on(0.39) and not parse_gate("margin<0.4").goes_on(0.4)


def test_a_cascade_parses_and_prints_back() -> None:
    policy = parse_policy("center@256 | margin<0.42 | tf_efficientnet_lite2:full,mfull")
    assert policy.cascade and policy.models == ["tf_efficientnet_lite2"]
    first, second = policy.stages
    assert first.model is None and second.model == "tf_efficientnet_lite2"
    assert second.spec == parse_view_spec("full,mfull") and second.gate == Gate("margin", 0.42)
    assert str(policy) == "center@256:1|margin<0.42|tf_efficientnet_lite2:full:1,mfull:1"
    assert parse_policy(str(policy)) == policy
    assert policy.total == 3  # request bounds count every model's views
    assert policy.joined == parse_view_spec("center@256")  # the requested model's own
    assert policy.views_on("tf_efficientnet_lite2") == parse_view_spec("full,mfull")


def test_a_cascade_of_three_stages_names_each_model_once() -> None:
    text = "center|prob<0.5|b.2:fixed:5|agree<1|full@96,mfull@96|margin<0.3|b.2:center|last"
    with pytest.raises(InvalidRequestError, match="at most 3 stages"):
        parse_policy(text)
    policy = parse_policy("center|prob<0.5|m-1:fixed:5,random:2|agree<1|m-1 : center|last")
    assert [s.model for s in policy.stages] == [None, "m-1", "m-1"]
    assert policy.models == ["m-1"] and policy.answer == "last"
    assert policy.views_on("m-1") == parse_view_spec("fixed:5,random:2,center")
    assert str(policy) == "center:1|prob<0.5|m-1:fixed:5,random:2|agree<1|m-1:center:1|last"
    assert parse_policy(str(policy)) == policy
    # a stage back on the requested model after another model's
    back = parse_policy("center|margin<1|other:center|margin<1|full")
    assert [s.model for s in back.stages] == [None, "other", None]
    assert back.joined == parse_view_spec("center,full")


def test_a_view_kind_with_a_count_is_not_a_model() -> None:
    for text in ("fixed:5", "FIXED:5", "random:3,mrandom:3", "full@96:1"):
        policy = parse_policy(f"center|margin<0.5|{text}")
        assert not policy.cascade and policy.stages[1].model is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("tiny2:center|margin<0.5|full", "the first stage runs on the requested model"),
        ("center|margin<0.5|bad name:center", "is neither a view kind"),
        ("center|margin<0.5|../up:center", "is neither a view kind"),
        ("center|margin<0.5|tiny2:zoom:3", "reads as views on model 'tiny2'"),
        ("center|margin<0.5|tiny2:", "reads as views on model 'tiny2'"),
        ("center|margin<0.5|tiny2:auto", "cannot be 'auto'"),
    ],
)
def test_bad_cascades_are_domain_errors(text: str, says: str) -> None:
    with pytest.raises(InvalidRequestError, match=says.replace(".", r"\.")):
        parse_policy(text)
