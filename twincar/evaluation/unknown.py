"""The "unknown car" answer fitted to a model, at the end of training and by ``python -m twincar.calibrate``.

:func:`fit_model_unknown` embeds the training images and fits the training features' statistics
(:func:`~twincar.evaluation.calibration.fit_training_stats`: class means, shared and background covariances, and the
k-NN bank), fits the temperature and every score's threshold at ``tpr`` of the validation images
(:func:`~twincar.evaluation.calibration.calibrate`), and chooses the default score by its AUROC, validation images
against images training never saw (:func:`fit_unknown`): the embedded set's unknown classes and generated images of
no car at all (:func:`write_far_images`, near and far), or the folder a user names. The k-NN bank is kept only
where ``knn`` is the chosen score or is asked for (it is the size of the training set's embeddings).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from twincar.data.formats import Sample
from twincar.errors import TwinCarError
from twincar.evaluation.calibration import (
    DEFAULT_TPR,
    Calibration,
    available_scores,
    calibrate,
    choose_score,
    fit_training_stats,
    unknown_scores,
)
from twincar.evaluation.loop import collect_logits
from twincar.evaluation.open_set import auroc
from twincar.files import atomic_path
from twincar.inference.features import FeatureStats
from twincar.inference.results import DEFAULT_SCORE
from twincar.models.card import write_unknown_stats
from twincar.models.loading import write_calibration

log = logging.getLogger(__name__)

FAR_KINDS = ("noise", "gradient", "shapes")
FAR_COUNT, FAR_SIZE = 60, 128  # the generated far images of the default unknown set


def far_image(kind: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One ``size`` x ``size`` RGB image of no car, of ``kind`` (one of :data:`FAR_KINDS`): colour noise, a smooth
    gradient, or flat shapes on a plain ground."""
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    if kind == "gradient":
        t = np.linspace(0, 1, size)
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        ramp = t[None, :, None] if rng.random() < 0.5 else t[:, None, None]
        return Image.fromarray((a + (b - a) * np.broadcast_to(ramp, (size, size, 1))).astype(np.uint8))
    image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 5))):
        x0, y0 = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
        x1, y1 = x0 + int(rng.integers(size // 8, size // 2)), y0 + int(rng.integers(size // 8, size // 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    return image


def write_far_images(out: str | Path, count: int = FAR_COUNT, size: int = FAR_SIZE, seed: int = 0) -> list[Path]:
    """Write ``count`` images of no car (:func:`far_image`, the kinds in turn; the same for the same seed) into
    ``out`` as JPEGs, each atomically; files already there are kept. Returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        kind = FAR_KINDS[i % len(FAR_KINDS)]
        path = out / f"{kind}_{i:04d}.jpg"
        image = far_image(kind, rng, size)  # drawn even when the file exists: the next ones stay the same
        if not path.is_file():
            with atomic_path(path) as tmp:
                image.save(tmp, "JPEG", quality=90)
        paths.append(path)
    return paths


def image_outputs(predictor, images: Sequence, *, batch_size: int = 64, bbox_margin: float | None = None,
                  embeddings: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw logits (N, K) and, with ``embeddings``, L2-normalised features (N, D) of images of no known class:
    labelled samples (read as the test images are: cropped to their car box with ``bbox_margin``) and paths, in that
    order; unreadable ones left out (with a warning)."""
    samples = [x for x in images if isinstance(x, Sample)]
    paths = [x for x in images if not isinstance(x, Sample)]
    logits, feats = [], []
    if samples:
        out = collect_logits(predictor, samples, bbox_margin=bbox_margin, batch_size=batch_size, progress=False,
                             embeddings=embeddings)
        logits.append(out.logits)
        feats.append(out.embeddings)
    for _, batch, errors in predictor.prepared_batches(paths, batch_size=batch_size):
        for message in errors.values():
            log.warning("skipping unreadable out-of-distribution image: %s", message)
        if batch is not None:
            raw, _, *features = (predictor.outputs_with_embeddings if embeddings else predictor.outputs)(batch)
            logits.append(torch.from_numpy(raw))
            feats.append(torch.from_numpy(features[0]) if features else None)
    if not logits:
        raise TwinCarError(f"none of the {len(images)} out-of-distribution image(s) could be read")
    return torch.cat(logits), (torch.cat(feats) if embeddings else None)


def fit_unknown(logits: torch.Tensor, labels: torch.Tensor, *, features: torch.Tensor | None = None,
                stats: FeatureStats | None = None, unknown_logits: torch.Tensor | None = None,
                unknown_features: torch.Tensor | None = None, score: str | None = None, keep_knn: bool = False,
                tpr: float = DEFAULT_TPR, fitted_on: str = "val", tta: str | None = None,
                selected_on: str = "") -> tuple[Calibration, FeatureStats | None]:
    """The calibration of known images' raw ``logits`` (:func:`~twincar.evaluation.calibration.calibrate`: the
    temperature, every usable score's threshold), with each score's AUROC against images of no known class
    (``unknown_logits``, ``unknown_features``) and the best as the default (``score`` forces one); and the statistics
    to store, the k-NN bank dropped unless ``knn`` is the default or ``keep_knn``."""
    names = available_scores(stats if features is not None else None)
    aurocs = None
    if unknown_logits is not None and len(unknown_logits):
        base = calibrate(logits, labels, tpr=tpr, fitted_on=fitted_on, tta=tta, features=features, stats=stats)
        aurocs = {s: auroc(unknown_scores(logits, s, base.temperature, features=features, stats=stats),
                           unknown_scores(unknown_logits, s, base.temperature, features=unknown_features,
                                          stats=stats))
                  for s in names}
    chosen = score or (choose_score(aurocs) if aurocs else DEFAULT_SCORE)
    if chosen not in names:
        raise TwinCarError(f"score={chosen} cannot be fitted here: use one of {', '.join(names)}"
                           + ("" if stats is not None else " (the feature scores need the training features)"))
    calibration = calibrate(logits, labels, score=chosen, tpr=tpr, fitted_on=fitted_on, tta=tta, features=features,
                            stats=stats)
    calibration = Calibration(**{**calibration.to_dict(), "auroc": aurocs,
                                 "selected_on": selected_on if aurocs else ""})
    if stats is not None and stats.bank is not None and chosen != "knn" and not keep_knn:
        stats, calibration = stats.without_bank(), calibration.without_knn()
    return calibration, stats


def fit_model_unknown(predictor, val_samples: Sequence[Sample], *, train_samples: Sequence[Sample] | None = None,
                      unknown: Sequence = (), bbox_margin: float | None = None, batch_size: int = 64,
                      num_workers: int = 0, progress: bool = False, score: str | None = None,
                      keep_knn: bool = False, k: int | None = None, tpr: float = DEFAULT_TPR,
                      fitted_on: str = "val", selected_on: str = ""):
    """Fit a model's unknown answer (module docstring) with ``predictor`` (uncalibrated): the training features'
    statistics from ``train_samples`` (None, or a model without embeddings such as an ONNX file exported without
    its ``features`` output: the logit scores only), the thresholds on ``val_samples``, the default score on
    ``unknown`` (samples and paths of images of no known class; none: ``score`` or max-logit). Returns
    ``(calibration, statistics or None, the val outputs)``."""
    feats = bool(train_samples) and (predictor.engine.has_features if predictor.is_onnx
                                     else hasattr(predictor.model, "forward_head"))
    val = collect_logits(predictor, val_samples, bbox_margin=bbox_margin, batch_size=batch_size,
                         num_workers=num_workers, progress=progress, embeddings=feats)
    stats = None
    if feats:
        train = collect_logits(predictor, train_samples, bbox_margin=bbox_margin, batch_size=batch_size,
                               num_workers=num_workers, progress=progress, embeddings=True)
        stats = fit_training_stats(train.embeddings, train.labels, len(predictor.class_names), k=k)
        log.info("training-feature statistics of %d images (%d-d embeddings, knn k=%d)", len(train.labels),
                 stats.dim, stats.k)
    unknown_logits = unknown_features = None
    if unknown:
        unknown_logits, unknown_features = image_outputs(predictor, unknown, batch_size=batch_size,
                                                         bbox_margin=bbox_margin, embeddings=feats)
    calibration, stats = fit_unknown(val.logits, val.labels, features=val.embeddings, stats=stats,
                                     unknown_logits=unknown_logits, unknown_features=unknown_features, score=score,
                                     keep_knn=keep_knn, tpr=tpr, fitted_on=fitted_on, tta=predictor.tta,
                                     selected_on=selected_on)
    if calibration.auroc:
        log.info("unknown scores, AUROC against %s: %s; default: %s", selected_on or "images of no known class",
                 ", ".join(f"{s} {v:.3f}" for s, v in calibration.auroc.items()), calibration.score)
    return calibration, stats, val


def store_calibration(path: str | Path, calibration: Calibration, stats: FeatureStats | None,
                      fingerprint: str | None = None) -> tuple[Calibration, Path]:
    """Store ``calibration`` with the model file at ``path`` (:func:`~twincar.models.loading.write_calibration`),
    the training features' ``stats`` beside it (:func:`~twincar.models.card.write_unknown_stats`, named and
    fingerprinted by the calibration's ``features``); ``fingerprint``: the model's, recorded with the calibration
    (read from the file when not given). Returns the calibration as stored and the file written."""
    entry = None if stats is None else write_unknown_stats(path, stats.arrays())
    calibration = Calibration(**{**calibration.to_dict(), "features": entry})
    return calibration, write_calibration(path, calibration.to_dict(), fingerprint)
