"""How a dataset is split and shared: the stratified train/val (and held-out test) split, kept beside the data, the
global batch split per process, and eval shards that count every image exactly once (no padding repeats)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, DistributedSampler

from twincar.data.formats import Sample
from twincar.errors import TwinCarError
from twincar.files import write_json

log = logging.getLogger(__name__)


class BatchSizeError(TwinCarError):
    """A global batch size that does not split evenly across the processes."""


def per_device_batch_size(global_batch: int, world_size: int, *, option: str = "data.batch_size") -> int:
    """The batch each process loads so that ``world_size`` of them make ``global_batch``.

    Raises :class:`BatchSizeError` when it does not divide: the experiment would silently change.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if global_batch % world_size:
        raise BatchSizeError(
            f"{option}={global_batch} is the global batch and does not divide across {world_size} processes "
            f"(trainer.devices x trainer.num_nodes): use a multiple of {world_size}"
        )
    return global_batch // world_size


def eval_sampler(dataset: Dataset, world_size: int, rank: int) -> DistributedSampler | None:
    """Rank ``rank``'s share of ``dataset`` for validation/testing: every item exactly once over all ranks.

    Torch's ``DistributedSampler`` pads the last shard with repeats, so a few images would count
    twice in the metrics; this one gives shards that differ in length by at most one (safe in
    eval, where DDP syncs buffers only on the first batch). ``None`` on a single process.
    """
    if world_size <= 1:
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a stratified train/val split: every class with >= 2 images has >= 1 in val."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(len(idx) - 1, max(1, round(len(idx) * val_fraction)))
        val.extend(idx[:n_val].tolist())
        train.extend(idx[n_val:].tolist())
    return sorted(train), sorted(val)


def load_or_make_split(
    samples: Sequence[Sample], val_fraction: float, seed: int, cache_dir: str | Path | None
) -> dict:
    """The stratified train/val split of ``samples`` as file names: ``{"train": [...], "val": [...], ...}``.

    The split is cached in ``cache_dir`` under a hash of the samples (names and labels), the
    fraction and the seed, and read back from there when the same data and seed are split again.
    """
    key = hashlib.sha1(json.dumps([[s.name, s.label] for s in samples] + [val_fraction, seed]).encode())
    cache = Path(cache_dir) / f"split_{key.hexdigest()[:12]}.json" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            split = json.loads(cache.read_text())
            log.info("reusing split %s", cache)
            return split
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable split cache %s: %s", cache, e)
    train, val = stratified_split([s.label for s in samples], val_fraction, seed)
    split = {"val_fraction": val_fraction, "seed": seed,
             "train": [samples[i].name for i in train], "val": [samples[i].name for i in val]}
    if cache is not None:
        try:
            write_json(cache, split)  # atomic: parallel runs never read half a file
        except OSError as e:
            log.warning("could not cache the split in %s: %s", cache.parent, e)
    return split
