"""Images from files and bytes: header checks (size, mode, EXIF orientation, decompression bombs) and decoding
to ``uint8`` (3, H, W) RGB. Decoding is not a transform: :mod:`twincar.data.transforms` takes over from here.

Every reader of an image (training, eval, predict, explain, the demo, the dataset checker) comes through
:func:`load_rgb`, :func:`decode_rgb_bytes` or :func:`load_sample`, so they all see the same pixels and name a
bad file the same way (:class:`ImageReadError`).
"""

from __future__ import annotations

import errno
import io
import logging
import math
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image

from twincar.data.discovery import IMAGE_EXTENSIONS, NoImagesError, find_images  # noqa: F401 (their old home)
from twincar.data.formats.common import Sample
from twincar.errors import TwinCarError
from twincar.inference.runtime import (
    reduced_decode_scale,  # one rule for both decoders (the runtime's imports no torch)
)

log = logging.getLogger(__name__)


class ImageReadError(TwinCarError, OSError):
    """An image file is missing, truncated or not an image; the message names the file.

    ``reason`` is one of ``missing``, ``unreadable`` (permission denied, a symlink loop), ``empty``,
    ``not an image``, ``too large``, ``truncated``, ``corrupt``.
    """

    def __init__(self, message: str, reason: str = "corrupt"):
        super().__init__(message)
        self.reason = reason


# Formats torchvision decodes (a single frame): the rest (BMP, TIFF, animated GIF/WebP) are decoded by PIL.
TORCHVISION_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF")


# Refuse images with more pixels than this before decoding them (decompression bombs): 2x PIL's own limit.
MAX_IMAGE_PIXELS = 2 * 89_478_485


class ImageHeader(NamedTuple):
    """What an image file's header says: stored size, PIL mode, EXIF orientation (1 = as stored), PIL format
    and whether it is an animated GIF or WebP (PIL decodes its first frame, as it does a multi-page TIFF's)."""

    width: int
    height: int
    mode: str
    orientation: int = 1
    format: str = ""
    animated: bool = False


# OSError numbers, and how a message says them
_OS_PROBLEMS = {errno.ENOENT: ("no such file", "missing"), errno.EACCES: ("permission denied", "unreadable"),
                errno.EPERM: ("permission denied", "unreadable"), errno.ELOOP: ("a symlink loop", "unreadable"),
                errno.EISDIR: ("a folder, not an image file", "not an image")}
_TORCHVISION_PREFIX = re.compile(r"^\w+, \S+:\d+, ")  # "decode_jpeg, /path/decode_jpeg.cpp:171, " before the text


def read_error(name: object, error: BaseException, otherwise: str = "corrupt") -> ImageReadError:
    """The :class:`ImageReadError` for an exception met while reading image ``name``: one sentence naming it
    and the problem; ``otherwise`` is the reason of an error that is none of the known ones."""
    if isinstance(error, ImageReadError):
        return error
    if isinstance(error, OSError) and error.errno in _OS_PROBLEMS:
        what, reason = _OS_PROBLEMS[error.errno]
        return ImageReadError(f"cannot read image {name}: {what}", reason)
    if isinstance(error, Image.DecompressionBombError):
        return ImageReadError(f"cannot read image {name}: {error}", "too large")
    if isinstance(error, UnidentifiedImageError):
        return ImageReadError(f"cannot read image {name}: not an image (unknown format or damaged header)",
                              "not an image")
    text = _TORCHVISION_PREFIX.sub("", str(error).strip()) or type(error).__name__
    reason = "truncated" if re.search(r"truncat|incomplete|premature", text, re.I) else otherwise
    return ImageReadError(f"cannot read image {name}: {reason} ({text})", reason)


