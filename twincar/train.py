"""Train a car classifier: ``python -m twincar.train [group=option ...] [key=value ...]``.

``train(cfg)`` is the pure function (tests and sweepers call it); ``main`` is the thin Hydra entry
point. A run directory ends up holding the resolved config, TensorBoard and CSV logs, best and
last checkpoints, ``metrics.json``, ``split.json``, the loss/accuracy curves, ``model.pth``,
``classes.txt`` and ``model_card.json``; every file is written atomically, and one run at a time writes there.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from twincar.cluster import run_lock
from twincar.data.pipeline import refuse_removed_overrides
from twincar.errors import run_hydra_tool, user_error
from twincar.files import remove_stale_temp_files
from twincar.models.finetune import run_lr_find
from twincar.runs import resolve_launch_paths
from twincar.training.distributed import hydra_job_relaunch, log_file_on_rank_zero_only
from twincar.training.steps import (
    build_datamodule,
    build_model,
    build_trainer,
    calibrate_best,
    evaluate_best,
    fit_model,
    log_hyperparameters,
    resume_checkpoint,
    summary,
    write_artefacts,
    write_curves,
)
from twincar.training.tracking import tensorboard_logdir

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train, then validate (and test) the best checkpoint; write the run's artefacts; return the metrics.

    The run directory is locked while it runs (one writer; see :mod:`twincar.cluster`); what a killed
    run left half-written there (temporary files) is removed first."""
    resolve_launch_paths(cfg)
    log_file_on_rank_zero_only()
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(out_dir) as launching:
        if launching:
            remove_stale_temp_files(out_dir, out_dir / "checkpoints")
        return _train(cfg, out_dir)


def _train(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    datamodule = build_datamodule(cfg)
    ckpt_path = resume_checkpoint(cfg, out_dir / "checkpoints", datamodule.class_names)
    model = build_model(cfg, datamodule)
    fit = build_trainer(cfg, out_dir / "checkpoints", ckpt_path)
    datamodule.per_device_batch_size(fit.trainer.world_size)  # a batch that does not split fails before DDP starts
    if cfg.get("tune"):  # tune=lr_find: find a learning rate, train nothing
        return run_lr_find(fit.trainer, model, datamodule, OmegaConf.to_container(cfg.tune, resolve=True), out_dir)
    log_hyperparameters(cfg, fit, out_dir)

    if not fit_model(fit, model, datamodule, out_dir):
        return {}  # stopped by a signal: last.ckpt holds the run, resume=auto continues it
    if fit.trainer.is_global_zero:
        write_curves(out_dir)
    metrics, best = evaluate_best(fit.trainer, model, datamodule, bool(cfg.get("test")))
    if fit.trainer.is_global_zero:
        calibration, stats = calibrate_best(model, datamodule, metrics, best) if cfg.get("calibrate", True) \
            else (None, None)
        write_artefacts(cfg, fit.trainer, model, datamodule, metrics, best, out_dir, calibration, stats)
        logdir = tensorboard_logdir(fit.trainer, cfg.paths.log_dir)  # the sweep's folder, outputs/ or the run's
        log.info("\n%s", summary(metrics, datamodule.num_classes, out_dir, logdir))
    return metrics


def main() -> float | None:
    """Command-line entry point: a removed option (``data.cache=true``) is one sentence naming its replacement,
    before Hydra composes the config; then :func:`hydra_main`."""
    return run_hydra_tool(hydra_main, log, refuse_removed_overrides)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``cfg.optimized_metric`` for sweepers."""
    try:
        with hydra_job_relaunch():  # DDP ranks of a (sweep) job start as single runs of that job
            metrics = train(cfg)
    except Exception as e:
        error = user_error(e)
        if error is None:
            raise
        log.error("%s", error)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the job fails, the sweep (e.g. an Optuna search) records it and goes on
        sys.exit(1)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
