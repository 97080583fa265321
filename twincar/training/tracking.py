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
