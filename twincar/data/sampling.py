"""How a dataset is shared among processes: the global batch split per process, and eval shards that count
every image exactly once (no padding repeats)."""

from __future__ import annotations

from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, DistributedSampler

from twincar.errors import TwinCarError


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

