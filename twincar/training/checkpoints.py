"""Checkpoint files: written atomically in their folder, and checked before a run resumes from one.

* :class:`AtomicCheckpointIO`: Lightning's ``TorchCheckpointIO`` whose saves go through
  :func:`twincar.models.checkpoint.save_torch` (a temporary file beside the target, fsync, rename). Lightning's own
  save writes a temporary file in the system temp folder and copies it over, so a kill during the copy
  leaves a truncated checkpoint when the run folder is on another filesystem.
* :func:`checkpoint_problem` / :func:`newest_readable`: what ``resume=auto`` falls back on when
  ``last.ckpt`` is damaged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO

from twincar.models import WeightsError
from twincar.models.checkpoint import load_problem, safe_torch_load, save_torch

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes each checkpoint atomically in its final folder; a full disk ends the run
    with one sentence naming the file (:class:`~twincar.files.WriteError`), the previous checkpoint intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        save_torch(checkpoint, path)


def with_atomic_checkpoints(plugins: Any, strategy: Any = None) -> list:
    """The trainer's ``plugins`` (None, one, or a list) plus an :class:`AtomicCheckpointIO`, unless they or the
    ``strategy`` config (a mapping with ``checkpoint_io``) bring a checkpoint IO of their own, which is then kept."""
    if plugins is None:
        plugins = []
    plugins = list(plugins) if isinstance(plugins, Sequence) and not isinstance(plugins, str) else [plugins]
    own = next((p for p in plugins if isinstance(p, CheckpointIO)), None)
    if own is None and isinstance(strategy, Mapping) and strategy.get("checkpoint_io") is not None:
        own = strategy["checkpoint_io"]
    if own is not None:
        log.info("checkpoints are written by the configured checkpoint IO %s, not TwinCar's atomic writer",
                 getattr(own, "_target_", type(own).__name__))
        return plugins
    return [*plugins, AtomicCheckpointIO()]


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from, to follow its name (``is empty (0 bytes)``, ``is truncated or damaged
    (...)``, ``is not a Lightning checkpoint``), or None when it is readable."""
    try:
        ckpt = safe_torch_load(path, mmap=True)  # tensors mapped, not read: cheap even for a large file
    except WeightsError as e:
        return load_problem(path, e.__cause__) if isinstance(e.__cause__, Exception) else str(e)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        return "is not a Lightning checkpoint (no state_dict)"
    return None


def _position(path: Path) -> tuple[int, int, float]:
    """(global step, epoch, mtime) of a readable checkpoint: the newest sorts last."""
    ckpt = safe_torch_load(path, mmap=True)
    return int(ckpt.get("global_step", 0)), int(ckpt.get("epoch", 0)), path.stat().st_mtime


def newest_readable(checkpoint_dir: Path, exclude: Path) -> tuple[Path | None, dict[Path, str]]:
    """The newest readable checkpoint (by step, then epoch) in ``checkpoint_dir`` other than ``exclude``, and why
    each other one is not readable."""
    problems: dict[Path, str] = {}
    readable = []
    for path in sorted(checkpoint_dir.glob("*.ckpt")):
        if path == exclude or not path.is_file():
            continue
        problem = checkpoint_problem(path)
        if problem:
            problems[path] = problem
        else:
            readable.append(path)
    return (max(readable, key=_position) if readable else None), problems

