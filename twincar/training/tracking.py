"""What a run reports to the experiment trackers beyond the metrics the model logs: learning rates named by
parameter group (so that runs with different optimizers overlay), the directory TensorBoard was written to, and,
for MLflow and W&B, the model card and best checkpoint as artefacts."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import TensorBoardLogger

from twincar.errors import TwinCarError

log = logging.getLogger(__name__)


def group_role(name: str | None) -> str:
    """``head`` for the classifier head's parameter groups, ``backbone`` for every other group."""
    return "head" if (name or "").startswith("head") else "backbone"


class GroupLearningRates(L.Callback):
    """Log ``lr/head`` and ``lr/backbone`` at the start of every training epoch.

    Lightning's LearningRateMonitor names its tags after the optimizer (``lr-Adam/head`` against
    ``lr-SGD/head``), so the runs of a sweep over optimizers do not overlay. These tags name only the
    parameter group's role; with layer-wise decay, ``lr/backbone`` is the top backbone layer's (the largest).
    """

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rates: dict[str, float] = {}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                tag = f"lr/{group_role(group.get('name'))}"
                rates[tag] = max(rates.get(tag, 0.0), float(group["lr"]))
        if rates:
            pl_module.log_dict(rates, on_step=False, on_epoch=True, sync_dist=False)


def tensorboard_logdir(trainer: L.Trainer, log_dir: str | Path) -> Path | None:
    """The ``--logdir`` that shows this run next to its siblings: the sweep directory for a ``-m`` job, ``log_dir``
    (the outputs folder) when the run was written below it, else the run's own TensorBoard folder; None without a
    TensorBoard logger."""
    tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    if tensorboard is None:
        return None
    written = Path(tensorboard.log_dir).resolve()
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        sweep = Path(HydraConfig.get().sweep.dir).resolve()
        if written.is_relative_to(sweep):
            return sweep
    outputs = Path(log_dir).resolve()
    return outputs if written.is_relative_to(outputs) else written


def overrides_name() -> str | None:
    """The run's name from its command-line overrides (Hydra's ``job.override_dirname``); None outside Hydra or
    without overrides."""
    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().job.override_dirname or None


MLFLOW_CONNECT_TIMEOUT_S = 10.0  # how long an MLflow server gets to answer before training starts


def check_tracking_uri(uri: str | None, timeout: float = MLFLOW_CONNECT_TIMEOUT_S) -> None:
    """Before training starts: an MLflow server (``http(s)://`` URI) that does not accept a connection within
    ``timeout`` seconds is one sentence (MLflow itself retries for minutes, then fails mid-run); a local store's
    folder that cannot be created is one sentence too."""
    import socket
    from urllib.parse import urlsplit

    from twincar.files import check_writable_dir

    if not uri:
        return
    if uri.startswith("sqlite:///"):
        check_writable_dir(Path(uri.removeprefix("sqlite:///")).parent, "logger.mlflow.tracking_uri")
        return
    if not uri.startswith(("http://", "https://")):
        return
    parts = urlsplit(uri)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname or "", port), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise TwinCarError(f"logger.mlflow.tracking_uri={uri}: no MLflow server answers there within {timeout:.0f} s "
                           f"({getattr(e, 'strerror', None) or e}): start it or correct the URI (or train with "
                           "logger=default); training did not start") from e


def mlflow_logger(*, run_name: str | None = None, **kwargs):
    """Lightning's ``MLFlowLogger``, its run named after the command-line overrides unless ``run_name`` is given;
    its server is checked first (:func:`check_tracking_uri`)."""
    from lightning.pytorch.loggers import MLFlowLogger

    check_tracking_uri(kwargs.get("tracking_uri"))
    return MLFlowLogger(run_name=run_name or overrides_name(), **kwargs)


def wandb_logger(*, offline: bool | str = "auto", name: str | None = None, **kwargs):
    """Lightning's ``WandbLogger``, offline unless W&B has an API key (``WANDB_API_KEY`` or ``wandb login``) or
    ``offline=false``; named after the command-line overrides unless ``name`` is given; the run folder is written
    under ``save_dir``/wandb either way."""
    import os

    from lightning.pytorch.loggers import WandbLogger

    if offline == "auto":
        netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")
        offline = not (os.environ.get("WANDB_API_KEY") or logged_in)
    if offline:
        log.info("W&B offline (no API key): the run is kept under %s/wandb; upload it with `wandb sync`",
                 kwargs.get("save_dir", "."))
    from twincar.files import check_writable_dir

    check_writable_dir(kwargs.get("save_dir") or ".", "logger.wandb.save_dir").mkdir(parents=True, exist_ok=True)
    return WandbLogger(offline=bool(offline), name=name or overrides_name(), **kwargs)


def is_tracker(logger) -> bool:
    """MLflow and W&B: the trackers that get the whole resolved config and the run's artefacts."""
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    return isinstance(logger, (MLFlowLogger, WandbLogger))


def log_artefacts(loggers, best_checkpoint: str, out_dir: Path) -> list[str]:
    """Send the best checkpoint (``checkpoints/``) and ``model_card.json`` to every MLflow and W&B logger; returns
    the files sent. Called once, on rank 0, after the final evaluation."""
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    files = [(Path(best_checkpoint), "checkpoints")] if best_checkpoint else []
    if (out_dir / "model_card.json").is_file():
        files.append((out_dir / "model_card.json", None))
    for logger in loggers:
        if isinstance(logger, MLFlowLogger):
            for path, folder in files:
                logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=folder)
        elif isinstance(logger, WandbLogger) and files:
            import wandb

            artifact = wandb.Artifact(f"model-{logger.experiment.id}", type="model")
            for path, folder in files:
                artifact.add_file(str(path), name=f"{folder}/{path.name}" if folder else path.name)
            logger.experiment.log_artifact(artifact, aliases=["best"])
    return [str(p) for p, _ in files]
