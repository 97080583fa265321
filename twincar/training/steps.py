"""The named steps of a training run, so that ``train(cfg)`` reads as a recipe (lightning-hydra-template style):
build the datamodule and model, find what to resume, build the trainer, log the hyperparameters, fit, evaluate
the best checkpoint and write the run's artefacts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from twincar.data.classes import class_names_difference, write_class_tables
from twincar.errors import TwinCarError
from twincar.evaluation.calibration import Calibration, ece_nll
from twincar.evaluation.figures import plot_curves
from twincar.evaluation.open_set import auroc, open_set_metrics
from twincar.files import write_json, write_text
from twincar.inference.features import FeatureStats
from twincar.models.card import build_model_card, write_model_card, write_unknown_stats
from twincar.models.checkpoint import checkpoint_class_names, export_state_dict, state_fingerprint
from twincar.models.classifier import CarClassifier
from twincar.models.factory import min_input_size
from twincar.runs import hydra_run_config
from twincar.training.checkpoints import with_atomic_checkpoints
from twincar.training.distributed import PerRankSeed
from twincar.training.resume import (
    Preemption,
    ResumeState,
    continue_logs,
    find_resume_checkpoint,
    prepare_logger_config,
)
from twincar.training.search import pruning_callback
from twincar.training.tracking import is_tracker, log_artefacts

log = logging.getLogger(__name__)

# Config sections that are logged as hyperparameters (flattened) in TensorBoard's HPARAMS tab.
HPARAM_SECTIONS = ("model", "data", "augmentation", "optimizer", "scheduler", "trainer")


def flatten(d: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``; lists and None become strings (TensorBoard hparams types)."""
    flat = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        else:
            flat[name] = value if isinstance(value, (str, int, float, bool)) else str(value)
    return flat


# Groups whose options are alternatives with different keys (SGD has momentum, Adam has not): every run logs the
# union of their options' keys, so that each key is a column of TensorBoard's HPARAMS table for every run of a sweep.
ALTERNATIVE_GROUPS = ("model", "augmentation", "optimizer", "scheduler", "trainer")
NOT_SET = "n/a"  # the HPARAMS value of a key that this run's option does not have


def option_keys(group: str, conf_dir: Path | None = None) -> set[str]:
    """The flattened keys (``a/b``) of every option of config ``group`` shipped in ``twincar/conf``, following each
    option's same-group ``defaults``."""
    import yaml

    conf_dir = conf_dir or Path(__file__).resolve().parents[1] / "conf"

    def keys(option: str, seen: frozenset = frozenset()) -> set[str]:
        path = conf_dir / group / f"{option}.yaml"
        if option in seen or not path.is_file():
            return set()
        doc = yaml.safe_load(path.read_text()) or {}
        if "@package _global_" in path.read_text().split("\n", 1)[0]:
            doc = doc.get(group) or {}
        found = set()
        for entry in doc.pop("defaults", None) or []:
            if isinstance(entry, str) and entry != "_self_":
                found |= keys(entry, seen | {option})
        return found | set(flatten(doc, f"{group}/"))

    return set().union(*(keys(p.stem) for p in sorted((conf_dir / group).glob("*.yaml"))))


def hyperparameters(cfg: DictConfig) -> dict[str, str | int | float | bool]:
    """What a run is, for comparing runs: group choices, command-line overrides, flattened options; the keys of the
    other options of a group (``optimizer/momentum`` of an Adam run) are there too, as ``n/a``."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.get("data", {}).pop("augmentation", None)  # the augmentation section, logged once
    hp = flatten({k: container[k] for k in HPARAM_SECTIONS if k in container})
    for group in ALTERNATIVE_GROUPS:
        for key in option_keys(group):
            hp.setdefault(key, NOT_SET)
    hp = {k: v for k, v in sorted(hp.items()) if not k.endswith("_target_")}
    hp["seed"] = str(cfg.get("seed"))
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        hp.update({f"choice/{k}": str(v) for k, v in hc.runtime.choices.items() if not k.startswith("hydra")})
        hp["overrides"] = " ".join(hc.overrides.task) or "(none)"
    return hp


def tracking_params(cfg: DictConfig) -> dict[str, str | int | float | bool]:
    """What MLflow and W&B get as params: the whole resolved config, flattened (``paths/...`` too), and the group
    choices and overrides of :func:`hyperparameters`."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.get("data", {}).pop("augmentation", None)  # logged once, as augmentation/...
    return {**flatten(container), **hyperparameters(cfg)}


