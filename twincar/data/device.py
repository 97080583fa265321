"""The two GPU input paths: JPEGs decoded on the training device, and the image cache held in device memory.

Both move the per-image work of :class:`~twincar.data.datamodule.CarsDataset` (decode, car-box crop, the
geometric transforms) from the DataLoader workers to the device the batch lands on (``on_after_batch_transfer``):

* ``data.pipeline=gpu_decode``: workers only read each file's bytes and its EXIF orientation from the header
  (:func:`read_encoded`); a batch's JPEGs are decoded in one ``torchvision.io.decode_jpeg(list, device=)``
  call (nvJPEG on a GPU) and oriented on the device (:func:`orient`). Other files, and JPEGs nvJPEG cannot
  decode (CMYK), are decoded in the worker as without the option and travel decoded.
* ``data.pipeline=gpu_cache``: the raw image cache is one flat ``uint8`` tensor in device memory
  (:class:`DeviceCache`); the loader yields where each image is in it (:func:`cache_ref`), nothing is decoded.

Then, per image on the device (:class:`DeviceImages`): the car-box crop and the very same per-image transforms
as the worker path (:class:`~twincar.data.transforms.TrainImageTransform`,
:class:`~twincar.data.transforms.EvalImageTransform`: torchvision v2 ops run on device tensors), stacked into
the ``uint8`` batch that :class:`~twincar.data.transforms.BatchTransform` takes as before.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torchvision.io import ImageReadMode, decode_jpeg

from twincar.data.cache import DATA, ImageCache
from twincar.data.formats import Sample, parquet
from twincar.data.images import load_sample, sample_header, sample_label
from twincar.data.transforms import crop_to_box, to_tensor
from twincar.errors import TwinCarError

log = logging.getLogger(__name__)

GPU_JPEG_MODES = ("RGB", "L")  # PIL modes of the JPEGs nvJPEG decodes to RGB (not CMYK / YCCK)
DEVICE_HEADROOM = 0.25  # share of the device's memory the on-device cache leaves free for training
COPY_CHUNK = 256 * 2**20  # bytes copied to the device at a time when loading the cache


class ImageRef(NamedTuple):
    """One image of a batch before it is on the device as an image.

    ``source``: the file's JPEG bytes (1-D ``uint8``), an image decoded in the worker (``uint8`` (3, H, W)),
    or ``(offset, h, w)`` of a raw image in the cache. ``width`` x ``height``: the image as decoded, EXIF
    orientation applied. ``box``: the car box in those pixels (``data.crop_to_bbox``), else None.
    """

    source: torch.Tensor | tuple[int, int, int]
    name: str
    orientation: int = 1
    width: int = 0
    height: int = 0
    box: tuple[int, int, int, int] | None = None


class ImageRefs:
    """A batch's :class:`ImageRef` list. A plain class on purpose: Lightning's batch transfer moves the tensors
    of lists, dicts and dataclasses to the device, and ``decode_jpeg`` must read its input from host memory."""

    def __init__(self, items: list[ImageRef]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)


def is_jpeg(data: torch.Tensor) -> bool:
    """True when ``data`` (a file's bytes) starts with the JPEG start-of-image marker."""
    return len(data) > 2 and int(data[0]) == 0xFF and int(data[1]) == 0xD8


def read_encoded(sample: Sample) -> ImageRef:
    """Worker side of ``data.pipeline=gpu_decode``: a JPEG's bytes and EXIF orientation (from the header), or,
    for other files and CMYK JPEGs, the image decoded here as ``load_sample`` does. ImageReadError names it."""
    header = sample_header(sample)
    name = sample_label(sample)
    # not torchvision's read_file: its tensors cannot be sent from a worker process (their storage is not shareable)
    raw = Path(sample.path).read_bytes() if sample.index is None else parquet.image_bytes(sample.path, sample.index)
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if is_jpeg(data) and header.mode in GPU_JPEG_MODES:
        w, h = (header.height, header.width) if header.orientation >= 5 else (header.width, header.height)
        return ImageRef(data, name, header.orientation, w, h)
    img = to_tensor(load_sample(sample)).contiguous()  # sent from a worker: its own storage
    return ImageRef(img, name, 1, img.shape[-1], img.shape[-2])


def cache_ref(cache: ImageCache, sample: Sample) -> ImageRef:
    """Loader side of ``data.pipeline=gpu_cache``: where ``sample``'s raw image is in the cache."""
    offset, _, h, w = cache.entry(sample)[:4]
    return ImageRef((offset, h, w), sample_label(sample), 1, w, h)


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """A decoded (C, H, W) image as displayed: its EXIF ``orientation`` (1-8) applied on its own device, as
    :func:`~twincar.data.images.load_rgb` applies it."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-2, -1)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-2, -1)
    if orientation == 6:
        return img.transpose(-2, -1).flip(-1)  # 90 degrees clockwise
    if orientation == 7:
        return img.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return img.transpose(-2, -1).flip(-2)  # 90 degrees counter-clockwise
    return img


def decode_jpegs(data: list[torch.Tensor], names: list[str], device: torch.device) -> list[torch.Tensor | str]:
    """JPEG bytes (host tensors) -> ``uint8`` (3, H, W) RGB images on ``device``, in one batched ``decode_jpeg``
    call. When that fails, each image is decoded alone so that the bad one is named: its entry is then the
    error message (``cannot read image NAME: ...``) instead of an image."""
    if not data:
        return []
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    out: list[torch.Tensor | str] = []
    for d, name in zip(data, names, strict=True):
        try:
            out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as e:
            out.append(f"cannot read image {name}: {e}")
    return out


def check_cuda(option: str) -> None:
    """Stop with one sentence when ``option`` (a GPU input path) is on and no CUDA device is available."""
    if not torch.cuda.is_available():
        raise TwinCarError(f"{option} needs a CUDA GPU and none is available: use data.pipeline=files "
                           "(or data.pipeline=cache)")


def check_fits(nbytes: int, free: int, total: int, device: torch.device | str) -> None:
    """Stop when ``nbytes`` of cache would leave less than ``DEVICE_HEADROOM`` of the device's memory free."""
    if nbytes > free - DEVICE_HEADROOM * total:
        raise TwinCarError(
            f"the image cache ({nbytes / 2**30:.1f} GiB) does not fit in {device} ({free / 2**30:.1f} of "
            f"{total / 2**30:.1f} GiB free, {DEVICE_HEADROOM:.0%} kept for training): use data.pipeline=cache to "
            "read it memory-mapped through the loader, or lower data.image_size"
        )


class DeviceCache:
    """A raw :class:`ImageCache` as one flat ``uint8`` tensor in device memory, loaded on first use on the device
    the first batch is on (each process of a multi-GPU run holds its own copy)."""

    def __init__(self, cache: ImageCache):
        if cache.format != "raw":
            raise TwinCarError(f"data.pipeline=gpu_cache needs data.cache_format=raw, got {cache.format}")
        self.cache = cache
        self.flat: torch.Tensor | None = None

    def load(self, device: torch.device) -> torch.Tensor:
        """The flat tensor on ``device`` (checked to fit first on a GPU), copied from the memory map in chunks."""
        if self.flat is not None and self.flat.device == device:
            return self.flat
        nbytes = self.cache.nbytes
        if device.type == "cuda":
            check_fits(nbytes, *torch.cuda.mem_get_info(device), device)
        self.flat = None  # on another device: free it first
        flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
        data = np.memmap(self.cache.directory / DATA, dtype=np.uint8, mode="r")
        for start in range(0, nbytes, COPY_CHUNK):
            flat[start:start + COPY_CHUNK].copy_(torch.from_numpy(np.array(data[start:start + COPY_CHUNK])))
        log.info("image cache %s loaded into %s: %.2f GiB", self.cache.directory, device, nbytes / 2**30)
        self.flat = flat
        return flat

    def image(self, where: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        """The ``uint8`` (3, h, w) image at ``(offset, h, w)``: a view of the flat tensor, no copy."""
        offset, h, w = where
        return self.load(device)[offset:offset + 3 * h * w].view(3, h, w)


class DeviceImages:
    """Per batch, on the batch's device: :class:`ImageRefs` -> the ``uint8`` (N, 3, S, S) batch of the worker path.

    Decodes (one batched call) or slices out of the :class:`DeviceCache`, orients, crops to the car box
    (``margin``) and runs ``train_transform`` or ``eval_transform`` per image. Returns ``(images, labels,
    failed)``: images that fail to decode are left out with their labels, ``failed`` names them.
    """

    def __init__(self, train_transform: nn.Module, eval_transform: nn.Module, margin: float | None = None,
                 cache: DeviceCache | None = None):
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.margin, self.cache = margin, cache

    def decode(self, items: list[ImageRef], device: torch.device) -> list[torch.Tensor | str]:
        """Each item as an oriented ``uint8`` (3, H, W) image on ``device``, or its error message."""
        jpegs = [i for i, r in enumerate(items) if isinstance(r.source, torch.Tensor) and r.source.dim() == 1]
        decoded = dict(zip(jpegs, decode_jpegs([items[i].source for i in jpegs], [items[i].name for i in jpegs],
                                               device), strict=True))
        out: list[torch.Tensor | str] = []
        for i, ref in enumerate(items):
            if i in decoded:
                img = decoded[i]
                out.append(img if isinstance(img, str) else orient(img, ref.orientation))
            elif isinstance(ref.source, tuple):
                out.append(self.cache.image(ref.source, device))
            else:
                out.append(ref.source.to(device, non_blocking=True))
        return out

    def __call__(self, refs: ImageRefs, labels: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                       list[str]]:
        images = self.decode(refs.items, labels.device)
        keep = [i for i, img in enumerate(images) if not isinstance(img, str)]
        transform = self.train_transform if train else self.eval_transform
        out = [transform(self._crop(images[i], refs.items[i])) for i in keep]
        x = torch.stack(out) if out else torch.empty(0, dtype=torch.uint8, device=labels.device)
        return x, labels[keep], [img for img in images if isinstance(img, str)]

    def _crop(self, img: torch.Tensor, ref: ImageRef) -> torch.Tensor:
        return img if ref.box is None or self.margin is None else crop_to_box(img, ref.box, self.margin)