def read_header(source: str | Path | bytes, name: str | Path | None = None) -> ImageHeader:
    """Size, PIL mode, EXIF orientation, format and whether it is animated, of an image file or in-memory image,
    from its header (decodes nothing).

    Raises :class:`ImageReadError` naming ``name`` (default: the path) for a missing, unreadable, empty or
    non-image source, and for one of more than ``MAX_IMAGE_PIXELS`` pixels (a decompression bomb).
    """
    name = name if name is not None else source if not isinstance(source, bytes) else "<bytes>"
    try:
        empty = len(source) == 0 if isinstance(source, bytes) else Path(source).stat().st_size == 0
        if empty:
            raise ImageReadError(f"cannot read image {name}: the file is empty (0 bytes)", "empty")
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:  # lazy: header only
            (w, h), mode, fmt = im.size, im.mode, im.format or ""
            orientation = im.getexif().get(0x0112, 1) if fmt in ("JPEG", "MPO", "TIFF", "WEBP", "PNG") else 1
            animated = fmt in ("GIF", "WEBP") and bool(getattr(im, "is_animated", False))
    except Exception as e:  # whatever a strange file makes PIL raise, it is named, never a traceback
        raise read_error(name, e, "not an image") from e
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageReadError(
            f"cannot read image {name}: {w}x{h} pixels is over the {MAX_IMAGE_PIXELS} limit (decompression bomb?)",
            "too large",
        )
    return ImageHeader(w, h, mode, orientation if orientation in range(1, 9) else 1, fmt, animated)


def image_size_from_header(path: str | Path) -> tuple[int, int]:
    """(width, height) read from the file header only; raises ImageReadError for what is not an image."""
    w, h, *_ = read_header(Path(path))
    return w, h


_PIL_MODES = {ImageReadMode.RGB: "RGB", ImageReadMode.GRAY: "L", ImageReadMode.GRAY_ALPHA: "LA",
              ImageReadMode.RGB_ALPHA: "RGBA"}


