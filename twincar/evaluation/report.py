"""The report files of one evaluation (``python -m twincar.eval``) and its console summary.

:func:`write_reports` writes ``metrics.json`` (:func:`compute_metrics`: the metrics training logs with),
``per_class.csv``, ``confused_pairs.csv`` / ``.png`` and ``top_losses.png`` (the views of an
:class:`~twincar.evaluation.interpret.Interpretation`), ``reliability.png`` and ``predictions.csv``;
:func:`open_set_report` the ``ood/*`` metrics and ``ood_scores.png``; :func:`summary` the lines eval prints.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from twincar.data.formats import Sample
from twincar.data.images import ImageReadError, load_sample, sample_label
from twincar.evaluation.calibration import ece_nll
from twincar.evaluation.figures import confused_pairs_figure, reliability_diagram, score_histogram, top_losses_figure
from twincar.evaluation.interpret import Interpretation
from twincar.evaluation.loop import EvalOutputs
from twincar.evaluation.open_set import open_set_metrics
from twincar.files import write_csv, write_json
from twincar.inference.predictor import Predictor
from twincar.models.metrics import classification_metrics, reliability_bins

log = logging.getLogger(__name__)

REPORT_FILES = ("metrics.json", "per_class.csv", "confused_pairs.csv", "confused_pairs.png", "top_losses.png",
                "reliability.png", "predictions.csv")
PAIR_FIELDS = ["name_a", "name_b", "a_as_b", "b_as_a", "total", "differ_in", "example_a", "example_b"]


def report_image(sample: Sample) -> np.ndarray | None:
    """A sample's image for a figure (whole, uncropped); None when it cannot be read."""
    try:
        return load_sample(sample)
    except ImageReadError:
        return None


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str], split: str,
                    raw_logits: torch.Tensor | None = None) -> dict:
    """``{split}/name`` metrics, computed by the collection training logs with; ``{split}/loss`` is the NLL.
    ``logits`` are the predictor's (calibrated) ones; with ``raw_logits`` (temperature 1) also ``{split}/ece_raw``
    and ``{split}/nll_raw``, the calibration before temperature scaling (and ``{split}/loss`` is ``nll_raw``)."""
    metrics = classification_metrics(len(class_names), prefix=f"{split}/", class_names=class_names)
    metrics.update(logits, labels)
    values = {k: float(v) for k, v in metrics.compute().items()}
    values[f"{split}/loss"] = values[f"{split}/nll"]
    if raw_logits is not None:  # the loss is the training objective's: the NLL before temperature scaling
        values[f"{split}/ece_raw"], values[f"{split}/nll_raw"] = ece_nll(raw_logits, labels)
        values[f"{split}/loss"] = values[f"{split}/nll_raw"]
    return dict(sorted(values.items()))


def _write_csv(rows: list[dict], path: Path, fields: list[str] | None = None) -> Path:
    return write_csv(path, rows, fields or (list(rows[0]) if rows else PAIR_FIELDS))


