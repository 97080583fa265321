"""Evaluate a trained model: ``python -m twincar.eval ckpt=PATH [data.split=test|val] [data.root=PATH] [tta=flip]
[ood=auto|none|holdout|synthetic|FOLDER]``.

The model comes in through :class:`~twincar.inference.predictor.Predictor` (class names and preprocessing from the
file),
the images from :class:`~twincar.data.datamodule.CarsDataModule` built from the training run's data config
(the very val/test sets training used), and the numbers from :func:`twincar.models.metrics.classification_metrics`
(the code training logs with), so ``eval`` on a checkpoint's split reproduces what training logged.

It writes into its run directory ``reports/``: ``metrics.json``, ``per_class.csv``, ``confused_pairs.csv`` /
``.png``, ``top_losses.png``, ``reliability.png`` and ``predictions.csv``; with ``ood=`` (images of no known
class) also ``ood_scores.png`` and the ``ood/*`` open-set metrics. Confidence is the model's calibrated probability
(its temperature, :mod:`twincar.evaluation.calibration`): ``{split}/ece`` after temperature scaling, ``{split}/ece_raw``
before. ``evaluate(cfg)`` is the pure function; ``main`` the thin Hydra entry point. It never trains.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from twincar.data.classes import parse_car_name
from twincar.data.formats import Sample
from twincar.data.images import ImageReadError, find_images, load_sample, sample_label
from twincar.errors import exit_on_user_error
from twincar.evaluation.calibration import ece_nll, open_set_metrics
from twincar.evaluation.figures import confused_pairs_figure, reliability_diagram, score_histogram, top_losses_figure
from twincar.evaluation.loop import EvalError, EvalOutputs, collect_logits, data_config, eval_samples
from twincar.files import check_writable_dir, write_csv, write_json
from twincar.inference.engines import default_workers
from twincar.inference.predictor import Predictor
from twincar.models.metrics import calibration_bins, classification_metrics
from twincar.runs import resolve_launch_paths
from twincar.training.distributed import hydra_job_relaunch, log_file_on_rank_zero_only

log = logging.getLogger(__name__)

TTA_MODES = ("none", "flip")
REPORT_FILES = ("metrics.json", "per_class.csv", "confused_pairs.csv", "confused_pairs.png", "top_losses.png",
                "reliability.png", "predictions.csv")


def _image(sample: Sample) -> np.ndarray | None:
    """A sample's image for a figure (whole, uncropped); None when it cannot be read."""
    try:
        return load_sample(sample)
    except ImageReadError:
        return None