def instantiate_all(section: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a config mapping (callbacks, loggers), logging each; a user error
    of one (an MLflow server that does not answer) is its own sentence, not Hydra's wrapper around it."""
    from hydra.errors import InstantiationException

    objects = []
    for name, conf in (section or {}).items():
        if conf is not None and "_target_" in conf:
            log.info("instantiating %s <%s>", name, conf._target_)
            try:
                objects.append(hydra.utils.instantiate(conf))
            except InstantiationException as e:
                if isinstance(e.__cause__, TwinCarError):
                    raise e.__cause__ from None
                raise
    return objects


def summary(metrics: dict[str, float], num_classes: int, out_dir: Path, log_dir: str | Path | None) -> str:
    """The end-of-run report: the best checkpoint's metrics, the run directory and ``tensorboard --logdir`` of
    ``log_dir`` (none without a TensorBoard logger)."""
    lines = [f"Results of the best checkpoint ({num_classes} classes, chance accuracy {1 / num_classes:.3f}):"]
    lines += [f"  {k:<22} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)]
    for stage in ("val", "test"):  # the fine-grained view: where do the errors fall?
        m = {k.removeprefix(f"{stage}/"): v for k, v in metrics.items() if k.startswith(f"{stage}/")}
        if "acc_make" in m:
            lines.append(f"Fine-grained ({stage}): make {m['acc_make']:.3f}, family (make + model) "
                         f"{m['acc_family']:.3f}, year in family {m['acc_year_in_family']:.3f}")
        if "ece_raw" in m:
            lines.append(f"Calibrated ({stage}): ECE {m['ece']:.3f} (raw {m['ece_raw']:.3f}), NLL {m['nll']:.3f} "
                         f"(raw {m['nll_raw']:.3f}), temperature {metrics['val/temperature']:.3f}")
    if "ood/auroc" in metrics:
        lines.append(f"Open set ({metrics['ood/images']:.0f} images of classes never trained on): AUROC "
                     f"{metrics['ood/auroc']:.3f}, FPR95 {metrics['ood/fpr95']:.3f}; at the threshold "
                     f"{metrics['ood/known_accepted']:.1%} of known images accepted, "
                     f"{metrics['ood/unknown_rejected']:.1%} of unknown ones rejected, top-1 of the known cars "
                     f"still named {metrics['ood/acc_accepted']:.3f}")
    lines.append(f"Run directory: {out_dir}")
    if log_dir is not None:
        lines.append(f"TensorBoard:   tensorboard --logdir {Path(log_dir).resolve()}")
    return "\n".join(lines)


def build_datamodule(cfg: DictConfig):
    """The run's :class:`~twincar.data.datamodule.CarsDataModule`, its data prepared (generated, cached)."""
    log.info("instantiating datamodule <%s>", cfg.data._target_)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    return datamodule


def resume_checkpoint(cfg: DictConfig, checkpoint_dir: Path, class_names: list[str]) -> Path | None:
    """The checkpoint to continue from (``resume=auto``'s ``last.ckpt``, or ``ckpt_path``), checked to be
    trained on the same classes; None to start fresh."""
    ckpt_path = find_resume_checkpoint(cfg.get("resume"), checkpoint_dir) or cfg.get("ckpt_path")
    if not ckpt_path:
        return None
    difference = class_names_difference(checkpoint_class_names(ckpt_path), class_names)
    if difference:
        raise TwinCarError(
            f"checkpoint {ckpt_path} was trained on other classes than the data has ({difference}, checkpoint "
            "against data): resume with the same data, or start from its weights with model.weights=PATH instead "
            "of ckpt_path"
        )
    return Path(ckpt_path)


def build_model(cfg: DictConfig, datamodule) -> CarClassifier:
    """The LightningModule for the datamodule's classes, with the run's model, optimizer and scheduler."""
    log.info("instantiating model <%s> for %d classes", cfg.model.name, datamodule.num_classes)
    model = CarClassifier(
        datamodule.class_names,
        **OmegaConf.to_container(cfg.model, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        preprocess=datamodule.preprocess.to_dict(),
    )
    smallest, size = min_input_size(model.model), datamodule.preprocess.image_size
    if size < smallest:
        raise TwinCarError(f"data.image_size={size} is smaller than {cfg.model.name} takes: its features are "
                           f"{smallest}x smaller than the input, so give at least {smallest} pixels")
    return model


@dataclass
class Fit:
    """What fitting needs besides the model and data: the trainer, the resume point, the preemption watch."""

    trainer: L.Trainer
    preemption: Preemption
    ckpt_path: Path | None
    resume_state: ResumeState | None


def build_trainer(cfg: DictConfig, checkpoint_dir: Path, ckpt_path: Path | None) -> Fit:
    """The trainer with the configured callbacks, loggers and plugins, plus preemption handling, per-rank seeds and
    atomic checkpoint files; logs continue where the checkpoint left them when resuming in the same run directory."""
    preemption = Preemption(checkpoint_dir)
    callbacks = instantiate_all(cfg.get("callbacks")) + [preemption]
    prune = pruning_callback(cfg)  # a trial of hparams_search=optuna: report val/acc to its study each epoch
    if prune is not None:
        callbacks.append(prune)
    if cfg.get("seed") is not None:
        callbacks.append(PerRankSeed(cfg.seed))
    same_run = ckpt_path is not None and ckpt_path.resolve().parent == checkpoint_dir.resolve()
    resume_state = ResumeState.read(ckpt_path) if same_run else None
    if resume_state:  # the same run directory: its logs continue from the checkpoint
        prepare_logger_config(cfg.get("logger"), resume_state)
    loggers = instantiate_all(cfg.get("logger"))
    log.info("instantiating trainer <%s>", cfg.trainer._target_)
    plugins = with_atomic_checkpoints(hydra.utils.instantiate(cfg.trainer.get("plugins"), _convert_="all"),
                                      cfg.trainer.get("strategy"))  # every checkpoint written atomically, DDP too
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                                 plugins=plugins)
    if resume_state:
        continue_logs(trainer.loggers, resume_state)
    return Fit(trainer, preemption, ckpt_path, resume_state)


def log_hyperparameters(cfg: DictConfig, fit: Fit, out_dir: Path) -> None:
    """Every logger gets the run's hyperparameters (TensorBoard's HPARAMS tab pairs them with the optimized
    metric); rank 0 saves the resolved ``config.yaml``."""
    hp = hyperparameters(cfg)
    for logger in fit.trainer.loggers:
        if is_tracker(logger):  # MLflow, W&B: the whole resolved config
            logger.log_hyperparams(tracking_params(cfg))
        elif isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(hp, metrics=None if fit.resume_state else {cfg.optimized_metric: 0.0})
        else:
            logger.log_hyperparams(hp)
    if fit.trainer.is_global_zero:
        write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def fit_model(fit: Fit, model: CarClassifier, datamodule, out_dir: Path) -> bool:
    """Fit; False when a signal (SIGTERM, SIGUSR1) stopped it first (``last.ckpt`` was written to resume from)."""
    try:
        fit.trainer.fit(model, datamodule=datamodule, ckpt_path=fit.ckpt_path)
    except SIGTERMException:  # Lightning stopped at a batch boundary; Preemption wrote last.ckpt
        fit.preemption.stopped = fit.preemption.stopped or "SIGTERM"
    if fit.preemption.stopped:
        log.warning("run stopped by %s before the end; continue it with hydra.run.dir=%s resume=auto",
                    fit.preemption.stopped, out_dir)
        return False
    return True


def evaluate_best(trainer: L.Trainer, model: CarClassifier, datamodule, test: bool) -> tuple[dict[str, float], str]:
    """Validate (and, with ``test`` and test labels, test) the best checkpoint; returns the metrics and its path
    (empty when there is no checkpoint callback: the weights as trained)."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    ckpt = best or None
    metrics: dict = {}
    metrics.update(trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt, verbose=False)[0])
    if test and datamodule.has_test_labels:
        metrics.update(trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, verbose=False)[0])
    return {k: float(v) for k, v in sorted(metrics.items())}, best


def calibrate_best(model: CarClassifier, datamodule, metrics: dict[str, float], best: str,
                   tpr: float = 0.95) -> tuple[Calibration, FeatureStats | None]:
    """Fit the unknown answer and the temperature (:func:`~twincar.evaluation.unknown.fit_model_unknown`) of the
    weights :func:`evaluate_best` left in ``model`` (the best checkpoint's), computed as predict and eval compute
    them: the training features' statistics, the temperature (NLL) and every score's threshold (``tpr`` of the
    validation images), the default score chosen by AUROC on images training never saw (the held-out classes of
    ``data.open_set.holdout`` or the embedded set's unknown classes, with generated images of no car); store them
    in the best checkpoint's hyper-parameters (the statistics beside it). Returns the calibration and statistics.

    ``metrics`` gains ``val/temperature``, and for val (and test, when it was tested) ``ece``/``nll`` become the
    calibrated values, the trainer's raw ones moving to ``ece_raw``/``nll_raw`` (as eval reports them). On the
    held-out or unknown classes (their test images), also the ``ood/*`` open-set metrics of the default score on
    those images against the test (else val) images (:func:`~twincar.evaluation.open_set.open_set_metrics`), and
    ``ood/auroc_<score>`` of every score."""
    import tempfile

    from twincar.evaluation.loop import collect_logits
    from twincar.evaluation.unknown import fit_model_unknown, image_outputs, store_calibration, write_far_images
    from twincar.inference.predictor import Predictor

    predictor = Predictor(model.model, model.class_names, datamodule.preprocess, device=model.device,
                          channels_last=False, precision="fp32")
    batch = int(datamodule.hparams.get("eval_batch_size") or datamodule.hparams.get("batch_size") or 64)
    margin = getattr(datamodule.val_set, "bbox_margin", None)  # cropped as the val and test images are
    spec = getattr(datamodule, "spec", None)
    near = list(getattr(datamodule, "open_set_samples", []))  # data.open_set.holdout: the held-out classes
    if not near and spec is not None and spec.unknown_classes:  # the embedded set's classes never in it
        from twincar.data.synthetic import generate_unknown

        near = generate_unknown(datamodule.root, spec)
    with tempfile.TemporaryDirectory(prefix="twincar-far-") as far_dir:
        far = write_far_images(far_dir)
        calibration, stats, val = fit_model_unknown(
            predictor, datamodule.val_set.samples, train_samples=getattr(datamodule.train_set, "samples", None),
            unknown=[*near, *far], bbox_margin=margin, batch_size=batch, tpr=tpr,
            fitted_on=f"val ({len(datamodule.val_set.samples)} images)",
            selected_on=f"{len(near)} images of unknown classes and {len(far)} generated images of no car")
    features = stats is not None
    metrics["val/temperature"] = calibration.temperature
    stages = {"val": val}
    if "test/acc" in metrics and getattr(datamodule, "test_set", None) is not None:
        stages["test"] = collect_logits(predictor, datamodule.test_set.samples,
                                        bbox_margin=getattr(datamodule.test_set, "bbox_margin", None),
                                        batch_size=batch, progress=False, embeddings=features)
    for stage, out in stages.items():
        metrics[f"{stage}/ece_raw"], metrics[f"{stage}/nll_raw"] = ece_nll(out.logits, out.labels)
        metrics[f"{stage}/ece"], metrics[f"{stage}/nll"] = ece_nll(out.logits, out.labels, calibration.temperature)
    if near:
        logits, feats = image_outputs(predictor, near, batch_size=batch, bbox_margin=margin, embeddings=features)
        known = stages.get("test", val)
        metrics.update(open_set_metrics(calibration.scores(known.logits, known.embeddings, stats),
                                        calibration.scores(logits, feats, stats),
                                        threshold=calibration.threshold, tpr=calibration.target_tpr,
                                        known_correct=known.logits.argmax(1) == known.labels))
        for score in calibration.thresholds or {}:
            metrics[f"ood/auroc_{score}"] = auroc(calibration.scores(known.logits, known.embeddings, stats, score),
                                                  calibration.scores(logits, feats, stats, score))
    if best:
        calibration, _ = store_calibration(best, calibration, stats)
        calibrate_last_too(Path(best), calibration.to_dict())
    model.hparams["calibration"] = calibration.to_dict()
    log.info("temperature %.3f fitted on %d validation images: ECE %.3f -> %.3f; unknown score %s, threshold %.4g",
             calibration.temperature, calibration.images, calibration.ece_raw, calibration.ece, calibration.score,
             calibration.threshold)
    return calibration, stats


def calibrate_last_too(best: Path, calibration: dict) -> None:
    """``last.ckpt`` gets the best checkpoint's calibration when it holds the same weights (the last epoch was the
    best), so an export from either carries it; other weights keep none (an export from them says so)."""
    from twincar.models.checkpoint import read_state_dict
    from twincar.models.loading import write_calibration

    last = best.with_name("last.ckpt")
    if last.is_file() and last != best and state_fingerprint(read_state_dict(last)) == \
            state_fingerprint(read_state_dict(best)):
        write_calibration(last, calibration)


def write_curves(out_dir: Path) -> None:
    """The loss/accuracy curves from the CSV log (before validate/test add their own rows)."""
    metrics_csv = out_dir / "csv" / "metrics.csv"
    if metrics_csv.is_file():
        plot_curves(metrics_csv, out_dir)
    else:
        log.warning("no %s (CSV logger off?): loss/accuracy curves not drawn", metrics_csv)


def write_artefacts(cfg: DictConfig, trainer: L.Trainer, model: CarClassifier, datamodule, metrics: dict,
                    best: str, out_dir: Path, calibration: Calibration | None = None,
                    stats: FeatureStats | None = None) -> None:
    """``split.json``, ``metrics.json`` and, with ``export``, ``model.pth`` + ``classes.txt`` + ``classes.csv`` (make,
    model and year of each class, from the dataset's metadata) + ``model_card.json`` (+ ``model.unknown.npz``, the
    training features' ``stats``), so that ``Predictor.load(RUN/model.pth)`` needs nothing else, its ``calibration``
    included."""
    write_json(out_dir / "split.json", datamodule.split)
    write_json(out_dir / "metrics.json", {**metrics, "best_checkpoint": best, "epochs": trainer.current_epoch})
    if cfg.get("export"):
        export_state_dict(model.model, out_dir / "model.pth")
        write_class_tables(model.class_names, out_dir / "classes.txt", datamodule.car_names)
        fingerprint = state_fingerprint(model.model.state_dict())  # the calibration records it, as in the checkpoint
        if calibration is not None:
            entry = None if stats is None else write_unknown_stats(out_dir / "model.pth", stats.arrays())
            calibration = Calibration(**{**calibration.to_dict(), "features": entry})
        write_model_card(out_dir, build_model_card(
            model.class_names, datamodule.preprocess, cfg.model.name, metrics=metrics, config=hydra_run_config(),
            source="model.pth", calibration={**calibration.to_dict(), "fingerprint": fingerprint} if calibration
            else None, fingerprint=fingerprint))
    log_artefacts(trainer.loggers, best, out_dir)  # MLflow, W&B: the best checkpoint and the model card
