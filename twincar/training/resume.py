"""Runs that survive a kill: ``resume=auto``, logs that continue where the checkpoint left them, and
a clean stop (checkpoint first) on SIGUSR1/SIGTERM, with a requeue on SLURM.

* :func:`find_resume_checkpoint`: ``resume=auto`` -> ``checkpoints/last.ckpt`` of this run directory (the
  newest readable checkpoint of the run when ``last.ckpt`` is damaged).
* :class:`ResumeState`: what a checkpoint says about the logs; :func:`continue_logs` cuts the CSV
  and TensorBoard history back to the checkpoint, so no epoch is logged twice after a resume.
* :class:`Preemption`: the callback that records the log position in every checkpoint, and turns a
  signal into ``last.ckpt`` + a clean exit (requeued on SLURM).

Checkpoint files are written atomically in their folder (:class:`~twincar.training.checkpoints.AtomicCheckpointIO`),
so a kill during a save leaves the previous ``last.ckpt`` intact.
"""

from __future__ import annotations

import csv
import io
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, open_dict

from twincar.cluster import requeue_slurm_job, slurm_job_id
from twincar.compat.lightning import set_csv_columns
from twincar.errors import TwinCarError
from twincar.files import write_csv
from twincar.models.checkpoint import safe_torch_load
from twincar.training.checkpoints import checkpoint_problem, newest_readable

log = logging.getLogger(__name__)

LAST = "last.ckpt"
STATE_KEY = "twincar_resume"  # this module's entry in a checkpoint
# Signals that ask for a checkpoint and a clean stop: what SLURM sends ahead of a time limit or a
# preemption when asked to (sbatch --signal=USR1@120; submitit asks for USR2). SIGTERM is caught by
# Lightning, which stops at the end of the batch; Preemption.on_exception then writes the checkpoint.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class ResumeError(TwinCarError):
    """A ``resume`` option that cannot be honoured."""


def find_resume_checkpoint(resume: str | bool | None, checkpoint_dir: str | Path) -> Path | None:
    """The checkpoint ``resume`` asks for: ``auto`` -> ``checkpoint_dir/last.ckpt`` if it exists, else None.

    ``None``/``false`` never resume. With ``auto`` and no ``last.ckpt`` the run starts fresh and says so. A
    damaged ``last.ckpt`` (empty, truncated) falls back to the newest readable checkpoint of the run, saying so;
    with none, a :class:`ResumeError` names the files and how to start fresh.
    """
    if resume in (None, False, "false", "none", "null"):
        return None
    if resume != "auto":
        raise ResumeError(f"resume={resume!r} is not an option: use resume=auto (or ckpt_path=PATH for a given file)")
    last = Path(checkpoint_dir) / LAST
    if not last.is_file():
        log.info("resume=auto: no %s yet, starting fresh", last)
        return None
    problem = checkpoint_problem(last)
    if problem is None:
        log.info("resume=auto: continuing from %s", last)
        return last
    fallback, others = newest_readable(Path(checkpoint_dir), exclude=last)
    if fallback is not None:
        log.warning("resume=auto: %s %s: continuing from %s, the newest readable checkpoint of this run",
                    last, problem, fallback)
        return fallback
    damaged = "; ".join(f"{p.name} {why}" for p, why in {last: problem, **others}.items())
    raise ResumeError(
        f"resume=auto: no checkpoint in {checkpoint_dir} can be read ({damaged}): start this run afresh with "
        f"resume=null (its checkpoints are then overwritten) or train into a new hydra.run.dir"
    )


@dataclass(frozen=True)
class ResumeState:
    """Where a checkpoint was taken: the optimizer step and how many CSV rows were on disk."""

    global_step: int
    csv_rows: int | None  # None: a checkpoint written without the Preemption callback

    @classmethod
    def read(cls, ckpt_path: str | Path) -> ResumeState:
        ckpt = safe_torch_load(Path(ckpt_path))
        own = ckpt.get(STATE_KEY) or {}
        return cls(global_step=int(ckpt.get("global_step", 0)), csv_rows=own.get("csv_rows"))


def prepare_logger_config(logger_cfg: DictConfig | None, state: ResumeState) -> None:
    """Make TensorBoard hide what was logged after the checkpoint (``purge_step``), in place."""
    for conf in (logger_cfg or {}).values():
        if conf is not None and str(conf.get("_target_", "")).endswith("TensorBoardLogger"):
            with open_dict(conf):
                conf.purge_step = state.global_step


