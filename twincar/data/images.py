"""Images from files and bytes: header checks (size, mode, EXIF orientation, decompression bombs) and decoding
to ``uint8`` (3, H, W) RGB. Decoding is not a transform: :mod:`twincar.data.transforms` takes over from here.

Every reader of an image (training, eval, predict, explain, the demo, the dataset checker) comes through
:func:`load_rgb`, :func:`decode_rgb_bytes` or :func:`load_sample`, so they all see the same pixels and name a
bad file the same way (:class:`ImageReadError`).
"""

from __future__ import annotations

import glob
import io
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image

from twincar.data.formats.common import Sample
from twincar.errors import TwinCarError


class ImageReadError(TwinCarError, OSError):
    """An image file is missing, truncated or not an image; the message names the file.

    ``reason`` is one of ``missing``, ``empty``, ``not an image``, ``too large``, ``truncated``, ``corrupt``.
    """

    def __init__(self, message: str, reason: str = "corrupt"):
        super().__init__(message)
        self.reason = reason


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")  # what a folder scan collects


# Refuse images with more pixels than this before decoding them (decompression bombs): 2x PIL's own limit.
MAX_IMAGE_PIXELS = 2 * 89_478_485


class ImageHeader(NamedTuple):
    """What an image file's header says: stored size, PIL mode, EXIF orientation (1 = as stored)."""

    width: int
    height: int
    mode: str
    orientation: int = 1


def read_header(source: str | Path | bytes, name: str | Path | None = None) -> ImageHeader:
    """Size, PIL mode and EXIF orientation of an image file or in-memory image from its header (decodes nothing).

    Raises :class:`ImageReadError` naming ``name`` (default: the path) for a missing, empty or non-image
    source, and for one of more than ``MAX_IMAGE_PIXELS`` pixels (a decompression bomb).
    """
    name = name if name is not None else source if not isinstance(source, bytes) else "<bytes>"
    try:
        empty = len(source) == 0 if isinstance(source, bytes) else Path(source).stat().st_size == 0
        if empty:
            raise ImageReadError(f"cannot read image {name}: the file is empty (0 bytes)", "empty")
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:  # lazy: header only
            (w, h), mode = im.size, im.mode
            orientation = im.getexif().get(0x0112, 1) if im.format in ("JPEG", "TIFF", "WEBP", "PNG") else 1
    except ImageReadError:
        raise
    except FileNotFoundError as e:
        raise ImageReadError(f"cannot read image {name}: no such file", "missing") from e
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"cannot read image {name}: {e}", "too large") from e
    except UnidentifiedImageError as e:
        raise ImageReadError(f"cannot read image {name}: not an image (unknown format or damaged header)",
                             "not an image") from e
    except (OSError, ValueError) as e:
        truncated = "truncat" in str(e).lower()
        raise ImageReadError(f"cannot read image {name}: {'truncated' if truncated else 'not an image'} ({e})",
                             "truncated" if truncated else "not an image") from e
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageReadError(
            f"cannot read image {name}: {w}x{h} pixels is over the {MAX_IMAGE_PIXELS} limit (decompression bomb?)",
            "too large",
        )
    return ImageHeader(w, h, mode, orientation if orientation in range(1, 9) else 1)


def image_size_from_header(path: str | Path) -> tuple[int, int]:
    """(width, height) read from the file header only; raises ImageReadError for what is not an image."""
    w, h, *_ = read_header(Path(path))
    return w, h


def _decode(source: str | torch.Tensor, name, mode: ImageReadMode) -> torch.Tensor:
    try:
        return decode_image(source, mode=mode, apply_exif_orientation=True)
    except (RuntimeError, OSError, ValueError) as e:
        reason = "truncated" if re.search(r"truncat|incomplete|premature", str(e), re.I) else "corrupt"
        raise ImageReadError(f"cannot read image {name}: {e}", reason) from e


def load_rgb(path: str | Path, mode: ImageReadMode = ImageReadMode.RGB, *, min_side: int | None = None) -> torch.Tensor:
    """Decode an image file (JPEG, PNG, ... any mode, EXIF orientation applied) into ``uint8`` (3, H, W) RGB.

    ``mode=ImageReadMode.UNCHANGED`` keeps the file's own channels (1 for grayscale). A missing, empty,
    truncated or non-image file, or one of more than ``MAX_IMAGE_PIXELS`` (checked from the header,
    before decoding), raises :class:`ImageReadError` naming the file.

    ``min_side``: the smallest short side the caller needs. A JPEG at least twice that size is decoded
    at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (PIL ``draft``), never below ``min_side``: the
    cheap part of a resize that follows anyway (see :func:`reduced_decode_scale`).
    """
    header = read_header(Path(path))
    if min_side and mode == ImageReadMode.RGB and reduced_decode_scale(header.width, header.height, min_side) > 1:
        try:
            return _decode_reduced(path, header.width, header.height, min_side)
        except (OSError, ValueError) as e:
            reason = "truncated" if re.search(r"truncat|incomplete|premature", str(e), re.I) else "corrupt"
            raise ImageReadError(f"cannot read image {path}: {e}", reason) from e
    return _decode(str(path), path, mode)


def decode_rgb_bytes(data: bytes, name: str, mode: ImageReadMode = ImageReadMode.RGB) -> torch.Tensor:
    """:func:`load_rgb` for an image held in memory (e.g. a parquet row); ``name`` is used in errors."""
    read_header(data, name)
    return _decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), name, mode)


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


def reduced_decode_scale(width: int, height: int, min_side: int) -> int:
    """The largest JPEG DCT scale-down (1, 2, 4 or 8) that keeps the short side >= ``min_side``."""
    scale = 1
    while scale < 8 and min(width, height) // (scale * 2) >= min_side:
        scale *= 2
    return scale


def _decode_reduced(path: str | Path, width: int, height: int, min_side: int) -> torch.Tensor:
    with Image.open(path) as im:
        if im.format != "JPEG":  # DCT scaling is a JPEG feature; other formats decode in full
            return decode_image(str(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        scale = reduced_decode_scale(width, height, min_side)
        im.draft("RGB", (math.ceil(width / scale), math.ceil(height / scale)))
        rgb = ImageOps.exif_transpose(im.convert("RGB"))
        return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)


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


# -- image discovery --------------------------------------------------------------------------------
class NoImagesError(TwinCarError, FileNotFoundError):
    """``--images`` matched no image file."""


def find_images(specs: Sequence[str | Path]) -> list[Path]:
    """Files named by ``specs``: folders (recursive, image extensions, sorted), files, or glob patterns.

    A file given by name is kept whatever its extension (so a broken upload gets its own error row).
    Duplicates are dropped, first occurrence wins.
    """
    found: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            found.append(path)
        elif any(c in str(spec) for c in "*?["):  # a glob pattern; ** recurses
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            found += [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        else:
            raise NoImagesError(f"--images {spec}: no such file or folder ({path.name} does not exist: "
                                "pass image files, folders or glob patterns)")
    unique = list(dict.fromkeys(found))
    if not unique:
        listed = " ".join(map(str, specs))
        raise NoImagesError(f"--images {listed}: no image files found ({', '.join(IMAGE_EXTENSIONS)})")
    return unique
