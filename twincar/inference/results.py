"""Scores and answers, the one definition (numpy, no torch), for every engine: flip TTA, temperature, softmax,
the unknown score and threshold, top-k and the :class:`Prediction` type.

Flip TTA (``tta="flip"``): the logits of the image and of its mirror image are averaged, then divided by the
temperature (:func:`flip_average`). Averaging logits (not probabilities) keeps calibration exact: the temperature
divides the averaged logits as it divides one view's, so it never changes the top-1, and the unknown score keeps its
scale.

The unknown score (:func:`unknown_scores`), higher = more like one of the known classes: of the logits,
``max_logit`` (Vaze et al., ICLR 2022), ``max_softmax`` (of the calibrated probabilities) or ``energy`` (``T *
logsumexp(logits / T)``, the negative free energy of Liu et al., 2020); of the embeddings, with the training features'
statistics (:mod:`twincar.inference.features`), ``knn``, ``mahalanobis`` or ``rel_mahalanobis``. Logit scores are
known to fail far from the training images (a picture of no car can get a confident logit); feature scores hold
better there. :mod:`twincar.evaluation.calibration` fits each score's threshold and chooses the model's default.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from twincar.data.classes import CarName, parse_car_name
from twincar.errors import TwinCarError
from twincar.inference.features import FEATURE_SCORES, FeatureStats

log = logging.getLogger(__name__)

LOGIT_SCORES = ("max_logit", "max_softmax", "energy")  # of the logits alone
SCORES = (*LOGIT_SCORES, *FEATURE_SCORES)  # the unknown scores, higher = more like a known class
DEFAULT_SCORE = "max_logit"  # of a model calibrated without feature statistics
TTA_MODES = (None, "none", "flip")  # "none" and None are the same: one pass


@dataclass
class Prediction:
    """One image's answer. ``error`` is set (and the rest empty) when the image could not be read."""

    source: str  # the file path, or "<PIL image>" / "<tensor>" for in-memory inputs
    name: str = ""  # the predicted class name, e.g. "BMW M3 Coupe 2012"
    label: int = -1  # its index in the class list
    confidence: float = 0.0  # (calibrated) softmax probability of the predicted class
    make: str = ""
    model: str = ""
    year: int | None = None
    topk: list[tuple[str, float]] = field(default_factory=list)  # (name, probability), most likely first
    error: str | None = None
    known: bool = True  # False: the unknown score is below the model's threshold, not one of its classes
    unknown_score: float | None = None  # the score compared with the threshold (None: no threshold in use)
    num_classes: int = 0  # how many classes the model knows (for the "not one of the N" answer)
    neighbours: list[tuple[str, str, float]] = field(default_factory=list)  # nearest training (image, class, cosine)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def answer(self) -> str:
        """The class name, or, for an unknown car, that it is not one of the known classes."""
        return self.name if self.known else unknown_answer(self.num_classes)

    def to_row(self, topk: int | None = None, open_set: bool = False,
               neighbours: int | None = None) -> dict[str, object]:
        """A flat row: the original TwinCars columns ``image, make, model, year, confidence``, then
        ``class``, ``label``, ``top{i}_class``/``top{i}_prob`` for i = 1..topk, ``nn{i}_image``/``_class``/
        ``_similarity`` for i = 1..neighbours, with ``open_set`` ``known`` and ``unknown_score``, and ``error``
        (None: as many top-k and neighbour columns as this prediction has; missing cells are empty). An unknown car
        has empty make/model/year/label, ``class`` says it is not one of the known classes, and the top-k columns
        keep its closest classes."""
        k = len(self.topk) if topk is None else topk
        n = len(self.neighbours) if neighbours is None else neighbours
        known = self.known or not self.ok
        row: dict[str, object] = {
            "image": self.source, "make": self.make if known else "", "model": self.model if known else "",
            "year": "" if self.year is None or not known else self.year,
            "confidence": round(self.confidence, 6) if self.ok else "",
            "class": self.answer if self.ok else "", "label": self.label if self.ok and known else "",
        }
        for i in range(k):
            name, prob = self.topk[i] if i < len(self.topk) else ("", "")
            row[f"top{i + 1}_class"] = name
            row[f"top{i + 1}_prob"] = round(prob, 6) if prob != "" else ""
        for i in range(n):
            image, name, sim = self.neighbours[i] if i < len(self.neighbours) else ("", "", "")
            row[f"nn{i + 1}_image"], row[f"nn{i + 1}_class"] = image, name
            row[f"nn{i + 1}_similarity"] = round(sim, 6) if sim != "" else ""
        if open_set:
            row["known"] = ("true" if self.known else "false") if self.ok else ""
            row["unknown_score"] = "" if self.unknown_score is None else round(self.unknown_score, 6)
        row["error"] = self.error or ""
        return row


def check_tta(tta: str | None) -> str | None:
    """``tta`` as a predictor keeps it: ``"flip"`` or None (one pass); anything else is one sentence."""
    if tta not in TTA_MODES:
        raise TwinCarError(f"--tta must be 'flip' or left out, got {tta!r}")
    return None if tta == "none" else tta