def to_8bit(image: torch.Tensor) -> torch.Tensor:
    """A ``uint16`` image (16-bit PNG) scaled to ``uint8``: value * 255 / 65535, rounded. ``uint8`` as it is."""
    if image.dtype == torch.uint8:
        return image
    return ((image.to(torch.int32).clamp(0, 65535) * 255 + 32767) // 65535).to(torch.uint8)


def pil_to_uint8(im: Image.Image, mode: ImageReadMode = ImageReadMode.RGB) -> torch.Tensor:
    """A PIL image (its current frame, any mode: 16-bit grayscale is scaled, not clipped) as a ``uint8``
    (C, H, W) tensor: 3 channels for ``RGB``; ``UNCHANGED`` keeps L, LA, RGB and RGBA and makes the rest RGB.
    (PIL itself reads a 16-bit RGB TIFF as 8-bit RGB, by the high byte.)"""
    if im.mode.startswith("I"):  # I;16*, I: 16-bit grayscale (PIL's own conversion would clip at 255)
        im = Image.fromarray(to_8bit(torch.from_numpy(np.asarray(im).astype(np.int32))).numpy(), mode="L")
    target = _PIL_MODES.get(mode) or (im.mode if im.mode in ("L", "LA", "RGB", "RGBA") else "RGB")
    array = torch.from_numpy(np.array(im.convert(target) if im.mode != target else im))
    return array.unsqueeze(0) if array.ndim == 2 else array.permute(2, 0, 1)


def _decode(source: Path | bytes, name: object, header: ImageHeader, mode: ImageReadMode,
            min_side: int | None = None) -> torch.Tensor:
    """The one decoder: torchvision for a single-frame JPEG, PNG, WebP or GIF, PIL for the rest (BMP, TIFF, the
    first frame of an animated image) and for a JPEG decoded at reduced size (``min_side``). EXIF orientation is
    applied; the result is always ``uint8`` (C, H, W). Any failure is an :class:`ImageReadError` naming ``name``."""
    scale = 1
    if min_side and mode == ImageReadMode.RGB and header.format in ("JPEG", "MPO"):
        scale = reduced_decode_scale(header.width, header.height, min_side)
    try:
        if header.format in TORCHVISION_FORMATS and not header.animated and scale == 1:
            data = str(source) if isinstance(source, Path) else torch.frombuffer(bytearray(source), dtype=torch.uint8)
            image = decode_image(data, mode=mode, apply_exif_orientation=True)
            return to_8bit(image[0] if image.ndim == 4 else image)  # 4-D: frames of a GIF torchvision took as one
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            if scale > 1:  # libjpeg's DCT scaling: 1/2, 1/4 or 1/8 of the size, never below min_side
                im.draft("RGB", (math.ceil(header.width / scale), math.ceil(header.height / scale)))
            return pil_to_uint8(ImageOps.exif_transpose(im), mode)  # the current frame: the first
    except Exception as e:  # a strange file is named, never a traceback that ends the run
        raise read_error(name, e) from e


def load_rgb(path: str | Path, mode: ImageReadMode = ImageReadMode.RGB, *, min_side: int | None = None) -> torch.Tensor:
    """Decode an image file into ``uint8`` (3, H, W) RGB: every format of ``IMAGE_EXTENSIONS``, any mode
    (grayscale, palette, CMYK, alpha; 16-bit scaled to 8), the first frame of an animated image, EXIF
    orientation applied.

    ``mode=ImageReadMode.UNCHANGED`` keeps the file's own channels (1 for grayscale). A missing, unreadable,
    empty, truncated or non-image file, or one of more than ``MAX_IMAGE_PIXELS`` (checked from the header,
    before decoding), raises :class:`ImageReadError` naming the file.

    ``min_side``: the smallest short side the caller needs. A JPEG at least twice that size is decoded
    at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (PIL ``draft``), never below ``min_side``: the
    cheap part of a resize that follows anyway (see :func:`reduced_decode_scale`).
    """
    path = Path(path)
    return _decode(path, path, read_header(path), mode, min_side)


def decode_rgb_bytes(data: bytes, name: str, mode: ImageReadMode = ImageReadMode.RGB) -> torch.Tensor:
    """:func:`load_rgb` for an image held in memory (e.g. a parquet row); ``name`` is used in errors."""
    return _decode(data, name, read_header(data, name), mode)


def oriented_box(bbox: tuple[int, int, int, int], header: ImageHeader) -> tuple[int, int, int, int]:
    """A 1-based inclusive box given in stored pixels, in the pixels of the image as decoded (EXIF orientation
    applied, as :func:`load_rgb` does)."""
    x1, y1, x2, y2 = (int(v) for v in bbox)
    w, h = header.width, header.height
    moves = {  # stored (x, y) -> displayed (x, y), 1-based, for each EXIF orientation
        1: lambda x, y: (x, y), 2: lambda x, y: (w + 1 - x, y), 3: lambda x, y: (w + 1 - x, h + 1 - y),
        4: lambda x, y: (x, h + 1 - y), 5: lambda x, y: (y, x), 6: lambda x, y: (h + 1 - y, x),
        7: lambda x, y: (h + 1 - y, w + 1 - x), 8: lambda x, y: (y, w + 1 - x),
    }
    (ax, ay), (bx, by) = (moves[header.orientation](x, y) for x, y in ((x1, y1), (x2, y2)))
    return min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)


def sample_label(sample: Sample) -> str:
    """How a sample is named to a user: its path, or ``file.parquet#row``."""
    return str(sample.path) if sample.index is None else f"{sample.path}#{sample.index}"


def _source(sample: Sample) -> Path | bytes:
    if sample.index is None:
        return sample.path
    from twincar.data.formats import parquet

    return parquet.image_bytes(sample.path, sample.index)


def sample_header(sample: Sample) -> ImageHeader:
    """Size, mode and EXIF orientation of a sample's image from its header; ImageReadError when it is unusable."""
    return read_header(_source(sample), sample_label(sample))


def load_sample(
    sample: Sample, mode: ImageReadMode = ImageReadMode.RGB, *, min_side: int | None = None
) -> torch.Tensor:
    """Decode a sample's image to ``uint8`` (3, H, W) RGB (a file or a parquet row); ImageReadError names it.

    ``min_side``: a large JPEG file is decoded at reduced size, never below it (see :func:`load_rgb`)."""
    if sample.index is None:
        return load_rgb(sample.path, mode, min_side=min_side)
    return decode_rgb_bytes(_source(sample), sample_label(sample), mode)
