"""The one loop over labelled images (eval, calibrate, index, the ablation and the end of training), and the
labelled images of a split."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from twincar.data.classes import class_names_difference
from twincar.data.formats import Sample
from twincar.data.images import sample_label
from twincar.errors import TwinCarError
from twincar.inference.batches import Batch, BatchOutputs, Numbered, labelled_inputs
from twincar.inference.predictor import Predictor
from twincar.runs import find_run_config

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger(__name__)


# -- the one loop over labelled images: eval, the ablation ---------------------------------------------
@dataclass
class EvalOutputs:
    """Logits of every readable image of a split, in sample order, and what could not be read."""

    logits: torch.Tensor  # (N, K) float32: raw (temperature 1) Predictor.outputs, flip TTA included when it has it
    # (the Predictor computes numpy: the tensors are made here, for the torch metrics of evaluation)
    labels: torch.Tensor  # (N,)
    samples: list[Sample]  # the N readable samples
    skipped: list[tuple[str, str]]  # (image, why) of unreadable images
    calibrated: torch.Tensor | None = None  # (N, K): Predictor.logits (the predictor's temperature); None = logits
    embeddings: torch.Tensor | None = None  # (N, D) L2-normalised pre-logit features, when they were asked for

    def __post_init__(self):
        if self.calibrated is None:
            self.calibrated = self.logits


def labelled_dataset(predictor: Predictor, samples: Sequence[Sample], bbox_margin: float | None = None) -> Numbered:
    """Labelled ``samples`` as numbered items (``(image, i)`` or ``(None, (i, message))``), each prepared as the
    predictor prepares a file (a large JPEG decoded at reduced size, resized and cropped), cropped to the car box
    first when ``bbox_margin`` is set (:func:`~twincar.inference.batches.prepare_sample`)."""
    return labelled_inputs(samples, predictor.preprocess, bbox_margin)


def labelled_batches(
    predictor: Predictor, samples: Sequence[Sample], *, bbox_margin: float | None = None, batch_size: int = 64,
    num_workers: int = 0,
) -> Iterator[Batch]:
    """:meth:`Predictor.batches` of :func:`labelled_dataset`."""
    return predictor.batches(labelled_dataset(predictor, samples, bbox_margin), batch_size=batch_size,
                             num_workers=num_workers)


def collect_logits(
    predictor: Predictor, samples: Sequence[Sample], *, bbox_margin: float | None = None, batch_size: int = 64,
    num_workers: int = 0, progress: bool = True, embeddings: bool = False,
) -> EvalOutputs:
    """Run ``predictor`` over labelled ``samples`` in batches. Each image is decoded as :meth:`Predictor.prepare`
    decodes a file (a large JPEG at reduced size), cropped to its car box when ``bbox_margin`` is set (as the
    training run's val/test sets are), and put through the predictor's own preprocessing and :meth:`Predictor.outputs`.
    An unreadable image is named in the log and in ``skipped``, and left out. With ``embeddings``, the images'
    embeddings too, from the same forward pass (:meth:`Predictor.outputs_with_embeddings`). (On many processes:
    :func:`collect_logits_on`.)"""
    from tqdm.auto import tqdm

    samples = list(samples)
    outputs = []
    with tqdm(total=len(samples), desc="eval", unit="img", disable=not progress) as bar:
        for batch in labelled_batches(predictor, samples, bbox_margin=bbox_margin, batch_size=batch_size,
                                      num_workers=num_workers):
            outputs.append(predictor.batch_outputs(batch, embeddings=embeddings))
            bar.update(len(batch[0]) + len(batch[2]))
    return eval_outputs(samples, outputs)


def collect_logits_on(predictor: Predictor, samples: Sequence[Sample], processes, *,
                      bbox_margin: float | None = None, batch_size: int = 64, num_workers: int = 0,
                      progress: bool = True, embeddings: bool = False) -> EvalOutputs | None:
    """:func:`collect_logits` on ``processes`` (:class:`twincar.inference.parallel.Processes`: Lightning's
    ``Trainer.predict`` over the same numbered items and :meth:`Predictor.batch_outputs`): the same
    :class:`EvalOutputs` (sample order) on global rank 0, None on the other ranks."""
    from twincar.cluster import is_launching_process
    from twincar.inference.parallel import GatherOutputs, run_inference

    samples = list(samples)
    if len(samples) < processes.world_size:  # Lightning's sampler gives each process one image at least
        log.info("%d image(s) for %d processes: rank 0 evaluates them alone", len(samples), processes.world_size)
        return collect_logits(predictor, samples, bbox_margin=bbox_margin, batch_size=batch_size,
                              progress=progress, embeddings=embeddings) if is_launching_process() else None
    gather = GatherOutputs()
    run_inference(predictor, labelled_dataset(predictor, samples, bbox_margin), processes, [gather],
                  batch_size=batch_size, num_workers=num_workers, embeddings=embeddings, progress=progress)
    return None if gather.outputs is None else eval_outputs(samples, gather.outputs)


def eval_outputs(samples: Sequence[Sample], outputs: Iterable[BatchOutputs]) -> EvalOutputs:
    """The :class:`EvalOutputs` of labelled ``samples`` from the batch outputs over them (in any order, from any
    number of processes), in sample order; an unreadable image is named in the log and in ``skipped``."""
    outputs = list(outputs)
    errors = dict(sorted((i, m) for o in outputs for i, m in o.errors.items()))
    for message in errors.values():
        log.warning("skipping unreadable image: %s", message)
    skipped = [(sample_label(samples[i]), message) for i, message in errors.items()]
    done = [o for o in outputs if o.indices]
    if not done:
        first = skipped[0][1] if skipped else "-"
        raise TwinCarError(f"none of the {len(samples)} images could be read (first: {first})")
    indices = np.array([i for o in done for i in o.indices])
    order = indices.argsort(kind="stable")
    kept = [samples[i] for i in indices[order].tolist()]

    def joined(parts: list[np.ndarray]) -> torch.Tensor:  # the batches' numpy outputs as one tensor, sample order
        return torch.from_numpy(np.ascontiguousarray(np.concatenate([np.asarray(p) for p in parts])[order]))

    features = joined([o.embeddings for o in done]) if done[0].embeddings is not None else None
    return EvalOutputs(joined([o.raw for o in done]), torch.tensor([s.label for s in kept]), kept, skipped,
                       joined([o.calibrated for o in done]), features)


# -- the labelled images of a split: eval, calibrate ------------------------------------------------------
SPLITS = ("test", "val")


class EvalError(TwinCarError, ValueError):
    """A bad eval option or input; the message names it and what to pass."""


def data_config(cfg: DictConfig) -> tuple[dict, str]:
    """(CarsDataModule config, split): the training run's data config with this run's non-null ``data.*``
    on top; or, when a data group was chosen here (``data=stanford_cars``), that one."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg.data, resolve=True)
    split = data.pop("split", "test")
    if split not in SPLITS:
        raise EvalError(f"data.split={split} is not a split: use data.split=test or data.split=val")
    if "_target_" not in data:
        run_config = cfg.get("run_config") or find_run_config(cfg.ckpt)
        if run_config is None or not Path(run_config).is_file():
            raise EvalError(
                f"no training config.yaml found for {cfg.ckpt} to take the data from: pass data=stanford_cars "
                "data.root=PATH (or run_config=PATH/config.yaml)"
            )
        base = OmegaConf.to_container(OmegaConf.load(run_config).data, resolve=True)
        base.update({k: v for k, v in data.items() if v is not None})
        data = base
        log.info("data config from %s", run_config)
    data["augmentation"] = None  # eval images go through the model's own preprocessing only
    return data, split


def eval_samples(data: dict, split: str, class_names: list[str]) -> tuple[list[Sample], float | None, list[str]]:
    """The labelled samples of ``split`` exactly as training's CarsDataModule splits them, the car-box crop
    margin it applies (None: no crop) and the images it left out (``data.on_corrupt=skip``)."""
    import hydra

    datamodule = hydra.utils.instantiate(data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("validate")
    difference = class_names_difference(class_names, datamodule.class_names)
    if difference:
        raise EvalError(f"the model's classes differ from those of the data at {datamodule.root} ({difference}, "
                        "model against data): pass the data.root it was trained on")
    if split == "test" and not datamodule.has_test_labels:
        raise EvalError(f"{datamodule.root} has no test labels: use data.split=val")
    dataset = {"test": datamodule.test_set, "val": datamodule.val_set, "train": datamodule.train_set}[split]
    return list(dataset.samples), getattr(dataset, "bbox_margin", None), list(getattr(datamodule, "skipped", []))