# -- numbers ---------------------------------------------------------------------------------------
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


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts: row = true class, column = predicted class."""
    return torch.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_rows(cm: torch.Tensor, class_names: list[str]) -> list[dict]:
    """Per class: support, precision, recall, F1 and the other class it is most often taken for."""
    rows = []
    tp, support, predicted = cm.diag(), cm.sum(1), cm.sum(0)
    off = cm.clone().fill_diagonal_(0)
    for k, name in enumerate(class_names):
        p = tp[k].item() / predicted[k].item() if predicted[k] else 0.0
        r = tp[k].item() / support[k].item() if support[k] else 0.0
        other = int(off[k].argmax())
        car = parse_car_name(name)
        rows.append({
            "label": k, "name": name, "make": car.make, "model": car.model, "year": car.year or "",
            "support": int(support[k]), "precision": round(p, 6), "recall": round(r, 6),
            "f1": round(2 * p * r / (p + r), 6) if p + r else 0.0,
            "most_confused_with": class_names[other] if off[k, other] else "",
            "most_confused_count": int(off[k, other]),
        })
    return rows


def relation(a: str, b: str) -> str:
    """How two class names differ: ``year`` (same family), ``model`` (same make) or ``make``."""
    ca, cb = parse_car_name(a), parse_car_name(b)
    return "year" if ca.family == cb.family else "model" if ca.make == cb.make else "make"


def confused_pairs(cm: torch.Tensor, class_names: list[str], preds: torch.Tensor, labels: torch.Tensor,
                   samples: list[Sample], top: int = 20) -> list[dict]:
    """The ``top`` class pairs most often confused (either way), with an example sample of each side
    (one it got wrong as the other, when there is one)."""
    both = (cm + cm.T).triu(diagonal=1)
    order = both.flatten().argsort(descending=True)[:top]
    pairs = []
    for flat in order.tolist():
        a, b = divmod(flat, len(class_names))
        if both[a, b] == 0:
            break

        def example(x: int, y: int) -> Sample | None:
            hits = ((labels == x) & (preds == y)).nonzero().flatten().tolist()
            hits = hits or (labels == x).nonzero().flatten().tolist()
            return samples[hits[0]] if hits else None

        pairs.append({
            "name_a": class_names[a], "name_b": class_names[b], "a_as_b": int(cm[a, b]), "b_as_a": int(cm[b, a]),
            "total": int(both[a, b]), "differ_in": relation(class_names[a], class_names[b]),
            "example_a": example(a, b), "example_b": example(b, a),
        })
    return pairs


PAIR_FIELDS = ["name_a", "name_b", "a_as_b", "b_as_a", "total", "differ_in", "example_a", "example_b"]


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

    probs = out.calibrated.softmax(1)
    preds = probs.argmax(1)
    cm = confusion_matrix(preds, out.labels, len(names))
    _write_csv(per_class_rows(cm, names), out_dir / "per_class.csv")

    pairs = confused_pairs(cm, names, preds, out.labels, out.samples, top_pairs)
    _write_csv([{**p, **{k: sample_label(p[k]) if p[k] else "" for k in ("example_a", "example_b")}} for p in pairs],
               out_dir / "confused_pairs.csv")
    confused_pairs_figure([{**p, **{k: p[k] and _image(p[k]) for k in ("example_a", "example_b")}} for p in pairs],
                          out_dir / "confused_pairs.png")

    loss = -probs[torch.arange(len(preds)), out.labels].clamp(min=1e-12).log()
    wrong = (preds != out.labels).nonzero().flatten()
    worst = wrong[loss[wrong].argsort(descending=True)][:top_losses].tolist()
    top_losses_figure([{"image": _image(out.samples[i]), "true": names[out.labels[i]], "pred": names[preds[i]],
                        "confidence": probs[i, preds[i]].item(), "loss": loss[i].item()} for i in worst],
                      out_dir / "top_losses.png")
    reliability_diagram(calibration_bins(out.calibrated, out.labels), out_dir / "reliability.png",
                        raw_bins=calibration_bins(out.logits, out.labels) if predictor.temperature != 1.0 else None)

    scores = predictor.unknown_scores(out.logits) if predictor.unknown_threshold is not None else None
    results = predictor.results(out.calibrated, [sample_label(s) for s in out.samples], topk=5, scores=scores)
    _write_csv([{
        "path": r.source, "label": int(lab), "true_name": names[lab], "pred_label": r.label, "pred_name": r.name,
        "confidence": round(r.confidence, 6), "correct": int(r.label == lab), "loss": round(loss[i].item(), 6),
        **({"known": int(r.known), "unknown_score": round(r.unknown_score, 6)} if scores is not None else {}),
        "top5": "; ".join(f"{n} ({p:.6f})" for n, p in r.topk),
    } for i, (r, lab) in enumerate(zip(results, out.labels.tolist(), strict=True))], out_dir / "predictions.csv")
    return metrics


# -- open set: images of no known class --------------------------------------------------------------
def unknown_images(predictor: Predictor, images: list, *, batch_size: int = 64,
                   bbox_margin: float | None = None) -> torch.Tensor:
    """Raw logits (N, K) of images of no known class (paths, or samples read as the test images are: cropped to
    their car box with ``bbox_margin``), unreadable ones left out."""
    if images and isinstance(images[0], Sample):
        return collect_logits(predictor, images, bbox_margin=bbox_margin, batch_size=batch_size, progress=False).logits
    raw = []
    for _, batch, errors in predictor.prepared_batches(images, batch_size=batch_size):
        for message in errors.values():
            log.warning("skipping unreadable out-of-distribution image: %s", message)
        if batch is not None:
            raw.append(torch.from_numpy(predictor.outputs(batch)[0]))
    if not raw:
        raise EvalError(f"none of the {len(images)} out-of-distribution image(s) could be read")
    return torch.cat(raw)


def open_set_report(predictor: Predictor, known: EvalOutputs, unknown_raw: torch.Tensor, out_dir: Path,
                    tpr: float = 0.95) -> dict[str, float]:
    """The ``ood/*`` metrics (:func:`~twincar.evaluation.calibration.open_set_metrics`) of the known images (their
    outputs)
    against the unknown images' raw logits, at the model's own threshold; draws ``ood_scores.png``."""
    known_scores, unknown = (torch.from_numpy(predictor.unknown_scores(x)) for x in (known.logits, unknown_raw))
    threshold = predictor.unknown_threshold
    if threshold is None:
        log.warning("the model carries no unknown threshold (python -m twincar.calibrate): ood/known_accepted, "
                    "ood/unknown_rejected and ood/acc_accepted are not reported")
    metrics = open_set_metrics(known_scores, unknown, threshold=threshold, tpr=tpr,
                               known_correct=known.logits.argmax(1) == known.labels)
    score_histogram(known_scores, unknown, out_dir / "ood_scores.png", threshold=threshold, score=predictor.score,
                    auroc=metrics["ood/auroc"])
    return metrics


def ood_option(cfg: DictConfig, data: dict) -> str | None:
    """What ``ood=`` asks for; ``auto`` (the default) is ``holdout`` when the data holds classes out
    (``data.open_set.holdout``), else nothing; ``none`` (or null) is nothing."""
    ood = str(cfg.get("ood") or "none")
    if ood == "auto":
        ood = "holdout" if (data.get("open_set") or {}).get("holdout") is not None else "none"
    return None if ood == "none" else ood


def ood_images(cfg: DictConfig, data: dict) -> list:
    """The out-of-distribution images ``ood=`` names: a folder (or files, globs) of images of no known class;
    ``holdout``: the test images of the classes ``data.open_set.holdout`` holds out (samples); or ``synthetic``: the
    unknown classes of the embedded dataset (``data.synthetic.unknown_classes``)."""
    ood = ood_option(cfg, data)
    if ood == "holdout":
        import hydra

        if (data.get("open_set") or {}).get("holdout") is None:
            raise EvalError("ood=holdout needs a model trained with held-out classes: pass the "
                            "data.open_set.holdout=N|FILE it was trained with")
        datamodule = hydra.utils.instantiate(data, _convert_="all")
        if not datamodule.open_set_samples:
            raise EvalError(f"ood=holdout: the data at {datamodule.root} has no labelled test image of the "
                            f"{len(datamodule.held_out_names)} held-out classes")
        return datamodule.open_set_samples
    if ood == "synthetic":
        from twincar.data.synthetic import SyntheticSpec, generate_unknown

        if not data.get("synthetic") or not data["synthetic"].get("unknown_classes"):
            raise EvalError("ood=synthetic needs the embedded dataset with unknown classes: pass "
                            "data.synthetic.unknown_classes=N (N > 0)")
        spec = SyntheticSpec(**data["synthetic"])
        return [s.path for s in generate_unknown(Path(data["root"]) / spec.fingerprint(), spec)]
    try:
        return find_images([str(ood)])
    except (OSError, ValueError) as e:
        raise EvalError(f"ood={ood}: {e}") from e


# -- the pure function and the entry point ------------------------------------------------------
def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate ``cfg.ckpt`` on ``cfg.data.split``; write ``reports/`` under ``cfg.paths.output_dir``."""
    resolve_launch_paths(cfg)
    log_file_on_rank_zero_only()
    if str(cfg.tta) not in TTA_MODES:
        raise EvalError(f"tta={cfg.tta} is not supported: use tta=none or tta=flip")
    check_writable_dir(Path(cfg.paths.output_dir) / "reports", "paths.output_dir")  # before the model loads
    processes = eval_processes(cfg)
    device = cfg.get("device", "auto") if processes is None else "cpu"  # Lightning gives each process its device
    predictor = Predictor.load(cfg.ckpt, cfg.get("classes"), device=device, tta=str(cfg.get("tta", "none")))
    index = None
    if cfg.get("index"):  # checked before any image is read
        from twincar.evaluation.neighbours import NeighbourIndex

        index = NeighbourIndex.load(cfg.index, predictor.class_names)
    data, split = data_config(cfg)
    out_dir = Path(cfg.paths.output_dir) / "reports"
    if "skipped_file" in data:  # on_corrupt=skip names what it leaves out here, not in the training run
        data["skipped_file"] = str(out_dir / "skipped.txt")
    samples, margin, left_out = eval_samples(data, split, predictor.class_names)
    batch_size = int(data.get("eval_batch_size") or data.get("batch_size") or 64)
    workers = int(data.get("num_workers") or 0)
    progress = bool(cfg.get("progress", True))
    if processes is None:
        log.info("evaluating %s on %d %s images (%s, tta=%s)", cfg.ckpt, len(samples), split, predictor.device,
                 cfg.tta)
        out = collect_logits(predictor, samples, bbox_margin=margin, batch_size=batch_size,
                             num_workers=min(workers, default_workers(predictor.device)), progress=progress,
                             embeddings=index is not None)
    else:
        from twincar.inference import parallel

        log.info("evaluating %s on %d %s images (%d processes: %d node(s) x %d %s, tta=%s)", cfg.ckpt, len(samples),
                 split, processes.world_size, processes.num_nodes, processes.devices, processes.accelerator, cfg.tta)
        out = parallel.collect_logits(predictor, samples, processes, bbox_margin=margin, batch_size=batch_size,
                                      num_workers=workers if processes.accelerator == "gpu" else 0, progress=progress,
                                      embeddings=index is not None)
        if out is None:  # not rank 0: rank 0 writes the reports
            return {}
    extra = {"checkpoint": str(cfg.ckpt), "split": split, "tta": str(cfg.tta), "images": len(out.samples),
             "skipped": left_out + [p for p, _ in out.skipped], "classes": len(predictor.class_names)}
    metrics = write_reports(out, predictor, out_dir, split=split, extra=extra,
                            top_losses=int(cfg.top_losses), top_pairs=int(cfg.confused_pairs))
    if index is not None:  # the embedding's own k-NN top-1 (against the training images) and Recall@1
        from twincar.evaluation.neighbours import knn_metrics

        metrics.update(knn_metrics(index, out.embeddings, out.labels, f"{split}/"))
        write_json(out_dir / "metrics.json", {**metrics, **extra})
    ood = ood_option(cfg, data)
    if ood:
        unknown = unknown_images(predictor, ood_images(cfg, data), batch_size=batch_size, bbox_margin=margin)
        metrics.update(open_set_report(predictor, out, unknown, out_dir))
        write_json(out_dir / "metrics.json", {**metrics, **extra, "ood": ood})
    log.info("\n%s", summary(metrics, split, out_dir))
    return metrics


def eval_processes(cfg: DictConfig):
    """The :class:`~twincar.inference.parallel.Processes` of ``trainer.devices`` x ``trainer.num_nodes`` when there
    are more
    than one (or torchrun or srun started this process as one of several), else None: the one-process loop."""
    from twincar.cluster import launched_processes

    trainer = cfg.get("trainer") or {}
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    if devices == 1 and nodes == 1 and launched_processes() is None:
        return None
    from twincar.inference.parallel import resolve_processes

    if cfg.get("device", "auto") != "auto":
        raise EvalError(f"device={cfg.device} names the device of a one-process run: with trainer.devices, choose "
                        "trainer.accelerator=cpu|gpu")
    return resolve_processes(devices, nodes, str(trainer.get("accelerator", "auto")))


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
        *([f"  at the unknown threshold: known accepted {f(metrics['ood/known_accepted'])}, unknown rejected "
           f"{f(metrics['ood/unknown_rejected'])}, top-1 of the known cars still named "
           f"{f(metrics['ood/acc_accepted'])}"] if "ood/acc_accepted" in metrics else []),
        f"Reports: {out_dir}",
    ])


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: a user error is printed as one sentence, exit code 1."""
    # more processes start as single runs of this job (trainer.devices)
    with exit_on_user_error(log), hydra_job_relaunch("twincar.eval"):
        evaluate(cfg)


if __name__ == "__main__":
    main()
