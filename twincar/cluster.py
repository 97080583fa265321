"""The processes of a job, for training and inference alike: ranks (Lightning, torchrun, SLURM), SLURM's job id,
requeue and its time-limit signal, and one writer per run directory.

The lock, ``.twincar.lock`` (PID, host, start time as JSON), is taken when a run starts.

A second run into the same directory stops with one sentence naming the first one. A lock left by a crashed or
killed run (same host, its PID gone) is taken over, saying so. Only the launching global-rank-0 process takes
it: the DDP ranks of the same run (started by Lightning, torchrun or SLURM) write into the same directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from twincar.errors import TwinCarError
from twincar.files import dumps

log = logging.getLogger(__name__)

LOCK = ".twincar.lock"
# Set in the processes of a distributed run other than the one that launched it (Lightning's subprocess
# launcher: LOCAL_RANK/NODE_RANK; torchrun: RANK; SLURM: SLURM_PROCID): a non-zero value means another rank.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


class RunLockError(TwinCarError):
    """Another run is writing into this run directory."""


def is_launching_process() -> bool:
    """Whether this is the global-rank-0 process that started the run (no rank variable set to another rank)."""
    return all(os.environ.get(name, "0") in ("", "0") for name in RANK_VARIABLES)


def launched_processes() -> tuple[str, int, int] | None:
    """``(launcher, processes per node, nodes)`` when a launcher started this process as one of several: torchrun
    (``LOCAL_WORLD_SIZE``, ``WORLD_SIZE``) or SLURM's ``srun`` (the step's ``SLURM_STEP_NUM_TASKS`` over
    ``SLURM_STEP_NUM_NODES``; not in a job named ``bash`` or ``interactive``, which Lightning's SLURM environment
    leaves alone too); None when it runs alone."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env and "LOCAL_WORLD_SIZE" in env:
        local = int(env["LOCAL_WORLD_SIZE"])
        return "torchrun", local, int(env["WORLD_SIZE"]) // local
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or 1)
    if tasks > 1 and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        nodes = int(env.get("SLURM_STEP_NUM_NODES") or 1)
        return "srun", tasks // nodes, nodes
    return None


def slurm_job_id() -> str | None:
    """The SLURM job this process runs in (``ARRAYID_TASKID`` for an array's task); None outside SLURM."""
    env = os.environ
    job = (f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
           if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID") else env.get("SLURM_JOB_ID"))
    return job if job and re.fullmatch(r"[0-9_]+", job) else None


def requeue_slurm_job(job: str) -> str:
    """Put SLURM job ``job`` back in the queue (``scontrol requeue``; SLURM then stops its processes with SIGTERM).
    Returns "" when done, else why not (logged as a warning by the caller)."""
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    log.info("scontrol requeue %s: exit code %d", job, done.returncode)
    return (done.stderr.strip() or f"exit status {done.returncode}") if done.returncode else ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read(path: Path) -> dict | None:
    """The lock's content; None when it is unreadable (being written, or left half-written by a kill)."""
    for _ in range(10):  # a starting run creates the file, then writes it: give it a moment
        try:
            owner = json.loads(path.read_text("utf-8"))
            if isinstance(owner, dict):
                return owner
        except FileNotFoundError:
            raise
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return None


def _create(path: Path) -> dict:
    """Create the lock file exclusively; FileExistsError when another process holds it."""
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, (dumps(owner) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return owner


TRAINING = ("training run", "train into another hydra.run.dir")  # what holds a lock, and what to do instead


def acquire(run_dir: Path, holder: tuple[str, str] = TRAINING) -> dict:
    """Take ``run_dir``'s lock, taking over a stale one (same host, PID gone, or unreadable); returns its content.

    Raises :class:`RunLockError` naming the other run when it is alive (or on another host); ``holder``: what kind
    of run holds such a lock and what a second one does instead, for that message."""
    path = run_dir / LOCK
    for _ in range(3):  # another process may take over or release the lock between two steps
        try:
            return _create(path)
        except FileExistsError:
            pass
        try:
            owner = _read(path)
        except FileNotFoundError:  # released meanwhile
            continue
        host = socket.gethostname()
        if owner is not None and (owner.get("host") != host or _alive(int(owner.get("pid", -1)))):
            raise RunLockError(
                f"another {holder[0]} (PID {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}) "
                f"is writing into {run_dir}: wait for it to end or {holder[1]} (if it is no longer running, delete "
                f"{path})"
            )
        log.warning("taking over the lock %s of a run that is no longer running (%s)", path,
                    f"PID {owner.get('pid')} on {owner.get('host')}" if owner else "unreadable lock file")
        with contextlib.suppress(FileNotFoundError):
            if owner is None or _read(path) == owner:  # still the stale one, not a lock just taken by another run
                path.unlink()
    raise RunLockError(f"could not take the lock {path}: other runs are starting in {run_dir} at the same time")


def release(run_dir: Path, owner: dict) -> None:
    """Remove ``run_dir``'s lock if it is still ``owner``'s."""
    path = run_dir / LOCK
    with contextlib.suppress(OSError):
        if _read(path) == owner:
            path.unlink()


@contextlib.contextmanager
def run_lock(run_dir: str | Path, holder: tuple[str, str] = TRAINING) -> Iterator[bool]:
    """Hold ``run_dir``'s lock inside the block (launching process only; yields whether this process holds it);
    ``holder`` as :func:`acquire` takes it."""
    run_dir = Path(run_dir)
    if not is_launching_process():
        yield False
        return
    owner = acquire(run_dir, holder)
    try:
        yield True
    finally:
        release(run_dir, owner)


REQUEUE_SIGNAL = signal.SIGUSR1  # what ``sbatch --signal=USR1@SECONDS`` sends before the time limit (as Lightning)


@contextlib.contextmanager
def requeue_on_time_limit() -> Iterator[None]:
    """In a SLURM job submitted with ``sbatch --requeue --signal=USR1@SECONDS``: on the SIGUSR1 that SLURM sends
    before the time limit, rank 0 puts the job back in the queue (``scontrol requeue``). SLURM then stops every
    process with SIGTERM, which keeps the rows predicted so far (:class:`~twincar.inference.shards.ShardWriter`), and
    the
    requeued script's ``--resume`` predicts the rest. Every other process of the job (other ranks, data-loading
    workers) ignores the signal, which would otherwise kill it. Outside SLURM, off the main thread, or when a
    SIGUSR1 handler is already set, nothing changes; Lightning then does not install its own, which would also
    save a training checkpoint."""
    job = slurm_job_id()
    if (job is None or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(REQUEUE_SIGNAL) not in (None, signal.SIG_DFL)):
        yield
        return
    pid = os.getpid()

    def requeue(signum: int, frame) -> None:
        if os.getpid() != pid or not is_launching_process():  # a data-loading worker, or another rank
            return
        log.warning("SLURM's signal before the time limit: requeueing job %s (the rows predicted so far are kept, "
                    "and the requeued job's --resume predicts the rest)", job)
        if failed := requeue_slurm_job(job):
            log.warning("scontrol requeue %s failed (%s): the job runs on to its time limit; submit it again with "
                        "--resume to predict the rest", job, failed)

    previous = signal.signal(REQUEUE_SIGNAL, requeue)
    try:
        yield
    finally:
        signal.signal(REQUEUE_SIGNAL, previous)
