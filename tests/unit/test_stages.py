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
