"""The library side of the evaluation tools, each one function of a composed Hydra config (the tools parse it and
call these): :func:`evaluate` (``python -m twincar.eval``), :func:`calibrate_model` (``python -m twincar.calibrate``)
and :func:`build_neighbour_index` (``python -m twincar.index``). Each resolves the run directory, loads the model
into a :class:`~twincar.inference.predictor.Predictor`, reads the split's labelled images through
:func:`~twincar.evaluation.loop.eval_samples` and runs the one loop over them
(:func:`~twincar.evaluation.loop.collect_logits`). None of them trains.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, open_dict

from twincar.data.images import find_images
from twincar.evaluation.calibration import Calibration
from twincar.evaluation.figures import reliability_diagram
from twincar.evaluation.loop import EvalError, collect_logits, collect_logits_on, data_config, eval_samples
from twincar.evaluation.report import open_set_report, summary, write_reports
from twincar.files import check_writable_dir, write_json
from twincar.inference.engines import default_workers
from twincar.inference.predictor import Predictor
from twincar.inference.results import SCORES
from twincar.models.metrics import reliability_bins
from twincar.runs import resolve_launch_paths

log = logging.getLogger(__name__)

TTA_MODES = ("none", "flip")
MIN_CALIBRATION_IMAGES = 5  # fewer labelled images are refused by twincar.calibrate (docs/reliability.md)


# -- eval -----------------------------------------------------------------------------------------------
def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate ``cfg.ckpt`` on ``cfg.data.split``; write ``reports/`` under ``cfg.paths.output_dir``
    (:func:`~twincar.evaluation.report.write_reports`) and log the :func:`~twincar.evaluation.report.summary`.
    Returns the metrics ({} on a process other than rank 0 of several)."""
    resolve_launch_paths(cfg)
    if str(cfg.tta) not in TTA_MODES:
        raise EvalError(f"tta={cfg.tta} is not supported: use tta=none or tta=flip")
    check_writable_dir(Path(cfg.paths.output_dir) / "reports", "paths.output_dir")  # before the model loads
    processes = eval_processes(cfg)
    device = cfg.get("device", "auto") if processes is None else "cpu"  # Lightning gives each process its device
    predictor = Predictor.load(cfg.ckpt, cfg.get("classes"), device=device, tta=str(cfg.get("tta", "none")))
    index = None
    if cfg.get("index"):  # checked before any image is read
        from twincar.evaluation.neighbours import NeighbourIndex

        index = NeighbourIndex.load(cfg.index, predictor.class_names, predictor.fingerprint)
    data, split = data_config(cfg)
    # the embeddings: for the neighbour index, and for the feature unknown scores where the model has their statistics
    features = index is not None or (predictor.feature_stats is not None and ood_option(cfg, data) is not None
                                     and (not predictor.is_onnx or predictor.engine.has_features))
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
                             embeddings=features)
    else:
        log.info("evaluating %s on %d %s images (%d processes: %d node(s) x %d %s, tta=%s)", cfg.ckpt, len(samples),
                 split, processes.world_size, processes.num_nodes, processes.devices, processes.accelerator, cfg.tta)
        out = collect_logits_on(predictor, samples, processes, bbox_margin=margin, batch_size=batch_size,
                                num_workers=workers if processes.accelerator == "gpu" else 0, progress=progress,
                                embeddings=features)
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
        from twincar.evaluation.unknown import image_outputs

        unknown, unknown_features = image_outputs(predictor, ood_images(cfg, data), batch_size=batch_size,
                                                  bbox_margin=margin, embeddings=features)
        metrics.update(open_set_report(predictor, out, unknown, out_dir, unknown_features=unknown_features))
        write_json(out_dir / "metrics.json", {**metrics, **extra, "ood": ood})
    log.info("\n%s", summary(metrics, split, out_dir))
    return metrics


def eval_processes(cfg: DictConfig):
    """The :class:`~twincar.inference.parallel.Processes` of ``trainer.devices`` x ``trainer.num_nodes`` when there
    are more than one (or torchrun or srun started this process as one of several), else None: the one-process
    loop."""
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


# -- eval's open set: images of no known class ----------------------------------------------------------------
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


