"""Train a car classifier: ``python -m twincar.train [group=option ...] [key=value ...]``.

``train(cfg)`` is the pure function (tests and sweepers call it); ``main`` is the thin Hydra entry
point. A run directory ends up holding the resolved config, TensorBoard and CSV logs, best and
last checkpoints, ``metrics.json``, ``split.json``, the loss/accuracy curves, ``model.pth``,
``classes.txt`` and ``model_card.json``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from twincar.curves import plot_curves
from twincar.data.classes import same_class_names, write_classes_txt
from twincar.distributed import PerRankSeed, hydra_job_relaunch, log_file_on_rank_zero_only
from twincar.errors import TwinCarError
from twincar.export import build_model_card, hydra_run_config, write_model_card
from twincar.models.classifier import CarClassifier
from twincar.models.finetune import run_lr_find
from twincar.models.io import checkpoint_class_names, export_state_dict
from twincar.resume import Preemption, ResumeState, continue_logs, find_resume_checkpoint, prepare_logger_config

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


def hyperparameters(cfg: DictConfig) -> dict[str, str | int | float | bool]:
    """What a run is, for comparing runs: group choices, command-line overrides, flattened options."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.get("data", {}).pop("augmentation", None)  # the augmentation section, logged once
    hp = flatten({k: container[k] for k in HPARAM_SECTIONS if k in container})
    hp = {k: v for k, v in hp.items() if not k.endswith("_target_")}
    hp["seed"] = str(cfg.get("seed"))
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        hp.update({f"choice/{k}": str(v) for k, v in hc.runtime.choices.items() if not k.startswith("hydra")})
        hp["overrides"] = " ".join(hc.overrides.task) or "(none)"
    return hp


def _instantiate_all(section: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a config mapping (callbacks, loggers), logging each."""
    objects = []
    for name, conf in (section or {}).items():
        if conf is not None and "_target_" in conf:
            log.info("instantiating %s <%s>", name, conf._target_)
            objects.append(hydra.utils.instantiate(conf))
    return objects


def _summary(metrics: dict[str, float], num_classes: int, out_dir: Path, log_dir: str) -> str:
    lines = [f"Results of the best checkpoint ({num_classes} classes, chance accuracy {1 / num_classes:.3f}):"]
    lines += [f"  {k:<22} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)]
    for stage in ("val", "test"):  # the fine-grained view: where do the errors fall?
        m = {k.removeprefix(f"{stage}/"): v for k, v in metrics.items() if k.startswith(f"{stage}/")}
        if "acc_make" in m:
            lines.append(f"Fine-grained ({stage}): make {m['acc_make']:.3f}, family (make + model) "
                         f"{m['acc_family']:.3f}, year in family {m['acc_year_in_family']:.3f}")
    lines += [f"Run directory: {out_dir}", f"TensorBoard:   tensorboard --logdir {Path(log_dir).resolve()}"]
    return "\n".join(lines)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train, then validate (and test) the best checkpoint; write the run's artefacts; return the metrics."""
    log_file_on_rank_zero_only()
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    log.info("instantiating datamodule <%s>", cfg.data._target_)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    checkpoint_dir = out_dir / "checkpoints"
    ckpt_path = find_resume_checkpoint(cfg.get("resume"), checkpoint_dir) or cfg.get("ckpt_path")
    if ckpt_path:
        resumed = checkpoint_class_names(ckpt_path)
        if not same_class_names(resumed, datamodule.class_names):
            raise TwinCarError(
                f"checkpoint {ckpt_path} was trained on {len(resumed)} classes, but {datamodule.root} has "
                f"{datamodule.num_classes} (or other names): resume with the same data, or start from its weights "
                "with model.weights=PATH instead of ckpt_path"
            )

    log.info("instantiating model <%s> for %d classes", cfg.model.name, datamodule.num_classes)
    model = CarClassifier(
        datamodule.class_names,
        **OmegaConf.to_container(cfg.model, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        preprocess=datamodule.preprocess.to_dict(),
    )

    preemption = Preemption(checkpoint_dir)
    callbacks = _instantiate_all(cfg.get("callbacks")) + [preemption]
    if cfg.get("seed") is not None:
        callbacks.append(PerRankSeed(cfg.seed))
    same_run = ckpt_path and Path(ckpt_path).resolve().parent == checkpoint_dir.resolve()
    resume_state = ResumeState.read(ckpt_path) if same_run else None
    if resume_state:  # the same run directory: its logs continue from the checkpoint
        prepare_logger_config(cfg.get("logger"), resume_state)
    loggers = _instantiate_all(cfg.get("logger"))
    log.info("instantiating trainer <%s>", cfg.trainer._target_)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    datamodule.per_device_batch_size(trainer.world_size)  # a batch that does not split fails before DDP starts
    if cfg.get("tune"):  # tune=lr_find: find a learning rate, train nothing
        return run_lr_find(trainer, model, datamodule, OmegaConf.to_container(cfg.tune, resolve=True), out_dir)
    if resume_state:
        continue_logs(trainer.loggers, resume_state)

    hp = hyperparameters(cfg)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):  # the HPARAMS tab pairs these with the metric's scalars
            logger.log_hyperparams(hp, metrics=None if resume_state else {cfg.optimized_metric: 0.0})
        else:
            logger.log_hyperparams(hp)
    if trainer.is_global_zero:
        OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)

    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:  # Lightning stopped at a batch boundary; Preemption wrote last.ckpt
        preemption.stopped = preemption.stopped or "SIGTERM"
    if preemption.stopped:
        log.warning("run stopped by %s before the end; continue it with hydra.run.dir=%s resume=auto",
                    preemption.stopped, out_dir)
        return {}

    if trainer.is_global_zero:
        (out_dir / "split.json").write_text(json.dumps(datamodule.split, indent=1))
        metrics_csv = out_dir / "csv" / "metrics.csv"
        if metrics_csv.is_file():  # before validate/test below add their own rows
            plot_curves(metrics_csv, out_dir)
        else:
            log.warning("no %s (CSV logger off?): loss/accuracy curves not drawn", metrics_csv)

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    ckpt = best or None  # None: the weights as trained
    metrics: dict = {}
    metrics.update(trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt, verbose=False)[0])
    if cfg.get("test") and datamodule.has_test_labels:
        metrics.update(trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, verbose=False)[0])
    metrics = {k: float(v) for k, v in sorted(metrics.items())}

    if trainer.is_global_zero:
        (out_dir / "metrics.json").write_text(
            json.dumps({**metrics, "best_checkpoint": best, "epochs": trainer.current_epoch}, indent=1)
        )
        if cfg.get("export"):
            export_state_dict(model.model, out_dir / "model.pth")
            write_classes_txt(model.class_names, out_dir / "classes.txt")
            write_model_card(out_dir, build_model_card(  # so Predictor.load(RUN/model.pth) needs no --classes
                model.class_names, datamodule.preprocess, cfg.model.name, metrics=metrics, config=hydra_run_config(),
                source="model.pth"))
        log.info("\n%s", _summary(metrics, datamodule.num_classes, out_dir, cfg.paths.log_dir))
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``cfg.optimized_metric`` for sweepers."""
    try:
        with hydra_job_relaunch():  # DDP ranks of a (sweep) job start as single runs of that job
            metrics = train(cfg)
    except TwinCarError as e:
        log.error("%s", e)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the job fails, the sweep (e.g. an Optuna search) records it and goes on
        sys.exit(1)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
