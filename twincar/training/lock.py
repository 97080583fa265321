"""One writer per run directory: ``.twincar.lock`` (PID, host, start time as JSON), taken when a run starts.

A second run into the same directory stops with one sentence naming the first one. A lock left by a crashed or
killed run (same host, its PID gone) is taken over, saying so. Only the launching global-rank-0 process takes
it: the DDP ranks of the same run (started by Lightning, torchrun or SLURM) write into the same directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
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


def acquire(run_dir: Path) -> dict:
    """Take ``run_dir``'s lock, taking over a stale one (same host, PID gone, or unreadable); returns its content.

    Raises :class:`RunLockError` naming the other run when it is alive (or on another host)."""
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
                f"another training run (PID {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}) "
                f"is writing into {run_dir}: wait for it to end or train into another hydra.run.dir (if it is no "
                f"longer running, delete {path})"
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
def run_lock(run_dir: str | Path) -> Iterator[bool]:
    """Hold ``run_dir``'s lock inside the block (launching process only; yields whether this process holds it)."""
    run_dir = Path(run_dir)
    if not is_launching_process():
        yield False
        return
    owner = acquire(run_dir)
    try:
        yield True
    finally:
        release(run_dir, owner)
