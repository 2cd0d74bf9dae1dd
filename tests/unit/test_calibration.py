from __future__ import annotations

import pytest
import torch

from app.tta.calibration import auroc, calibrate, ece, fit_temperature, nll


def _toy(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(z); the model reports softmax(z / 3): under-confident,
    as an average of many views is."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g) * 3
    targets = torch.multinomial(torch.softmax(z, 1), 1, generator=g)[:, 0]
    return torch.softmax(z / 3, 1), targets


def test_a_fitted_temperature_lowers_nll_and_ece_on_held_out_data() -> None:
    fit_p, fit_t = _toy(2000, 10, seed=0)
    test_p, test_t = _toy(2000, 10, seed=1)
    t = fit_temperature(fit_p, fit_t)
    assert 0.25 < t < 0.45  # the true correction is 1/3
    calibrated = calibrate(test_p, t)
    assert nll(calibrated, test_t) < nll(test_p, test_t) - 0.05
    assert ece(calibrated, test_t) < ece(test_p, test_t)
    assert torch.allclose(calibrated.sum(1), torch.ones(len(test_t)), atol=1e-5)


def test_calibration_keeps_the_ranking_and_t1_is_the_identity() -> None:
    p, _ = _toy(50, 7, seed=2)
    assert torch.equal(calibrate(p, 1.0), p)
    assert torch.equal(calibrate(p, 0.5).argsort(1), p.argsort(1))


def test_well_calibrated_probabilities_keep_a_temperature_near_one() -> None:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4000, 5, generator=g) * 2
    targets = torch.multinomial(torch.softmax(z, 1), 1, generator=g)[:, 0]
    assert fit_temperature(torch.softmax(z, 1), targets) == pytest.approx(1.0, abs=0.1)


def test_ece_of_a_confident_wrong_model_is_its_confidence() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    assert ece(probs, torch.tensor([1, 1])) == pytest.approx(0.9)
    assert ece(probs, torch.tensor([0, 0])) == pytest.approx(0.1)


def test_auroc_orders_right_above_wrong_and_counts_ties_half() -> None:
    assert auroc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5
    assert auroc([0.5, 0.6], [True, True]) is None