def _csv_path(logger: CSVLogger) -> Path:
    return Path(logger.log_dir) / "metrics.csv"


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def continue_logs(loggers: list, state: ResumeState) -> None:
    """Keep the CSV history up to the checkpoint (Lightning's CSVLogger would delete it) and append after it.

    Call on every rank before anything is logged; only global rank 0 touches files.
    """
    for logger in loggers:
        if not isinstance(logger, CSVLogger) or L.pytorch.utilities.rank_zero_only.rank != 0:
            continue
        path = _csv_path(logger)
        header, rows = _read_csv(path)
        if state.csv_rows is not None:
            rows = rows[: state.csv_rows]
        logger.experiment  # noqa: B018 -- creating the writer deletes the old file
        if header:
            write_csv(path, rows, header)
            set_csv_columns(logger, header)
            log.info("resume: kept %d rows of %s", len(rows), path)


def _csv_rows_on_disk(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        return max(0, sum(1 for _ in csv.reader(io.StringIO(f.read()))) - 1)


class Preemption(L.Callback):
    """Checkpoint bookkeeping for resumable runs, and a clean stop on a signal.

    * Every checkpoint records how many CSV rows were written when it was taken (the CSV is
      flushed first), so a resumed run continues the history without a duplicated epoch.
    * SIGUSR1 (and SIGUSR2) set a flag; at the end of the current training batch every process
      agrees to stop, ``last.ckpt`` is written and training ends. Under submitit (whose handler
      was installed first) that handler then requeues the job; under a plain SLURM job
      ``scontrol requeue`` is called; otherwise the run just exits cleanly.
    * SIGTERM: Lightning stops at the end of the batch; ``last.ckpt`` is written then.

    ``stopped`` tells the caller to skip the final evaluation: the run is not finished.
    """

    def __init__(self, checkpoint_dir: str | Path, *, requeue: bool = True):
        self.last = Path(checkpoint_dir) / LAST
        self.requeue = requeue
        self.stopped: str | None = None  # the signal's name, once a stop was done
        self._signal: int | None = None
        self._previous: dict[int, object] = {}

    # -- signals --------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame) -> None:
        log.warning("received %s: saving %s at the end of this batch, then stopping", signal.Signals(signum).name,
                    self.last)
        self._signal = signum

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed before Lightning registers its own SLURM SIGUSR1 handler, which then stands aside.
        try:
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        except ValueError:  # not the main thread: signals cannot be caught here
            self._previous = {}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        asked = trainer.strategy.reduce_boolean_decision(self._signal is not None, all=False)
        if not asked:
            return
        name = signal.Signals(self._signal).name if self._signal is not None else "a signal on another process"
        trainer.save_checkpoint(self.last)
        trainer.should_stop = True
        self.stopped = name
        log.warning("stopped by %s: checkpoint %s written", name, self.last)
        if trainer.is_global_zero:
            self._hand_over(self._signal)

    def _hand_over(self, signum: int | None) -> None:
        """Requeue: submitit's own handler (it pickles the job and requeues), or scontrol on plain SLURM."""
        previous = self._previous.get(signum) if signum is not None else None
        if callable(previous):
            log.info("handing over to the previous %s handler (submitit requeues the job)", signal.Signals(signum).name)
            self.on_fit_end(None, None)
            previous(signum, None)
            return
        job = slurm_job_id()
        if self.requeue and job and (failed := requeue_slurm_job(job)):
            log.warning("scontrol requeue %s failed (%s): submit the run again to continue from %s", job, failed,
                        self.last)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):  # raised by Lightning at a batch boundary, on every rank
            trainer.save_checkpoint(self.last)
            self.stopped = "SIGTERM"
            log.warning("stopped by SIGTERM: checkpoint %s written", self.last)

    # -- log position in every checkpoint --------------------------------------------------------
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        rows = None
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.save()  # rows logged so far reach the file before the checkpoint does
                rows = _csv_rows_on_disk(_csv_path(logger)) if trainer.is_global_zero else None
            else:
                logger.save()
        checkpoint[STATE_KEY] = {"csv_rows": rows}
