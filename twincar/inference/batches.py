"""Inputs as numbered items and batches: what a DataLoader worker prepares and how a batch is split into the
readable images and the errors."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from twincar.data.datasets import CarsDataset, collate_readable
from twincar.data.images import ImageReadError, load_rgb, pil_to_uint8

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

ImageInput = str | Path | Image.Image | torch.Tensor


def to_uint8_rgb(image: ImageInput) -> torch.Tensor:
    """A path, PIL image or tensor as a ``uint8`` (3, H, W) RGB tensor; unreadable files raise ImageReadError."""
    if isinstance(image, (str, Path)):
        return load_rgb(image)
    if isinstance(image, Image.Image):
        return pil_to_uint8(image)  # as a file of that mode decodes (16-bit scaled)
    if isinstance(image, torch.Tensor):
        t = image
        if t.ndim == 2:
            t = t.unsqueeze(0)
        if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
            raise ValueError(f"an image tensor must be (C, H, W) with C in 1, 3, 4; got shape {tuple(image.shape)}")
        if t.dtype != torch.uint8:
            raise ValueError(f"an image tensor must be uint8 (0..255); got {t.dtype}")
        return t[:3] if t.shape[0] == 4 else t.expand(3, -1, -1) if t.shape[0] == 1 else t
    raise TypeError(f"cannot predict on a {type(image).__name__}: pass a path, a PIL image or a uint8 tensor")


def source_name(image: ImageInput) -> str:
    """How an input is named in results: its path, or ``<PIL image>`` / ``<tensor>``."""
    if isinstance(image, (str, Path)):
        return str(image)
    return "<PIL image>" if isinstance(image, Image.Image) else "<tensor>"


def prepare_image(image: ImageInput, transform: nn.Module, min_side: int | None = None) -> torch.Tensor:
    """Decode (a large JPEG file at reduced size, never below ``min_side``: ``load_rgb(min_side=)``) and
    ``transform`` one input into a ``uint8`` (3, S, S) tensor."""
    if isinstance(image, (str, Path)):
        return transform(load_rgb(image, min_side=min_side))
    return transform(to_uint8_rgb(image))


class _Inputs(Dataset):
    """Item ``i``: ``(prepared image, i)``, or ``(None, (i, message))`` when input ``i`` cannot be read (in a
    worker)."""

    def __init__(self, items: Sequence[ImageInput], transform: nn.Module, min_side: int | None):
        self.items = items
        self.transform = transform
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int | str]:
        try:
            return prepare_image(self.items[index], self.transform, self.min_side), index
        except (ImageReadError, ValueError, TypeError) as e:
            return None, (index, str(e))


class _Numbered(Dataset):
    """A :class:`~twincar.data.datamodule.CarsDataset` whose items carry their index instead of their label:
    ``(image, i)``, or ``(None, (i, message))``."""

    def __init__(self, dataset: CarsDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int | str]:
        image, label_or_error = self.dataset[index]
        return (image, index) if image is not None else (None, (index, label_or_error))


Batch = tuple[list[int], torch.Tensor | None, dict[int, str]]  # (readable indices, their images, {index: message})


@dataclass
class BatchOutputs:
    """What one forward pass gives for a batch of numbered inputs (:meth:`Predictor.batch_outputs`)."""

    indices: list[int]  # the readable inputs, in the batch's order
    raw: torch.Tensor | None  # (N, K) float32 logits at temperature 1 (flip TTA included); None: nothing readable
    calibrated: torch.Tensor | None  # (N, K) the same divided by the model's temperature (Predictor.logits)
    errors: dict[int, str]  # {index: message} of the unreadable inputs
    embeddings: torch.Tensor | None = None  # (N, D) L2-normalised pre-logit features, when asked for


def split_batch(collated: tuple) -> Batch:
    """A batch of numbered items as :func:`~twincar.data.datasets.collate_readable` puts them together (``images,
    indices[, [(index, message), ...]]``): ``(indices of the readable items, their uint8 batch or None, {index:
    message} of the unreadable ones)``. Any sampler's batches, in any order (Lightning's distributed one too)."""
    images, indices, *failed = collated
    ok = indices.tolist()
    return ok, (images if ok else None), dict(failed[0]) if failed else {}


def iter_batches(
    dataset: Dataset, *, batch_size: int, num_workers: int = 0, pin_memory: bool = False
) -> Iterator[Batch]:
    """Batches of a dataset whose items are ``(image, index)`` or ``(None, (index, message))``, in order (see
    :func:`split_batch`). Unreadable items are dropped by the one collate of the data layer
    (:func:`~twincar.data.datasets.collate_readable`), never replaced."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_readable, pin_memory=pin_memory)
    for collated in loader:
        yield split_batch(collated)


