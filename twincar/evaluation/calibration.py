"""Calibrated confidence and the "unknown car" answer: small pure functions over logits and scores.

- :func:`fit_temperature`: temperature scaling (Guo et al., 2017), one scalar ``T`` fitted on a held-out split by
  minimising the negative log-likelihood of ``softmax(logits / T)`` (LBFGS on ``log T``, so ``T > 0``).
- :func:`unknown_scores`: how much an image looks like one of the known classes, higher = more known:
  ``max_logit`` (default; Vaze et al., ICLR 2022), ``max_softmax`` (of the calibrated probabilities) or
  ``energy`` (``T * logsumexp(logits / T)``, the negative free energy of Liu et al., 2020).
- :func:`fit_threshold`: the score above which an image is "known", chosen so that a target share (true-positive
  rate) of known images passes, on the split it is fitted on.
- :class:`Calibration`: the temperature and threshold a model carries (checkpoint hyper-parameters, model card or a
  sidecar file beside the weights: :func:`twincar.models.loading.write_calibration`), and :func:`calibrate`, which fits
  both from a split's logits: with the training features' statistics (:func:`fit_feature_stats`) and the split's
  embeddings, every score's threshold, and with images of no known class, each score's AUROC and the default score,
  the one of the best AUROC (:func:`choose_score`; :func:`twincar.evaluation.unknown.fit_unknown`).

The logits are raw (temperature 1: :meth:`twincar.inference.predictor.Predictor.outputs`' first); with flip TTA, the
average
of the image's and its mirror image's, so the temperature applies to them as to one view's. A calibration records
the TTA it was fitted with (``tta``): the threshold is used with another, with a warning (the scores shift a little).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from twincar.errors import TwinCarError
from twincar.inference import results
from twincar.inference.features import FEATURE_SCORES, FeatureStats, fit_feature_stats
from twincar.inference.results import DEFAULT_SCORE, SCORES

DEFAULT_TPR = 0.95  # share of known images the threshold keeps, on the split it is fitted on


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 100) -> float:
    """The temperature ``T`` that minimises the mean NLL of ``softmax(logits / T)`` against ``labels``.

    One scalar, fitted by LBFGS on ``log T`` (so it stays positive) from ``T = 1``; clamped to [0.01, 100].
    ``T > 1`` softens an over-confident model, ``T < 1`` sharpens an under-confident one; the argmax never changes.
    """
    if len(logits) == 0:
        raise TwinCarError("no images to fit the temperature on: the split is empty")
    z, y = logits.detach().float().cpu(), labels.detach().long().cpu()
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, tolerance_change=1e-7,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return min(max(t, 0.01), 100.0) if math.isfinite(t) else 1.0


def unknown_scores(logits: torch.Tensor, score: str = DEFAULT_SCORE, temperature: float = 1.0, *,
                   features: torch.Tensor | None = None, stats: FeatureStats | None = None) -> torch.Tensor:
    """(N,) scores of logits (N, K) (and, for a feature score, the images' ``features`` with the training ``stats``),
    higher = more like one of the known classes: the one definition,
    :func:`twincar.inference.results.unknown_scores`, as a float64 tensor."""
    z = logits.detach().float().cpu().numpy()
    f = None if features is None else features.detach().float().cpu().numpy()
    return torch.from_numpy(results.unknown_scores(z, score, temperature, features=f, stats=stats))


def available_scores(stats: FeatureStats | None) -> list[str]:
    """The scores a model can use: the logit scores, and with training-feature ``stats`` the feature scores
    (``knn`` only when they keep the k-NN bank)."""
    if stats is None:
        return [s for s in SCORES if s not in FEATURE_SCORES]
    return [s for s in SCORES if s != "knn" or stats.bank is not None]


def choose_score(aurocs: dict[str, float]) -> str:
    """The score of the highest AUROC (ties: the first in :data:`~twincar.inference.results.SCORES` order; NaN
    never wins)."""
    ranked = [s for s in SCORES if s in aurocs and math.isfinite(aurocs[s])]
    if not ranked:
        raise TwinCarError("no score has an AUROC to choose the default unknown score by")
    return max(ranked, key=lambda s: (aurocs[s], -SCORES.index(s)))


THRESHOLD_MARGIN = 1e-4  # relative: the threshold sits this far below the last kept score (float noise of a rerun)


def fit_threshold(known_scores: torch.Tensor, tpr: float = DEFAULT_TPR) -> float:
    """A threshold ``t`` such that ``ceil(tpr * n) / n`` of ``known_scores`` are ``>= t`` (an image is known when its
    score is at or above ``t``) when the scores are distinct: just below the lowest score that must pass (by
    ``THRESHOLD_MARGIN``, never below the midpoint to the next lower score), so that recomputing the same images'
    scores on other hardware keeps them."""
    if not 0 < tpr <= 1:
        raise TwinCarError(f"the target true-positive rate must be in (0, 1], got {tpr}")
    s = known_scores.detach().double().flatten().sort().values
    if len(s) == 0:
        raise TwinCarError("no known images to choose the unknown threshold on: the split is empty")
    below = min(math.floor(round((1 - tpr) * len(s), 9)), len(s) - 1)  # images allowed below the threshold
    t = float(s[below])
    margin = t - THRESHOLD_MARGIN * max(1.0, abs(t))
    return max(margin, (t + float(s[below - 1])) / 2) if below > 0 else margin


def ece_nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> tuple[float, float]:
    """(expected calibration error, mean NLL) of ``softmax(logits / temperature)``, ECE as the metrics compute it."""
    z = logits.float() / temperature
    from twincar.models.metrics import expected_calibration_error, reliability_bins  # torchmetrics: not for predict

    ece = float(expected_calibration_error(reliability_bins(z, labels)))
    return ece, float(F.cross_entropy(z, labels.long()))


@dataclass(frozen=True)
class Calibration:
    """What a model carries besides its weights so that its confidence means something and it can say "unknown"."""

    temperature: float = 1.0  # divide the logits by this before the softmax
    score: str = DEFAULT_SCORE  # the unknown score (one of SCORES)
    threshold: float | None = None  # an image whose score is below this is not one of the known classes
    target_tpr: float = DEFAULT_TPR  # share of the fitting split's images the threshold keeps
    fitted_on: str = ""  # which images: "val" (the training run's validation split), or a description
    images: int = 0  # how many
    ece_raw: float | None = None  # ECE on those images before temperature scaling
    ece: float | None = None  # and after
    nll_raw: float | None = None  # mean NLL before
    nll: float | None = None  # and after
    tta: str | None = None  # the test-time augmentation of the logits it was fitted on ("flip"; None: none)
    thresholds: dict[str, float] | None = None  # every usable score's threshold (at target_tpr of the same images)
    auroc: dict[str, float] | None = None  # every score's AUROC, known images against those of no known class
    selected_on: str = ""  # the images of no known class the default score was chosen on ("": not chosen)
    features: dict | None = None  # the training features' statistics file (write_calibration fills it in)

    def __post_init__(self):
        results.check_calibration(self.to_dict())  # the checks every consumer (the torch-free Predictor too) makes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> Calibration | None:
        """A calibration from its dict (unknown keys ignored, for files written by later versions); None for None."""
        if not d:
            return None
        if not isinstance(d, dict):
            raise TwinCarError(f"a calibration must be a mapping (temperature, score, threshold), got {d!r}")
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def scores(self, logits: torch.Tensor, features: torch.Tensor | None = None,
               stats: FeatureStats | None = None, score: str | None = None) -> torch.Tensor:
        """The unknown scores (``score``, None: the default) of raw logits (N, K), with this temperature (and the
        images' ``features`` with the training ``stats`` for a feature score)."""
        return unknown_scores(logits, score or self.score, self.temperature, features=features, stats=stats)

    def without_knn(self) -> Calibration:
        """This calibration for statistics without the k-NN bank: no ``knn`` threshold (its AUROC stays)."""
        thresholds = {k: v for k, v in (self.thresholds or {}).items() if k != "knn"}
        return Calibration(**{**self.to_dict(), "thresholds": thresholds or None})


def calibrate(logits: torch.Tensor, labels: torch.Tensor, *, score: str = DEFAULT_SCORE, tpr: float = DEFAULT_TPR,
              fitted_on: str = "val", tta: str | None = None, features: torch.Tensor | None = None,
              stats: FeatureStats | None = None) -> Calibration:
    """Fit the temperature (by NLL) and the unknown threshold (at ``tpr`` of these known images) on raw logits
    (computed with the flip ``tta`` named); with these images' ``features`` and the training features' ``stats``,
    every usable score's threshold (:func:`available_scores`), ``score`` the default.
    (:func:`twincar.evaluation.unknown.fit_unknown` also chooses the default score.)"""
    t = fit_temperature(logits, labels)
    names = available_scores(stats if features is not None else None)
    if score not in names:
        raise TwinCarError(f"score={score} cannot be fitted here: use one of {', '.join(names)}"
                           + ("" if stats is not None else " (the feature scores need the training features)"))
    thresholds = {s: fit_threshold(unknown_scores(logits, s, t, features=features, stats=stats), tpr) for s in names}
    ece_raw, nll_raw = ece_nll(logits, labels)
    ece, nll = ece_nll(logits, labels, t)
    return Calibration(temperature=t, score=score, threshold=thresholds[score], target_tpr=tpr,
                       fitted_on=fitted_on, images=len(labels), ece_raw=ece_raw, ece=ece, nll_raw=nll_raw, nll=nll,
                       tta=tta, thresholds=thresholds)


def fit_training_stats(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                       k: int | None = None) -> FeatureStats:
    """:func:`~twincar.inference.features.fit_feature_stats` of training embeddings (tensors), the k-NN bank kept
    (:meth:`~twincar.inference.features.FeatureStats.without_bank` drops it where ``knn`` is not chosen)."""
    return fit_feature_stats(features.detach().float().cpu().numpy(), labels.detach().cpu().numpy(), num_classes,
                             k=k)