def write_reports(out: EvalOutputs, predictor: Predictor, out_dir: Path, *, split: str, extra: dict,
                  top_losses: int = 16, top_pairs: int = 20) -> dict:
    """Every report file of one evaluation into ``out_dir``; returns the metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = predictor.class_names
    metrics = compute_metrics(out.calibrated, out.labels, names, split, raw_logits=out.logits)
    metrics[f"{split}/temperature"] = predictor.temperature
    write_json(out_dir / "metrics.json", {**metrics, **extra})

    interp = Interpretation.from_outputs(out, names)
    _write_csv(interp.per_class(), out_dir / "per_class.csv")
    pairs = interp.confused_pairs(top_pairs)
    _write_csv([{**p, **{k: sample_label(p[k]) if p[k] else "" for k in ("example_a", "example_b")}} for p in pairs],
               out_dir / "confused_pairs.csv")
    confused_pairs_figure([{**p, **{k: p[k] and report_image(p[k]) for k in ("example_a", "example_b")}}
                           for p in pairs], out_dir / "confused_pairs.png")
    top_losses_figure([{"image": report_image(t["sample"]), **{k: t[k] for k in ("true", "pred", "confidence", "loss")}}
                       for t in interp.top_losses(top_losses)], out_dir / "top_losses.png")
    reliability_diagram(reliability_bins(out.calibrated, out.labels), out_dir / "reliability.png",
                        raw_bins=reliability_bins(out.logits, out.labels) if predictor.temperature != 1.0 else None)

    scores = predictor.unknown_scores(out.logits, out.embeddings) if predictor.unknown_threshold is not None else None
    results = predictor.results(out.calibrated, [sample_label(s) for s in out.samples], topk=5, scores=scores)
    loss = interp.losses
    _write_csv([{
        "path": r.source, "label": int(lab), "true_name": names[lab], "pred_label": r.label, "pred_name": r.name,
        "confidence": round(r.confidence, 6), "correct": int(r.label == lab), "loss": round(loss[i].item(), 6),
        **({"known": int(r.known), "unknown_score": round(r.unknown_score, 6)} if scores is not None else {}),
        "top5": "; ".join(f"{n} ({p:.6f})" for n, p in r.topk),
    } for i, (r, lab) in enumerate(zip(results, out.labels.tolist(), strict=True))], out_dir / "predictions.csv")
    return metrics


def open_set_report(predictor: Predictor, known: EvalOutputs, unknown_raw: torch.Tensor, out_dir: Path,
                    tpr: float = 0.95, unknown_features: torch.Tensor | None = None) -> dict[str, float]:
    """The ``ood/*`` metrics (:func:`~twincar.evaluation.open_set.open_set_metrics`) of the known images (their
    outputs) against the unknown images' raw logits (and embeddings, for the feature scores), of the model's
    unknown score at its own threshold; draws ``ood_scores.png``. Every other score the model can compute is
    reported beside it, side by side (``ood/auroc_<score>``, ``ood/fpr95_<score>``, and at its stored threshold
    ``ood/known_accepted_<score>``, ``ood/unknown_rejected_<score>``), each with its ``ood_scores_<score>.png``."""
    from twincar.evaluation.calibration import available_scores

    feats = known.embeddings is not None and unknown_features is not None
    threshold = predictor.unknown_threshold
    if threshold is None:
        log.warning("the model carries no unknown threshold (python -m twincar.calibrate): ood/known_accepted, "
                    "ood/unknown_rejected and ood/acc_accepted are not reported")
    thresholds = dict((predictor.calibration or {}).get("thresholds") or {})
    metrics: dict[str, float] = {}
    for score in available_scores(predictor.feature_stats if feats else None):
        known_scores, unknown = (torch.from_numpy(predictor.unknown_scores(x, f, score)) for x, f in (
            (known.logits, known.embeddings), (unknown_raw, unknown_features)))
        default = score == predictor.score
        own = threshold if default else thresholds.get(score)
        m = open_set_metrics(known_scores, unknown, threshold=own, tpr=tpr,
                             known_correct=known.logits.argmax(1) == known.labels)
        if default:
            metrics.update(m)
        metrics.update({f"{k}_{score}": v for k, v in m.items() if k not in ("ood/images", "ood/acc_accepted")})
        score_histogram(known_scores, unknown, out_dir / f"ood_scores_{score}.png", threshold=own, score=score,
                        auroc=m["ood/auroc"])
        if default:
            score_histogram(known_scores, unknown, out_dir / "ood_scores.png", threshold=own, score=score,
                            auroc=m["ood/auroc"])
    return metrics


def summary(metrics: dict[str, float], split: str, out_dir: Path) -> str:
    """A few lines for the console: accuracy, the fine-grained view, calibration, where the reports are."""
    m = {k.removeprefix(f"{split}/"): v for k, v in metrics.items()}

    def f(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{x:.3f}"

    return "\n".join([
        f"{split}: top-1 {f(m['acc'])}, top-5 {f(m.get('acc_top5', float('nan')))}, macro F1 {f(m['f1_macro'])}",
        f"  make {f(m['acc_make'])}, family (make + model) {f(m['acc_family'])}, year {f(m['acc_year'])} "
        f"(+-1: {f(m['acc_year_pm1'])}), year in family {f(m['acc_year_in_family'])}",
        f"  errors: wrong year only {f(m['err_wrong_year'])}, wrong model {f(m['err_wrong_model'])}, "
        f"wrong make {f(m['err_wrong_make'])}",
        f"  calibration: ECE {f(m['ece'])}, NLL {f(m['nll'])} (before temperature scaling: ECE "
        f"{f(m.get('ece_raw', float('nan')))}, NLL {f(m.get('nll_raw', float('nan')))}; "
        f"T = {m.get('temperature', 1.0):.3f})",
        *([f"  embedding: k-NN top-1 {f(m['knn_acc'])}, Recall@1 {f(m['recall_at_1'])}"] if "knn_acc" in m else []),
        *([f"  open set ({metrics['ood/images']:.0f} unknown images): AUROC {f(metrics['ood/auroc'])}, FPR95 "
           f"{f(metrics['ood/fpr95'])}"] if "ood/auroc" in metrics else []),
        *(["  AUROC per score: " + ", ".join(f"{k.removeprefix('ood/auroc_')} {f(v)}" for k, v in metrics.items()
                                               if k.startswith("ood/auroc_"))] if "ood/auroc" in metrics else []),
        *([f"  at the unknown threshold: known accepted {f(metrics['ood/known_accepted'])}, unknown rejected "
           f"{f(metrics['ood/unknown_rejected'])}, top-1 of the known cars still named "
           f"{f(metrics['ood/acc_accepted'])}"] if "ood/acc_accepted" in metrics else []),
        f"Reports: {out_dir}",
    ])
