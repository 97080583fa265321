"""Datasets over a list of samples, and the one collate that leaves unreadable images out of a batch.

Imports nothing of Lightning: inference (predict, eval) uses these too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from twincar.data.formats import Sample
from twincar.data.images import ImageReadError, load_sample, oriented_box, sample_header
from twincar.data.transforms import crop_to_box, to_tensor


class CarsDataset(Dataset):
    """Images and labels from a list of samples, optionally cropped to their car box first.

    An image that fails to decode here (a truncated file that passed the header check) is never replaced
    by another: the item comes back as ``(None, message)`` and :func:`collate_readable` leaves it out of
    the batch, so it is counted nowhere; the datamodule names it once and applies ``data.on_corrupt``.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: torch.nn.Module,
        bbox_margin: float | None = None,
        reader: Callable[[Sample], torch.Tensor | np.ndarray] | None = None,
    ):
        self.samples = list(samples)
        self.transform = transform
        self.bbox_margin = bbox_margin  # None: no crop; else crop to the box grown by this fraction per side
        self.reader = reader or load_sample  # sample -> uint8 (H, W, 3) array (the file) or (3, H, W) (ImageCache)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int | str]:
        sample = self.samples[index]
        try:
            img = self.reader(sample)
            if isinstance(img, np.ndarray):  # decoded here (H, W, 3); an ImageCache gives the (3, H, W) tensor
                img = to_tensor(img)
            if self.bbox_margin is not None:
                img = crop_to_box(img, car_box(sample, img.shape[-1], img.shape[-2]), self.bbox_margin)
        except ImageReadError as e:
            return None, str(e)
        return self.transform(img), sample.label


class DeviceRefDataset(CarsDataset):
    """The items of the GPU input paths (``data.pipeline=gpu_decode|gpu_cache``):
    ``(ImageRef, label)``, the image's JPEG bytes or cache slice with its car box; the crop and ``transform``
    run per batch on the device (:class:`twincar.data.device.DeviceImages`). Unreadable: ``(None, message)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.boxes: dict[Sample, tuple[int, int, int, int]] = {}  # car boxes: each header read once, not per epoch

    def __getitem__(self, index: int) -> tuple:
        sample = self.samples[index]
        try:
            ref = self.reader(sample)
            if self.bbox_margin is not None:
                if sample not in self.boxes:
                    self.boxes[sample] = car_box(sample, ref.width, ref.height)
                ref = ref._replace(box=self.boxes[sample])
        except ImageReadError as e:
            return None, str(e)
        return ref, sample.label


def collate_readable(batch: list[tuple], collate_images: Callable[[list], object] | None = None) -> tuple:
    """``default_collate`` of the decoded items: ``(images, labels)``, plus the list of what the unreadable items
    carried instead of a label (their error message; ``(index, message)`` for numbered items, as inference reads
    them) as a third element when some images of the batch could not be decoded (left out, never replaced).
    ``collate_images``: how the images are put together instead (the GPU paths: ``ImageRefs``)."""
    good = [item for item in batch if item[0] is not None]
    failed = [item[1] for item in batch if item[0] is None]
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), failed
    if collate_images is None:
        images, labels = default_collate(good)
    else:
        images, labels = collate_images([item[0] for item in good]), default_collate([item[1] for item in good])
    return (images, labels, failed) if failed else (images, labels)


def car_box(sample: Sample, width: int, height: int) -> tuple[int, int, int, int]:
    """``sample.bbox`` (stored pixels) in the pixels of its image as decoded: EXIF-oriented, and maybe smaller
    (``width`` x ``height``: reduced-size decode, cache)."""
    header = sample_header(sample)
    return scale_box(oriented_box(sample.bbox, header), header, width, height)


def scale_box(box: tuple[int, int, int, int], header, width: int, height: int) -> tuple[int, int, int, int]:
    """A 1-based box in the pixels of the full-size (oriented) image, in those of the same image decoded at
    ``width`` x ``height`` (reduced-size decode, cache)."""
    full_w, full_h = (header.height, header.width) if header.orientation >= 5 else (header.width, header.height)
    if (full_w, full_h) == (width, height):
        return box
    sx, sy = width / full_w, height / full_h
    x1, y1, x2, y2 = box
    return max(1, round(x1 * sx)), max(1, round(y1 * sy)), min(width, round(x2 * sx)), min(height, round(y2 * sy))
