"""Open-set metrics: how well an unknown score (:func:`twincar.evaluation.calibration.unknown_scores`, higher = more
like a known class) tells images of the known classes from images of none.

- :func:`auroc`, :func:`fpr_at_tpr`: how well a score separates known from unknown images, no threshold needed;
- :func:`open_set_metrics`: the ``ood/*`` metrics training and eval report, those two and what the model's threshold
  (:func:`twincar.evaluation.calibration.fit_threshold`) does.
"""

from __future__ import annotations

import torch

from twincar.evaluation.calibration import DEFAULT_TPR, fit_threshold


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``x``, ties sharing their average rank (as scipy's rankdata)."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return ((ends - counts.double() + 1 + ends) / 2)[inverse]


def auroc(known: torch.Tensor, unknown: torch.Tensor) -> float:
    """Area under the ROC curve of telling known (positive) from unknown images by score: the probability that a
    known image scores higher than an unknown one, ties counting half (Mann-Whitney U / (n_known * n_unknown))."""
    known, unknown = known.detach().double().flatten(), unknown.detach().double().flatten()
    if len(known) == 0 or len(unknown) == 0:
        return float("nan")
    ranks = _average_ranks(torch.cat([known, unknown]))
    u = ranks[: len(known)].sum() - len(known) * (len(known) + 1) / 2
    return float(u / (len(known) * len(unknown)))


def fpr_at_tpr(known: torch.Tensor, unknown: torch.Tensor, tpr: float = DEFAULT_TPR) -> float:
    """Share of unknown images accepted as known at the threshold that keeps ``tpr`` of the known ones (FPR95)."""
    if len(unknown) == 0:
        return float("nan")
    return float((unknown.double() >= fit_threshold(known, tpr)).double().mean())


def open_set_metrics(known: torch.Tensor, unknown: torch.Tensor, *, threshold: float | None = None,
                     known_correct: torch.Tensor | None = None, tpr: float = DEFAULT_TPR) -> dict[str, float]:
    """The ``ood/*`` metrics of unknown scores of known-class images (``known``) and of images of no known class
    (``unknown``): ``ood/auroc`` and ``ood/fpr95`` (no threshold needed), ``ood/images`` (the unknown ones), and with
    the model's ``threshold``, ``ood/known_accepted`` and ``ood/unknown_rejected`` (the share of each it gets right)
    and, given whether each known image's top-1 is right (``known_correct``), ``ood/acc_accepted``: the top-1
    accuracy of the known images it still names (NaN when it names none)."""
    metrics = {"ood/auroc": auroc(known, unknown), "ood/fpr95": fpr_at_tpr(known, unknown, tpr),
               "ood/images": float(len(unknown))}
    if threshold is not None:
        accepted = known >= threshold
        metrics["ood/known_accepted"] = float(accepted.double().mean())
        metrics["ood/unknown_rejected"] = float((unknown < threshold).double().mean())
        if known_correct is not None:
            named = known_correct[accepted]
            metrics["ood/acc_accepted"] = float(named.double().mean()) if len(named) else float("nan")
    return metrics