def flip_average(out: np.ndarray, temperature: float, tta: str | None) -> np.ndarray:
    """The network's outputs (N, K), or (2N, K) with flip TTA (images, then mirror images: averaged), divided by
    ``temperature``."""
    if tta == "flip":
        plain, flipped = np.split(out, 2)
        out = (plain + flipped) / 2
    return out / np.float32(temperature) if temperature != 1.0 else out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, K) logits, in their dtype."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def unknown_scores(logits: np.ndarray, score: str = DEFAULT_SCORE, temperature: float = 1.0, *,
                   features: np.ndarray | None = None, stats: FeatureStats | None = None) -> np.ndarray:
    """(N,) unknown scores (float64) of raw logits (N, K), higher = more like one of the known classes (see the
    module docstring); a feature score needs the images' L2-normalised ``features`` (N, D) and the training
    features' ``stats``."""
    if score not in SCORES:
        raise TwinCarError(f"unknown score {score!r}: use one of {', '.join(SCORES)}")
    if score in FEATURE_SCORES:
        if stats is None:
            raise TwinCarError(f"the {score} score needs the training features' statistics, which this model does "
                               "not carry: python -m twincar.calibrate ckpt=MODEL fits them")
        if features is None:
            raise TwinCarError(f"the {score} score needs the images' embeddings")
        return stats.scores(features, score)
    z = np.asarray(logits, np.float64)
    if score == "max_logit":
        return z.max(axis=1)
    if score == "max_softmax":
        return softmax(z / temperature).max(axis=1)
    m = (z / temperature).max(axis=1, keepdims=True)
    return temperature * (m[:, 0] + np.log(np.exp(z / temperature - m).sum(axis=1)))


def unknown_threshold(unknown: str | float | None, calibration: dict | None, tta: str | None = None,
                      score: str | None = None) -> float | None:
    """The unknown threshold ``--unknown`` asks for: ``auto`` -> the threshold of the model's ``calibration`` for
    ``score`` (None: its default score; None when it has none), ``off`` (or None) -> None, a number -> that number.
    A threshold fitted with another flip TTA than ``tta`` is used with a warning: averaging the views shifts the
    scores a little."""
    if unknown is None or unknown == "off":
        return None
    if unknown == "auto":
        calibration = calibration or {}
        if score is None or score == calibration.get("score", DEFAULT_SCORE):
            threshold = calibration.get("threshold")
        else:
            threshold = (calibration.get("thresholds") or {}).get(score)
            if threshold is None and calibration:
                have = ", ".join(sorted(calibration.get("thresholds") or [calibration.get("score")]))
                raise TwinCarError(f"--unknown-score {score}: the model has no threshold for it (it has {have}): "
                                   "python -m twincar.calibrate ckpt=MODEL fits every score's (keep_knn=true: knn's "
                                   "too)")
        fitted = calibration.get("tta") or None
        if threshold is not None and fitted != (tta or None):
            log.warning("the unknown threshold was fitted with tta=%s and is used with tta=%s: the scores shift a "
                        "little (python -m twincar.calibrate tta=%s refits it)", fitted or "none", tta or "none",
                        tta or "none")
        return threshold
    try:
        value = float(unknown)
    except (TypeError, ValueError) as e:
        raise TwinCarError(
            f"--unknown {unknown} is not auto, off or a number (a threshold on the unknown score)") from e
    if not math.isfinite(value):
        raise TwinCarError(f"--unknown {unknown} must be a finite number")
    return value


def unknown_answer(num_classes: int) -> str:
    """What TwinCar answers for a car that is none of its classes."""
    return f"not one of the {num_classes} known classes" if num_classes else "not one of the known classes"


def predictions(logits: np.ndarray, sources: Sequence[str], class_names: Sequence[str], topk: int = 5, *,
                scores: np.ndarray | None = None, threshold: float | None = None,
                parsed: Sequence[CarName] | None = None) -> list[Prediction]:
    """:class:`Prediction` objects from (calibrated) logits (N, K): the top-k names and probabilities (ties in class
    order), make/model/year (``parsed``: the class names already parsed); with the images' unknown ``scores`` and a
    ``threshold``, ``known`` and ``unknown_score`` too."""
    probs = softmax(np.asarray(logits, np.float64)).astype(np.float32)
    k = min(topk, probs.shape[1])
    score_list = np.asarray(scores).tolist() if scores is not None and threshold is not None else [None] * len(sources)
    out = []
    for src, p, score in zip(sources, probs, score_list, strict=True):
        idx = np.argsort(-p, kind="stable")[:k].tolist()
        car = parsed[idx[0]] if parsed is not None else parse_car_name(class_names[idx[0]])
        out.append(Prediction(source=src, name=car.full, label=idx[0], confidence=float(p[idx[0]]),
                              make=car.make, model=car.model, year=car.year,
                              topk=[(class_names[i], float(p[i])) for i in idx],
                              known=score is None or score >= threshold, unknown_score=score,
                              num_classes=len(class_names)))
    return out


def check_calibration(calibration: dict | None) -> dict | None:
    """A calibration dict (temperature, score, threshold, tta...) checked as every consumer reads it; None for
    none (an empty one is none)."""
    if not calibration:
        return None
    if not isinstance(calibration, dict):
        raise TwinCarError(f"a calibration must be a mapping (temperature, score, threshold), got {calibration!r}")
    temperature = calibration.get("temperature", 1.0)
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and math.isfinite(temperature)
            and temperature > 0):
        raise TwinCarError(f"calibration temperature must be a positive number, got {temperature!r}")
    score = calibration.get("score", DEFAULT_SCORE)
    if score not in SCORES:
        raise TwinCarError(f"calibration score {score!r} is not one of {', '.join(SCORES)}")
    thresholds = calibration.get("thresholds") or {}
    if not isinstance(thresholds, dict) or any(name not in SCORES for name in thresholds):
        raise TwinCarError(f"calibration thresholds must map scores ({', '.join(SCORES)}) to numbers, got "
                           f"{thresholds!r}")
    features = calibration.get("features")
    if features is not None and not (isinstance(features, dict) and isinstance(features.get("file"), str)):
        raise TwinCarError(f"calibration features must name the statistics file beside the model, got {features!r}")
    return dict(calibration)
