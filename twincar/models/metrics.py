"""Classification metrics: one torchmetrics collection, cloned per stage as ``stage/name``.

Besides the flat metrics (top-1/3/5, macro precision/recall/F1) it holds, when class names are given,
the fine-grained ones a car researcher asks for: make, family (make + model) and year accuracy, the
"twin" accuracy (year right among images whose family is right), what kind of mistakes are made, and
how well confidence matches accuracy (expected calibration error, negative log-likelihood). All are sum-state
torchmetrics metrics, so they synchronise across DDP processes and accumulate over any number of batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from twincar.data.classes import parse_car_name

TOP_K = (3, 5)
ECE_BINS = 15  # equal-width confidence bins of the expected calibration error
NO_YEAR = -1  # year code of a class whose name states none

# name -> what it is; the keys of HierarchicalAccuracy.compute() (each logged as stage/name)
HIERARCHY_METRICS = {
    "acc_make": "make right",
    "acc_family": "make and model right, year ignored",
    "acc_year": "year right (images whose true class names a year)",
    "acc_year_pm1": "year right within one year",
    "acc_year_in_family": "year right among images whose family is right (the twin accuracy)",
    "err_wrong_year": "share of errors that are the right family, wrong year",
    "err_wrong_model": "share of errors that are the right make, wrong model",
    "err_wrong_make": "share of errors that are the wrong make",
}


def class_hierarchy(class_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per class: ``make`` and ``family`` ids (indices into the sorted distinct names) and ``year`` (or -1)."""
    cars = [parse_car_name(n) for n in class_names]
    makes = sorted({c.make for c in cars})
    families = sorted({c.family for c in cars})
    return {
        "make": torch.tensor([makes.index(c.make) for c in cars]),
        "family": torch.tensor([families.index(c.family) for c in cars]),
        "year": torch.tensor([c.year if c.year is not None else NO_YEAR for c in cars]),
    }


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den as float; NaN when nothing was counted (e.g. no class names a year)."""
    return num.float() / den if den > 0 else torch.tensor(float("nan"), device=num.device)


class HierarchicalAccuracy(Metric):
    """Make / family / year accuracies and the mistake-severity breakdown, from logits (or labels) and targets.

    A metric is NaN when its denominator is empty: ``acc_year*`` when no true class names a year,
    ``acc_year_in_family`` when no image has its family right, ``err_*`` when there are no errors.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, class_names: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        for key, table in class_hierarchy(class_names).items():
            self.register_buffer(f"_{key}", table, persistent=False)
        for name in ("n", "make", "family", "n_year", "year", "year_pm1", "n_family_year", "year_in_family",
                     "errors", "err_year", "err_model", "err_make"):
            self.add_state(name, default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """``preds``: logits/probabilities (N, K) or predicted labels (N,); ``target``: labels (N,)."""
        pred = preds.argmax(dim=1) if preds.ndim == 2 else preds
        pred, target = pred.long(), target.long()
        make_ok = self._make[pred] == self._make[target]
        family_ok = self._family[pred] == self._family[target]
        y_true, y_pred = self._year[target], self._year[pred]
        has_year = y_true != NO_YEAR
        year_ok = has_year & (y_pred == y_true)
        wrong = pred != target
        self.n += len(target)
        self.make += make_ok.sum()
        self.family += family_ok.sum()
        self.n_year += has_year.sum()
        self.year += year_ok.sum()
        self.year_pm1 += (has_year & (y_pred != NO_YEAR) & ((y_pred - y_true).abs() <= 1)).sum()
        self.n_family_year += (family_ok & has_year).sum()
        self.year_in_family += (family_ok & year_ok).sum()
        self.errors += wrong.sum()
        self.err_year += (wrong & family_ok).sum()
        self.err_model += (wrong & make_ok & ~family_ok).sum()
        self.err_make += (wrong & ~make_ok).sum()

    def compute(self) -> dict[str, torch.Tensor]:
        return {
            "acc_make": _ratio(self.make, self.n),
            "acc_family": _ratio(self.family, self.n),
            "acc_year": _ratio(self.year, self.n_year),
            "acc_year_pm1": _ratio(self.year_pm1, self.n_year),
            "acc_year_in_family": _ratio(self.year_in_family, self.n_family_year),
            "err_wrong_year": _ratio(self.err_year, self.errors),
            "err_wrong_model": _ratio(self.err_model, self.errors),
            "err_wrong_make": _ratio(self.err_make, self.errors),
        }


def hierarchy_accuracy(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict[str, float]:
    """Top-1, family and year-given-family accuracy of ``logits`` (N, K) against ``labels`` (N,).

    Family accuracy: the predicted class has the true class's make and model (any year).
    Year given family: among images whose family has two or more years, the argmax over that family's
    classes only is the true class (a model that knows the family, asked for the year; chance 1/years).
    """
    family = class_hierarchy(class_names)["family"]  # per class: its family id
    members = {f: (family == f).nonzero().flatten().tolist() for f in family.unique().tolist()}
    pred = logits.argmax(dim=1)
    fam_ok = family[pred] == family[labels]
    family = family.tolist()
    year_hits, year_n = 0, 0
    for row, t in zip(logits, labels.tolist(), strict=True):
        idx = members[family[t]]
        if len(idx) >= 2:
            year_n += 1
            year_hits += idx[int(row[idx].argmax())] == t
    return {
        "acc": float((pred == labels).float().mean()),
        "acc_family": float(fam_ok.float().mean()),
        "acc_year_given_family": year_hits / year_n if year_n else float("nan"),
    }


def reliability_bins(logits: torch.Tensor, target: torch.Tensor, n_bins: int = ECE_BINS) -> torch.Tensor:
    """(3, n_bins): per equal-width confidence bin ``(lo, hi]``, the image count, summed confidence and
    summed correctness (top-1) of the softmax of ``logits``: the bins of a reliability diagram and of the ECE."""
    probs = logits.float().softmax(dim=1)
    conf, pred = probs.max(dim=1)
    bins = (conf * n_bins).ceil().long().clamp(1, n_bins) - 1
    out = torch.zeros(3, n_bins, device=logits.device)
    out[0].index_add_(0, bins, torch.ones_like(conf))
    out[1].index_add_(0, bins, conf)
    out[2].index_add_(0, bins, (pred == target).float())
    return out


def expected_calibration_error(bins: torch.Tensor) -> torch.Tensor:
    """ECE from :func:`reliability_bins`: sum over bins of (share of images) x |accuracy - confidence|."""
    count, conf, correct = bins
    return (conf - correct).abs().sum() / count.sum().clamp(min=1)


class ExpectedCalibrationError(Metric):
    """Expected calibration error (``ece``, ``ECE_BINS`` equal-width bins, top-1 confidence) and the mean
    negative log-likelihood of the true class (``nll``) of logits: how far confidence is from accuracy (the
    temperature that lowers both is :func:`twincar.evaluation.calibration.fit_temperature`)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, n_bins: int = ECE_BINS, **kwargs):
        super().__init__(**kwargs)
        self.n_bins = n_bins
        self.add_state("bins", default=torch.zeros(3, n_bins), dist_reduce_fx="sum")
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.bins += reliability_bins(logits, target, self.n_bins)
        self.nll_sum += F.cross_entropy(logits.float(), target, reduction="sum").double()
        self.n += len(target)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"ece": expected_calibration_error(self.bins), "nll": (self.nll_sum / self.n.clamp(min=1)).float()}


def classification_metrics(
    num_classes: int, prefix: str = "", class_names: Sequence[str] | None = None
) -> MetricCollection:
    """Top-1 accuracy, top-3/top-5 accuracy (when k < num_classes), macro precision/recall/F1; with
    ``class_names``, also :data:`HIERARCHY_METRICS` and ``ece``, ``nll``.

    Names: ``{prefix}acc``, ``{prefix}acc_top3``, ``{prefix}acc_top5``, ``{prefix}precision_macro``,
    ``{prefix}recall_macro``, ``{prefix}f1_macro`` (+ ``{prefix}acc_make`` ... ``{prefix}nll``). Accuracies
    are micro averages (fraction of images right); precision, recall and F1 are unweighted means over classes.
    """
    metrics = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        **{
            f"acc_top{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
            for k in TOP_K
            if k < num_classes
        },
        "precision_macro": MulticlassPrecision(num_classes, average="macro"),
        "recall_macro": MulticlassRecall(num_classes, average="macro"),
        "f1_macro": MulticlassF1Score(num_classes, average="macro"),
    }
    if class_names is not None:
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        metrics["hierarchy"] = HierarchicalAccuracy(class_names)
        metrics["ece"] = ExpectedCalibrationError()
    return MetricCollection(metrics, prefix=prefix)
