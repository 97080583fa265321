"""Inference on many processes and nodes: Lightning's ``Trainer.predict`` over the one :class:`Predictor`.

predict (``--devices N [--num-nodes M]``) and eval (``trainer.devices=N``) come here when more than one process
runs. Lightning starts the processes (or joins them, when ``torchrun`` or SLURM's ``srun`` started them), gives
each an unrepeated share of the inputs (its ``UnrepeatedDistributedSampler`` for predict: no image twice, no
padding) and a device; each process runs the same :meth:`Predictor.batch_outputs` as a one-process run does, on the
same decoding and transforms. What happens to the outputs is a callback's: the sharded, resumable writer of predict
(:mod:`twincar.inference.shards`), or :class:`GatherOutputs`, which brings eval's logits to rank 0.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from twincar.cluster import launched_processes
from twincar.data.datasets import collate_readable
from twincar.errors import TwinCarError
from twincar.inference.batches import BatchOutputs, split_batch
from twincar.inference.predictor import Predictor

log = logging.getLogger(__name__)

ACCELERATORS = ("auto", "cpu", "gpu", "cuda")


@dataclass(frozen=True)
class Processes:
    """How many inference processes run, and on what: ``devices`` per node x ``num_nodes`` nodes."""

    devices: int = 1  # processes per node (one per GPU; on the CPU each one uses cores/devices threads)
    num_nodes: int = 1  # machines
    accelerator: str = "auto"  # auto (GPUs when there are any) | cpu | gpu

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def resolve_processes(devices: int | None = None, num_nodes: int | None = None,
                      accelerator: str = "auto") -> Processes:
    """The processes a run asks for (a value left out: 1). Under ``torchrun`` or ``srun`` they are the ones it
    started (:func:`~twincar.cluster.launched_processes`), and a number given here must agree (1 is the
    default)."""
    accelerator = "gpu" if accelerator == "cuda" else accelerator
    if accelerator not in ACCELERATORS:
        raise TwinCarError(f"--accelerator must be auto, cpu or gpu, got {accelerator!r}")
    launched = launched_processes()
    if launched is not None:
        launcher, local, nodes = launched
        for flag, value, started in (("devices", devices, local), ("num-nodes", num_nodes, nodes)):
            if value not in (None, 1, started):
                raise TwinCarError(f"--{flag} {value}: {launcher} started {started} (per node: {local}, nodes: "
                                   f"{nodes}); leave it out or give that number")
        devices, num_nodes = local, nodes
    devices = 1 if devices is None else devices
    num_nodes = 1 if num_nodes is None else num_nodes
    for flag, value in (("--devices", devices), ("--num-nodes", num_nodes)):
        if not isinstance(value, int) or value < 1:
            raise TwinCarError(f"{flag} must be a whole number of at least 1, got {value!r}")
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise TwinCarError("--accelerator gpu: no CUDA GPU is available here: use --accelerator cpu (or auto)")
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "gpu" and devices > torch.cuda.device_count():
        raise TwinCarError(f"--devices {devices}: this machine has {torch.cuda.device_count()} GPU(s)")
    return Processes(devices, num_nodes, accelerator)


class InferenceModule(L.LightningModule):
    """The Predictor as Lightning runs it in each process: ``predict_step`` is :meth:`Predictor.batch_outputs`."""

    def __init__(self, predictor: Predictor, *, embeddings: bool = False):
        super().__init__()
        self.predictor = predictor
        self.network = predictor.model  # a submodule, so that Lightning moves it to the process's device
        self.embeddings = embeddings

    def on_predict_start(self) -> None:
        self.predictor.to(self.device)  # precision auto is resolved for this device
        processes_here = self.trainer.num_devices
        if self.device.type == "cpu" and processes_here > 1:  # the node's cores are shared, not each one's
            torch.set_num_threads(max(1, torch.get_num_threads() // processes_here))

    def predict_step(self, batch: tuple, batch_idx: int) -> BatchOutputs:
        return self.predictor.batch_outputs(split_batch(batch), embeddings=self.embeddings)


def run_inference(predictor: Predictor, dataset: Dataset, processes: Processes, callbacks: Sequence[L.Callback], *,
                  batch_size: int, num_workers: int = 0, embeddings: bool = False, progress: bool = True) -> L.Trainer:
    """Run ``predictor`` over a dataset of numbered items (``(image, i)`` or ``(None, (i, message))``) in
    ``processes``, each on its share; the ``callbacks`` receive every batch's :class:`BatchOutputs`. The processes'
    group ends with the run: what rank 0 does with the results after it is its own work (torchmetrics, for one,
    would otherwise wait for the other ranks at ``compute``)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_readable, pin_memory=processes.accelerator == "gpu")
    threads = torch.get_num_threads()  # InferenceModule shares a CPU node's cores among its processes
    with warnings.catch_warnings(), quiet_lightning():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")  # inside lightning 2.6 on torch 2.1x
        trainer = L.Trainer(
            accelerator=processes.accelerator, devices=processes.devices, num_nodes=processes.num_nodes,
            strategy="ddp" if processes.world_size > 1 else "auto", precision="32-true",  # the Predictor's autocast
            logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
            callbacks=list(callbacks),
        )
        trainer.predict(InferenceModule(predictor, embeddings=embeddings), dataloaders=loader,
                        return_predictions=False)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # what follows (merge, metrics) is rank 0's alone: no collectives
    torch.set_num_threads(threads)
    predictor.to(trainer.strategy.root_device)  # Lightning's teardown left the network on the CPU
    return trainer


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's start-up banners (accelerators, tips, the DDP registration) as debug, not info, messages: an
    inference run says what it does in its own lines."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class GatherOutputs(L.Callback):
    """Keeps each process's batch outputs and, at the end, gathers them all in rank 0's :attr:`outputs` (the other
    ranks' :attr:`outputs` are then None)."""

    def __init__(self):
        self.outputs: list[BatchOutputs] | None = []

    def on_predict_batch_end(self, trainer, pl_module, outputs: BatchOutputs, batch, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        self.outputs.append(outputs)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size == 1:
            return
        gathered = [None] * trainer.world_size if trainer.is_global_zero else None
        torch.distributed.gather_object(self.outputs, gathered, dst=0)
        self.outputs = [o for rank in gathered for o in rank] if trainer.is_global_zero else None
