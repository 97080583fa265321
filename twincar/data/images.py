"""Images from files and bytes: header checks (size, mode, EXIF orientation, decompression bombs) and decoding
to ``uint8`` (H, W, 3) RGB numpy arrays, with PIL only (no torch: the ONNX runtime decodes here too). Decoding is
not a transform: :mod:`twincar.data.transforms` takes over from here.

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
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from twincar.data.discovery import IMAGE_EXTENSIONS, NoImagesError, find_images  # noqa: F401 (their old home)
from twincar.errors import TwinCarError

if TYPE_CHECKING:  # the sample type only: data.formats imports scipy, which the torch-free runtime lacks
    from twincar.data.formats.common import Sample

log = logging.getLogger(__name__)


class ImageReadError(TwinCarError, OSError):
    """An image file is missing, truncated or not an image; the message names the file.

    ``reason`` is one of ``missing``, ``unreadable`` (permission denied, a symlink loop), ``empty``,
    ``not an image``, ``too large``, ``truncated``, ``corrupt``.
    """

    def __init__(self, message: str, reason: str = "corrupt"):
        super().__init__(message)
        self.reason = reason


JPEG_FORMATS = ("JPEG", "MPO")  # decoded at reduced size when the caller needs less (PIL draft)


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
    text = str(error).strip() or type(error).__name__
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


def reduced_decode_scale(width: int, height: int, min_side: int) -> int:
    """The largest JPEG DCT scale-down (1, 2, 4 or 8) that keeps the short side >= ``min_side``."""
    scale = 1
    while scale < 8 and min(width, height) // (scale * 2) >= min_side:
        scale *= 2
    return scale


def to_8bit(image: np.ndarray) -> np.ndarray:
    """A 16-bit image (16-bit PNG, ``I;16`` or ``I``) scaled to ``uint8``: value * 255 / 65535, rounded (not
    clipped at 255 as PIL's own conversion does). ``uint8`` as it is."""
    if image.dtype == np.uint8:
        return image
    wide = image.astype(np.int64).clip(0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def rgb_image(im: Image.Image) -> Image.Image:
    """A PIL image (its current frame, any mode: 16-bit grayscale is scaled, not clipped) as an 8-bit RGB PIL
    image. (PIL itself reads a 16-bit RGB TIFF as 8-bit RGB, by the high byte.)"""
    if im.mode.startswith("I"):  # I;16*, I: 16-bit grayscale
        im = Image.fromarray(to_8bit(np.asarray(im)), mode="L")
    return im if im.mode == "RGB" else im.convert("RGB")


def _decode(source: Path | bytes, name: object, header: ImageHeader, min_side: int | None = None) -> Image.Image:
    """The one decoder (PIL): the first frame of any format, a JPEG at reduced size when ``min_side`` allows
    (libjpeg's DCT scaling), EXIF orientation applied; always an 8-bit RGB image, loaded. Any failure is an
    :class:`ImageReadError` naming ``name``."""
    scale = 1
    if min_side and header.format in JPEG_FORMATS:
        scale = reduced_decode_scale(header.width, header.height, min_side)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            if scale > 1:  # 1/2, 1/4 or 1/8 of the size, never below min_side
                im.draft("RGB", (math.ceil(header.width / scale), math.ceil(header.height / scale)))
            image = rgb_image(ImageOps.exif_transpose(im))  # the current frame: the first
            image.load()
            return image
    except Exception as e:  # a strange file is named, never a traceback that ends the run
        raise read_error(name, e) from e


def load_image(path: str | Path, *, min_side: int | None = None) -> Image.Image:
    """:func:`load_rgb` as an RGB PIL image (what the predict preprocessing resizes: no array copy)."""
    path = Path(path)
    return _decode(path, path, read_header(path), min_side)


def load_rgb(path: str | Path, *, min_side: int | None = None) -> np.ndarray:
    """Decode an image file into ``uint8`` (H, W, 3) RGB: every format of ``IMAGE_EXTENSIONS``, any mode
    (grayscale, palette, CMYK, alpha; 16-bit scaled to 8), the first frame of an animated image, EXIF
    orientation applied. (A torch consumer takes ``torch.from_numpy(a).permute(2, 0, 1)``.)

    A missing, unreadable, empty, truncated or non-image file, or one of more than ``MAX_IMAGE_PIXELS`` (checked
    from the header, before decoding), raises :class:`ImageReadError` naming the file.

    ``min_side``: the smallest short side the caller needs. A JPEG at least twice that size is decoded
    at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (PIL ``draft``), never below ``min_side``: the
    cheap part of a resize that follows anyway (see :func:`reduced_decode_scale`).
    """
    return np.array(load_image(path, min_side=min_side))


def decode_rgb_bytes(data: bytes, name: str, *, min_side: int | None = None) -> np.ndarray:
    """:func:`load_rgb` for an image held in memory (e.g. a parquet row); ``name`` is used in errors."""
    return np.array(_decode(data, name, read_header(data, name), min_side))


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


def sample_source(sample: Sample) -> Path | bytes:
    """A sample's image: its file's path, or the bytes of its row of a parquet file or item of a pack split."""
    if sample.index is None:
        return sample.path
    if sample.path.suffix.lower() != ".parquet":  # an item of a LitData pack split (data.pipeline=stream)
        from twincar.data.formats.packed import item_bytes

        return item_bytes(sample.path, sample.index)
    from twincar.data.formats import parquet

    return parquet.image_bytes(sample.path, sample.index)


def sample_header(sample: Sample) -> ImageHeader:
    """Size, mode and EXIF orientation of a sample's image from its header; ImageReadError when it is unusable."""
    return read_header(sample_source(sample), sample_label(sample))


def load_sample(sample: Sample, *, min_side: int | None = None) -> np.ndarray:
    """Decode a sample's image (a file or a parquet row) to ``uint8`` (H, W, 3) RGB; ImageReadError names it.

    ``min_side``: a large JPEG file is decoded at reduced size, never below it (see :func:`load_rgb`); a parquet
    row in full."""
    source, name = sample_source(sample), sample_label(sample)
    return np.array(_decode(source, name, read_header(source, name), min_side if sample.index is None else None))


def box_pixels(bbox: tuple[int, int, int, int], margin: float, width: int, height: int
               ) -> tuple[int, int, int, int] | None:
    """A 1-based inclusive box (x1, y1, x2, y2) grown by ``margin`` x its size per side and clamped to a
    ``width`` x ``height`` image, as 0-based end-exclusive ``(left, top, right, bottom)``; None when it lies
    entirely outside the image (the image is then left uncropped)."""
    x1, y1, x2, y2 = (int(v) for v in bbox)  # Python ints: no uint8/uint16 overflow below
    left, top, right, bottom = x1 - 1, y1 - 1, x2, y2
    dx, dy = margin * (right - left), margin * (bottom - top)
    left, top = max(0, int(left - dx)), max(0, int(top - dy))
    right, bottom = min(width, int(round(right + dx))), min(height, int(round(bottom + dy)))
    return None if right <= left or bottom <= top else (left, top, right, bottom)
