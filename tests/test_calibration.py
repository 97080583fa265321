"""Calibration and the unknown answer (issue 16): temperature scaling, the unknown threshold, AUROC / FPR95."""

from __future__ import annotations

import math

import pytest
import torch

from twincar.calibration import (
    Calibration,
    auroc,
    calibrate,
    ece_nll,
    fit_temperature,
    fit_threshold,
    fpr_at_tpr,
    unknown_scores,
)
from twincar.errors import TwinCarError


def calibrated_set(n: int = 8000, k: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels drawn from the logits' own softmax: calibrated by construction (optimum T = 1)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g) * 2
    labels = torch.multinomial(logits.softmax(1), 1, generator=g).flatten()
    return logits, labels


@pytest.mark.parametrize("scale", [1.0, 3.0, 0.5])
def test_the_temperature_undoes_a_known_scaling_of_calibrated_logits(scale):
    logits, labels = calibrated_set()
    t = fit_temperature(logits * scale, labels)
    assert t == pytest.approx(scale, rel=0.05)
    ece_raw, nll_raw = ece_nll(logits * scale, labels)
    ece, nll = ece_nll(logits * scale, labels, t)
    if scale != 1.0:
        assert ece < ece_raw / 3 and nll < nll_raw


def test_the_threshold_keeps_the_target_share_of_the_split_it_is_fitted_on():
    scores = torch.randn(200, generator=torch.Generator().manual_seed(1))
    for tpr in (0.95, 0.9, 0.5, 1.0):
        t = fit_threshold(scores, tpr)
        assert float((scores >= t).double().mean()) == pytest.approx(tpr)
    assert fit_threshold(torch.tensor([1.0, 2.0, 3.0, 4.0]), 0.75) == 2.0  # the largest that keeps 3 of 4
    with pytest.raises(TwinCarError, match=r"true-positive rate must be in \(0, 1\]"):
        fit_threshold(scores, 0)


def test_auroc_and_fpr95_equal_their_analytic_values():
    # known ~ U[0.3, 1.3], unknown ~ U[0, 1] (fine grids): AUROC = 1 - (1 - 0.3)^2 / 2, FPR95 = P(u >= 0.35) = 0.65
    grid = (torch.arange(10000, dtype=torch.float64) + 0.5) / 10000
    known, unknown = grid + 0.3, grid
    assert auroc(known, unknown) == pytest.approx(1 - 0.7**2 / 2, abs=1e-3)
    assert fpr_at_tpr(known, unknown, 0.95) == pytest.approx(0.65, abs=1e-3)
    # exact small case with a tie: pairs (3>1, 3>2, 3=3, 4>1, 4>2, 4>3) -> 5.5 / 6
    assert auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(5.5 / 6)
    assert auroc(grid + 2, grid) == 1.0 and auroc(grid, grid + 2) == 0.0
    assert fpr_at_tpr(grid + 2, grid) == 0.0


def test_the_scores_on_known_logits():
    z = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    assert unknown_scores(z).tolist() == [2.0, 1.0]
    assert unknown_scores(z, "max_softmax").tolist() == pytest.approx([1 / (1 + math.exp(-2)), 0.5])
    assert unknown_scores(z, "energy", 2.0).tolist() == pytest.approx(
        [2 * torch.logsumexp(z[0] / 2, 0).item(), 2 * torch.logsumexp(z[1] / 2, 0).item()])
    with pytest.raises(TwinCarError, match="unknown score 'odin': use one of max_logit, max_softmax, energy"):
        unknown_scores(z, "odin")


def test_a_calibration_round_trips_and_refuses_nonsense():
    logits, labels = calibrated_set(2000)
    c = calibrate(logits * 2, labels, tpr=0.9)
    assert c.temperature == pytest.approx(2, rel=0.15) and c.images == 2000 and c.ece < c.ece_raw
    assert float((c.scores(logits * 2) >= c.threshold).double().mean()) == pytest.approx(0.9)
    assert Calibration.from_dict({**c.to_dict(), "added_later": 1}) == c
    assert Calibration.from_dict(None) is None
    with pytest.raises(TwinCarError, match="temperature must be a positive number"):
        Calibration(temperature=0.0)