# -- calibrate ---------------------------------------------------------------------------------------------
def calibrate_model(cfg: DictConfig) -> Calibration:
    """Fit ``cfg.ckpt``'s calibration on ``cfg.data.split`` (:func:`~twincar.evaluation.unknown.fit_model_unknown`:
    the temperature, the training features' statistics, every score's threshold, the default score chosen on the
    images ``cfg.ood`` names) and store it with the model file (unless ``dry_run``); writes ``calibration.json`` and
    ``reliability.png`` (before and after) into ``cfg.paths.output_dir``."""
    import tempfile

    from twincar.evaluation.unknown import fit_model_unknown, store_calibration, write_far_images

    resolve_launch_paths(cfg)
    score = str(cfg.get("score") or "auto")
    if score != "auto" and score not in SCORES:
        raise EvalError(f"score={score} is not an unknown score: use auto or one of {', '.join(SCORES)}")
    if not 0 < float(cfg.tpr) <= 1:
        raise EvalError(f"tpr={cfg.tpr} must be a share of images in (0, 1], e.g. tpr=0.95")
    if str(cfg.tta) not in TTA_MODES:
        raise EvalError(f"tta={cfg.tta} is not supported: use tta=none or tta=flip")
    out_dir = Path(cfg.paths.output_dir)
    check_writable_dir(out_dir, "paths.output_dir")
    # unknown="off": the old unknown-score statistics are not needed (nor read) to fit new ones
    loaded = Predictor.load(cfg.ckpt, cfg.get("classes"), device=cfg.get("device", "auto"), tta=str(cfg.tta),
                            unknown="off")
    previous = loaded.calibration
    predictor = loaded.with_calibration(None)  # fitted on raw logits, whatever the file carried before
    data, split = data_config(cfg)
    if "skipped_file" in data:
        data["skipped_file"] = str(out_dir / "skipped.txt")
    samples, margin, _ = eval_samples(data, split, predictor.class_names)
    train, _, _ = eval_samples(data, "train", predictor.class_names)  # the feature scores: their statistics
    batch_size = int(data.get("eval_batch_size") or data.get("batch_size") or 64)
    check_calibration_split(torch.tensor([sample.label for sample in samples]), split, cfg.ckpt)
    ood = str(cfg.get("ood") or "none")
    with tempfile.TemporaryDirectory(prefix="twincar-far-") as far_dir:
        if ood == "auto":
            unknown = calibration_unknown_images(cfg, data)
            far = write_far_images(far_dir)
            selected_on = f"{len(unknown)} images of unknown classes and {len(far)} generated images of no car"
            unknown = [*unknown, *far]
        elif ood == "none":
            unknown, selected_on = [], ""
        else:
            unknown, selected_on = ood_images(cfg, data), f"the images of {ood}"
        calibration, stats, out = fit_model_unknown(
            predictor, samples, train_samples=train, unknown=unknown, bbox_margin=margin, batch_size=batch_size,
            num_workers=min(int(data.get("num_workers") or 0), default_workers(predictor.device)),
            progress=bool(cfg.get("progress", True)), score=None if score == "auto" else score,
            keep_knn=bool(cfg.get("keep_knn")), k=cfg.get("knn_k"), tpr=float(cfg.tpr),
            fitted_on=f"{split} ({len(samples)} images of {data.get('root')})", selected_on=selected_on)
    check_calibration_split(out.labels, split, cfg.ckpt)  # the images that could be read
    if not calibration.nll < calibration.nll_raw:
        raise EvalError(f"the temperature fitted on the {split} split does not lower its NLL ({calibration.nll_raw:.4f}"
                        f" -> {calibration.nll:.4f}): nothing stored, {cfg.ckpt} keeps its calibration; calibrate on "
                        "a larger split of labelled images")
    backup = None if cfg.get("dry_run") or not previous else backup_calibration(cfg.ckpt, previous)
    stored = None
    if not cfg.get("dry_run"):
        calibration, stored = store_calibration(cfg.ckpt, calibration, stats, predictor.fingerprint)
    write_json(out_dir / "calibration.json", {**calibration.to_dict(), "checkpoint": str(cfg.ckpt),
                                              "stored_in": str(stored) if stored else None, "tta": str(cfg.tta),
                                              "previous": previous, "previous_backup": str(backup) if backup else None})
    if previous:
        log.info("previous calibration: temperature %s, unknown threshold %s (kept in %s)",
                 previous.get("temperature"), previous.get("threshold"), backup or "no file: dry run")
    reliability_diagram(reliability_bins(out.logits / calibration.temperature, out.labels),
                        out_dir / "reliability.png", raw_bins=reliability_bins(out.logits, out.labels))
    log.info("temperature %.3f on %d %s images: ECE %.3f -> %.3f, NLL %.3f -> %.3f; unknown score %s, threshold "
             "%.4g (%.0f%% of these images kept)%s", calibration.temperature, calibration.images, split,
             calibration.ece_raw, calibration.ece, calibration.nll_raw, calibration.nll, calibration.score,
             calibration.threshold, 100 * calibration.target_tpr,
             f"; stored in {stored}" if stored else " (dry run: nothing stored)")
    return calibration


