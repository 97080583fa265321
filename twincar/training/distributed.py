"""Several processes, one experiment: DDP launched from Hydra jobs and per-rank seeds.

* :func:`hydra_job_relaunch` fixes Lightning's DDP launch under ``-m`` sweeps: Lightning starts the
  other ranks by re-running the original command line, ``-m`` included, so every rank would run the
  whole sweep (Lightning issue 11300). Here each rank is started as a single run of *this job*: its
  concrete overrides, in its output directory.
* the global batch and exact eval shards live with the data (:mod:`twincar.data.sampling`).
* :class:`PerRankSeed`: each process draws different augmentations from ``seed + global rank``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import subprocess
import sys
from collections.abc import Iterator

import lightning as L
import numpy as np
import torch

from twincar.compat.lightning import child_processes, subprocess_launch

log = logging.getLogger(__name__)

# Hydra overrides that belong to the sweep, not to one of its jobs: dropped when relaunching a job.
SWEEP_OVERRIDES = ("hydra.sweep", "hydra/launcher", "hydra.launcher", "hydra/sweeper", "hydra.sweeper", "hydra.mode",
                   "hydra.run.dir", "hydra.output_subdir", "hydra.job.name", "hydra.job.num", "hydra.job.id")


class PerRankSeed(L.Callback):
    """Reseed python, numpy and torch with ``seed + global_rank`` once the processes exist.

    Every process starts from the same seed (same model init, same shuffling of the distributed
    sampler); without this, all ranks would also draw the same random crops, flips and colour
    jitter for their different images. The distributed sampler's seed (``PL_GLOBAL_SEED``) is left
    alone, so the shards still partition the data. A no-op on a single process.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1:
            rank_seed = self.seed + trainer.global_rank
            random.seed(rank_seed)
            np.random.seed(rank_seed % 2**32)
            torch.manual_seed(rank_seed)


def log_file_on_rank_zero_only() -> None:
    """Detach the job's log file from processes other than global rank 0.

    When SLURM starts the DDP processes (``hydra/launcher=slurm``), every rank runs the Hydra job
    and opens the job's ``train.log``; only rank 0 should write it. (Ranks that Lightning starts
    are launched without the file handler: see :func:`job_command`.)
    """
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) != 0:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)
            handler.close()


def _config_source_args(hydra_cfg) -> list[str]:
    """``--config-name``, and ``--config-path``/``--config-dir`` when the job's configs came from folders."""
    args = ["--config-name", hydra_cfg.job.config_name]
    for source in hydra_cfg.runtime.config_sources:
        if source.schema == "file" and source.provider == "main":
            args += ["--config-path", source.path]
        elif source.schema == "file" and source.provider == "command-line":
            args += ["--config-dir", source.path]
    return args


def job_command(local_rank: int, hydra_cfg=None, module: str = "twincar.train") -> tuple[list[str], str]:
    """The command (and working directory) that starts rank ``local_rank`` of the current Hydra job.

    ``python -m module`` as a single run (never ``-m``) with the job's own overrides (as a sweeper
    chose them), writing into the job's output directory, without a ``.hydra/`` folder or a log file
    of its own: files are written by rank 0 only. The module is named, not taken from ``sys.argv``,
    because under a launcher such as submitit the running program is the launcher's.
    """
    from hydra.core.hydra_config import HydraConfig

    hc = hydra_cfg if hydra_cfg is not None else HydraConfig.get()
    command = [sys.executable, "-m", module, *_config_source_args(hc)]
    command += [o for o in hc.overrides.hydra if not o.lstrip("~+").startswith(SWEEP_OVERRIDES)]
    command += list(hc.overrides.task)
    command += [
        f'hydra.run.dir="{hc.runtime.output_dir}"',
        "hydra.mode=RUN",
        "hydra.output_subdir=null",
        f"hydra.job.name={hc.job.name}_rank{local_rank}",
    ]
    handlers = hc.job_logging.get("handlers") or {}
    if "file" in handlers:  # the job's log file is rank 0's
        rest = [h for h in hc.job_logging.root.get("handlers", []) if h != "file"]
        command += ["~hydra.job_logging.handlers.file", f"hydra.job_logging.root.handlers=[{','.join(rest)}]"]
    return command, hc.runtime.cwd


# Environment variables Lightning's launcher sets in the launching process for its DDP children.
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextlib.contextmanager
def hydra_job_relaunch(module: str = "twincar.train", child_timeout_s: float = 600) -> Iterator[None]:
    """Run one Hydra job of ``python -m module`` (e.g. ``train(cfg)``) whose DDP ranks start with
    :func:`job_command`, then clean up.

    Inside the block, Lightning's subprocess launcher builds the children's command with ours instead
    of ``_hydra_subprocess_cmd`` (the original ``sys.argv``, ``-m`` included). On the way out, the
    children are waited for (killed if the job failed), the process group is destroyed and the launch variables
    (``MASTER_PORT``, ``LOCAL_RANK``, ...) are restored, so the next job of a sweep, in the same
    process, starts its own processes on a fresh port instead of reusing this job's group.
    Outside Hydra, or when SLURM/torchrun created the processes, it changes nothing.
    """
    saved_env = {k: os.environ.get(k) for k in LAUNCH_ENV}
    failed = False
    command = functools.partial(job_command, module=module)  # (command, cwd), as Lightning's own
    with subprocess_launch(command) as launchers:
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            _clean_up(launchers, failed, saved_env, child_timeout_s)


def _clean_up(launchers: list, failed: bool, saved_env: dict, child_timeout_s: float) -> None:
    """Wait for (or kill) the ranks this process launched, destroy the process group, restore the launch env."""
    if launchers:  # this process launched the job's ranks: leave none of it behind for the next job
        for proc in (p for launcher in launchers for p in child_processes(launcher)):
            if failed:  # rank 0 gave up: the others would wait for it in a collective forever
                proc.kill()
            try:
                proc.wait(timeout=child_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("DDP rank process %d still running after %.0f s: killing it", proc.pid, child_timeout_s)
                proc.kill()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
