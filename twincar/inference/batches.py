"""Inputs as numbered items, and numbered batches with the unreadable inputs set apart.

One per-item step for every engine: :func:`twincar.inference.preprocess.prepare` (an input) or
:func:`prepare_sample` (a labelled sample, cropped to its car box first) gives an (S, S, 3) ``uint8`` array, or the
item is ``(None, (i, message))`` when input ``i`` cannot be read. :func:`iter_batches` puts the items together:
with ``num_workers`` (a torch engine) in a DataLoader, whose batches are ``uint8`` tensors (N, S, S, 3), otherwise in
a plain loop here (no torch imported: the ONNX engine), whose batches are numpy arrays. Both give
:data:`Batch` = ``(indices of the readable inputs, their batch or None, {index: message} of the others)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from twincar.data.images import ImageReadError, box_pixels, load_sample
from twincar.data.preprocess import Preprocess
from twincar.inference.preprocess import ImageInput, prepare

if TYPE_CHECKING:  # the sample type only: data.formats imports scipy, which the torch-free runtime lacks
    from twincar.data.formats.common import Sample

log = logging.getLogger(__name__)

Batch = tuple  # (readable indices: list[int], their uint8 (N, S, S, 3) batch or None, {index: message})


def source_name(image: ImageInput) -> str:
    """How an input is named in results: its path, or ``<PIL image>`` / ``<array>`` / ``<tensor>``."""
    if isinstance(image, (str, Path)):
        return str(image)
    if isinstance(image, Image.Image):
        return "<PIL image>"
    return "<array>" if isinstance(image, np.ndarray) else "<tensor>"


def prepare_sample(sample: Sample, pre: Preprocess, bbox_margin: float | None = None) -> np.ndarray:
    """A labelled sample as a prediction prepares a file (a large JPEG decoded at reduced size), cropped to its
    car box grown by ``bbox_margin`` first when that is set (as the training run's val/test sets are)."""
    image = load_sample(sample, min_side=pre.decode_min_side)
    if bbox_margin is not None:
        from twincar.data.datasets import car_box  # reads the box's header: the car box of the decoded pixels

        h, w = image.shape[:2]
        box = box_pixels(car_box(sample, w, h), bbox_margin, w, h)
        if box is not None:
            left, top, right, bottom = box
            image = image[top:bottom, left:right]
    return prepare(image, pre)


class Numbered:
    """Item ``i``: ``(prepare(items[i]), i)``, or ``(None, (i, message))`` when it cannot be read. A map-style
    dataset (DataLoader workers prepare the items) that needs no torch to be built."""

    def __init__(self, items: Sequence, prepare_item: Callable[[object], np.ndarray]):
        self.items = items
        self.prepare_item = prepare_item

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[np.ndarray | None, int | tuple[int, str]]:
        try:
            return self.prepare_item(self.items[index]), index
        except (ImageReadError, ValueError, TypeError) as e:
            return None, (index, str(e))


def inputs(images: Sequence[ImageInput], pre: Preprocess) -> Numbered:
    """Inputs (paths, PIL images, arrays, tensors) as numbered items, each :func:`prepare`\\ d."""
    return Numbered(images, partial(prepare, pre=pre))  # a partial pickles: DataLoader workers


def labelled_inputs(samples: Sequence[Sample], pre: Preprocess, bbox_margin: float | None = None) -> Numbered:
    """Labelled samples as numbered items, each :func:`prepare_sample`\\ d (the label stays in the sample)."""
    return Numbered(list(samples), partial(prepare_sample, pre=pre, bbox_margin=bbox_margin))


@dataclass
class BatchOutputs:
    """What one forward pass gives for a batch of numbered inputs (:meth:`Predictor.batch_outputs`), numpy."""

    indices: list[int]  # the readable inputs, in the batch's order
    raw: np.ndarray | None  # (N, K) float32 logits at temperature 1 (flip TTA included); None: nothing readable
    calibrated: np.ndarray | None  # (N, K) the same divided by the model's temperature (Predictor.logits)
    errors: dict[int, str]  # {index: message} of the unreadable inputs
    embeddings: np.ndarray | None = None  # (N, D) L2-normalised pre-logit features, when asked for


def split_batch(collated: tuple) -> Batch:
    """A batch of numbered items as :func:`~twincar.data.datasets.collate_readable` puts them together (``images,
    indices[, [(index, message), ...]]``): ``(indices of the readable items, their uint8 batch or None, {index:
    message} of the unreadable ones)``. Any sampler's batches, in any order (Lightning's distributed one too)."""
    images, indices, *failed = collated
    ok = indices.tolist()
    return ok, (images if ok else None), dict(failed[0]) if failed else {}


def iter_batches(dataset: Numbered, *, batch_size: int, num_workers: int | None = 0,
                 pin_memory: bool = False) -> Iterator[Batch]:
    """Batches of numbered items, in order. ``num_workers`` None: a plain loop in this process (no torch), numpy
    batches; a number: a torch DataLoader with that many worker processes (0: in this process), tensor batches,
    put together by the one collate of the data layer (:func:`~twincar.data.datasets.collate_readable`).
    Unreadable items are set apart, never replaced."""
    if num_workers is None:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            good = [(image, i) for image, i in items if image is not None]
            errors = dict(i for image, i in items if image is None)
            yield [i for _, i in good], np.stack([image for image, _ in good]) if good else None, errors
        return
    from torch.utils.data import DataLoader

    from twincar.data.datasets import collate_readable

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_readable, pin_memory=pin_memory)
    for collated in loader:
        yield split_batch(collated)