def check_calibration_split(labels: torch.Tensor, split: str, model: object) -> None:
    """A split a calibration can be fitted on: at least :data:`MIN_CALIBRATION_IMAGES` labelled images of at least
    two classes (one class alone fits a temperature that only sharpens, and a threshold that names nothing else);
    else one sentence, before anything is stored."""
    classes = len(torch.unique(labels)) if len(labels) else 0
    if len(labels) < MIN_CALIBRATION_IMAGES or classes < 2:
        raise EvalError(f"the {split} split has {len(labels)} labelled image(s) of {classes} class(es): a calibration "
                        f"needs at least {MIN_CALIBRATION_IMAGES} images of at least 2 classes (hundreds give a "
                        f"reliable one); nothing stored, {model} keeps its calibration")


def backup_calibration(model: str | Path, previous: dict) -> Path:
    """Keep a model's calibration before it is replaced: ``NAME.calibration-<UTC time>.json`` beside it."""
    from datetime import datetime, timezone

    model = Path(model).expanduser()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return write_json(model.with_name(f"{model.stem}.calibration-{stamp}.json"), previous)


def calibration_unknown_images(cfg: DictConfig, data: dict) -> list:
    """The images of unknown classes calibrate chooses the default score on with ``ood=auto``: the held-out
    classes' test images (``data.open_set.holdout``), or the embedded set's unknown classes; none for other data."""
    if (data.get("open_set") or {}).get("holdout") is not None:
        with open_dict(cfg):
            cfg.ood = "holdout"
        return ood_images(cfg, data)
    if (data.get("synthetic") or {}).get("unknown_classes"):
        with open_dict(cfg):
            cfg.ood = "synthetic"
        return ood_images(cfg, data)
    return []


# -- index ---------------------------------------------------------------------------------------------------
def build_neighbour_index(cfg: DictConfig) -> Path:
    """Embed ``cfg.data.split`` (train by default) of the data the model was trained with and write its
    :class:`~twincar.evaluation.neighbours.NeighbourIndex` to ``cfg.out`` (default: ``index/`` beside the model);
    returns its folder."""
    from twincar.evaluation.neighbours import build_index, resolve_backend

    resolve_launch_paths(cfg)
    split = str(cfg.data.get("split") or "train")
    if split not in ("train", "val", "test"):
        raise EvalError(f"data.split={split} is not a split: use data.split=train, val or test")
    predictor = Predictor.load(cfg.ckpt, cfg.get("classes"), device=cfg.get("device", "auto"))
    with open_dict(cfg):
        cfg.data.split = "test"  # data_config checks eval's splits; the split is chosen below
    data, _ = data_config(cfg)
    samples, margin, _ = eval_samples(data, split, predictor.class_names)
    batch_size = int(data.get("eval_batch_size") or data.get("batch_size") or 64)
    index = build_index(predictor, samples, batch_size=batch_size, bbox_margin=margin,
                        backend=str(cfg.get("backend") or "auto"), thumbnails=int(cfg.get("thumbnails") or 0))
    out = Path(cfg.out) if cfg.get("out") else Path(cfg.ckpt).expanduser().parent / "index"
    index.save(out)
    log.info("indexed %d %s images (%d-d embeddings) into %s (searched with %s)", len(index.paths), split,
             index.embeddings.shape[1], out, resolve_backend(index.backend))
    return out
