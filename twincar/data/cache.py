"""A pre-resized, decoded copy of a dataset, built once and read by the same datamodule (``data.pipeline=cache``).

Every image is decoded once (reduced-size JPEG decode where the file is large), resized so that its short
side is ``cache_short_side(preprocess)`` (eval's resize size, 256 for 224; never enlarged) and appended to one
flat file, either as raw ``uint8`` pixels (``format="raw"``: read by memory map, no decoding at all) or
as a small JPEG (``format="jpeg"``: over 10x less disk, a cheap decode). The datamodule scales car boxes
to the cached size (``data.crop_to_bbox``).
This is what makes FFCV fast; the per-image augmentation then runs on images a few times smaller.

The cache lives in ``cache_dir/<key>/`` where ``key`` hashes every file's path, size and modification time,
the short side and the format: changing the data or ``data.image_size`` builds a new cache, never reads a
stale one. A file that cannot be decoded is recorded with its error, and reading it raises
:class:`ImageReadError` naming the file, exactly as the original file would. Build it ahead of time with::

    python -m twincar.cache [data=stanford_cars data.root=PATH] [data.image_size=448] [data.cache_format=jpeg]
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms.v2 import functional as TF

from twincar.data.formats import Sample
from twincar.data.images import ImageReadError, load_sample, sample_header
from twincar.data.preprocess import Preprocess
from twincar.data.transforms import to_tensor
from twincar.errors import TwinCarError
from twincar.files import write_json

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the stored layout or the resizing changes: old caches are then not reused
CACHE_FORMATS = ("raw", "jpeg")
SHORT_SIDE_FACTOR = 1.15  # cached short side / image_size: room for random crops, as FFCV stores
JPEG_QUALITY = 90  # quality of the small JPEGs of format="jpeg"
INDEX = "index.json"
DATA = "images.bin"


class CacheError(TwinCarError, OSError):
    """A cache directory cannot be written or read; the message names it."""


def cache_short_side(preprocess: Preprocess) -> int:
    """Short side of cached images: eval's resize size (``image_size / eval_crop_pct``, 256 for 224) when that
    leaves random crops some room (>= 1.1 x image_size), so eval reads the cache with no second resize;
    else ``SHORT_SIDE_FACTOR`` x image_size."""
    side = preprocess.decode_min_side
    return side if side >= 1.1 * preprocess.image_size else math.ceil(SHORT_SIDE_FACTOR * preprocess.image_size)


def cache_key(samples: Sequence[Sample], short_side: int, fmt: str) -> str:
    """A hash of the files (resolved path, size, modification time) and of how they are cached."""
    h = hashlib.sha1(json.dumps([CACHE_VERSION, short_side, fmt, JPEG_QUALITY]).encode())
    h.update("\n".join(sorted({sample_key(s) for s in samples})).encode())
    for path in sorted({str(Path(s.path).resolve()) for s in samples}):  # a parquet file covers its rows
        try:
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}\0missing\n".encode())
    return h.hexdigest()[:16]


def sample_key(sample: Sample) -> str:
    """How the cache names a sample: its resolved path, ``#row`` added for a row of a parquet file."""
    key = str(Path(sample.path).resolve())
    return key if sample.index is None else f"{key}#{sample.index}"


def resized_sample(sample: Sample, short_side: int) -> torch.Tensor:
    """A sample's image as a uint8 (3, H, W) tensor whose short side is at most ``short_side`` (shrunk only)."""
    img = to_tensor(load_sample(sample, min_side=short_side))  # a parquet row is decoded in full
    if min(img.shape[1:]) > short_side:  # shrink only: a small image is kept as it is
        img = TF.resize(img, short_side, antialias=True)
    return img.contiguous()


def build_cache(
    samples: Sequence[Sample], directory: str | Path, short_side: int, *, fmt: str = "raw", workers: int = 4
) -> Path:
    """Write the cache of ``samples`` into ``directory`` (atomically: a half-built cache is never read).

    ``workers`` threads decode and resize (both release the GIL). Returns ``directory``. When another
    process finished the same cache first, its copy is kept and this one discarded.
    """
    if fmt not in CACHE_FORMATS:
        raise CacheError(f"data.cache_format must be one of {', '.join(CACHE_FORMATS)}, got {fmt!r}")
    directory = Path(directory)
    tmp = directory.with_name(f"{directory.name}.{os.getpid()}.tmp")
    unique = {sample_key(s): s for s in samples}
    paths = sorted(unique)
    start = time.perf_counter()
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        entries: dict[str, list[int]] = {}
        errors: dict[str, str] = {}
        offset = 0

        def work(path: str) -> tuple[str, bytes | None, list[int] | None, str | None]:
            try:
                header = sample_header(unique[path])
                orig = (header.height, header.width) if header.orientation >= 5 else (header.width, header.height)
                img = resized_sample(unique[path], short_side)
            except ImageReadError as e:
                return path, None, None, str(e)
            data = encode_jpeg(img, quality=JPEG_QUALITY).numpy().tobytes() if fmt == "jpeg" else img.numpy().tobytes()
            return path, data, [img.shape[1], img.shape[2], orig[0], orig[1]], None

        with open(tmp / DATA, "wb") as out, ThreadPoolExecutor(max(1, workers)) as pool:
            for chunk in range(0, len(paths), 256):  # bounded memory: 256 images in flight at most
                for path, data, shape, error in pool.map(work, paths[chunk:chunk + 256]):
                    if error is not None:
                        errors[path] = error
                        log.warning("cache: %s", error)
                        continue
                    out.write(data)
                    entries[path] = [offset, len(data), *shape]
                    offset += len(data)
            out.flush()
            os.fsync(out.fileno())  # on disk before the folder is renamed into place
        index = {"version": CACHE_VERSION, "format": fmt, "short_side": short_side, "bytes": offset,
                 "entries": entries, "errors": errors}
        write_json(tmp / INDEX, index)
        directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(directory)
        except OSError:
            if not (directory / INDEX).is_file():
                raise
            log.info("cache %s was built by another process meanwhile: using it", directory)
    except OSError as e:
        raise CacheError(f"cannot write the image cache in {directory.parent}: {e} (set data.cache_dir=PATH)") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached %d images (%d unreadable) at short side %d in %s: %.0f MB, %.1f s", len(entries), len(errors),
             short_side, directory, offset / 2**20, time.perf_counter() - start)
    return directory


class ImageCache:
    """The read side of a built cache: ``cache(sample)`` -> ``uint8`` (3, H, W), like ``load_rgb(sample.path)``.

    Picklable (DataLoader workers): the memory map is opened lazily in each process.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        try:
            index = json.loads((self.directory / INDEX).read_text())
        except (OSError, ValueError) as e:
            raise CacheError(f"cannot read the image cache index {self.directory / INDEX}: {e}") from e
        self.format: str = index["format"]
        self.short_side: int = index["short_side"]
        self.entries: dict[str, list[int]] = index["entries"]
        self.errors: dict[str, str] = index["errors"]
        self._keys: dict[tuple, str] = {}  # (path as given, row) -> the index key
        self._data: np.memmap | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None}

    def __len__(self) -> int:
        return len(self.entries)

    def _key(self, sample: Sample) -> str:
        given = (str(sample.path), sample.index)
        key = self._keys.get(given)
        if key is None:
            key = self._keys[given] = sample_key(sample)
        return key

    def __contains__(self, sample: Sample) -> bool:
        key = self._key(sample)
        return key in self.entries or key in self.errors

    @property
    def nbytes(self) -> int:
        """Size of the data file: every cached image, back to back."""
        return (self.directory / DATA).stat().st_size

    def entry(self, sample: Sample) -> list[int]:
        """``[offset, nbytes, h, w, ...]`` of ``sample`` in the data file; ImageReadError (naming it) if it was
        unreadable or is not cached."""
        key = self._key(sample)
        entry = self.entries.get(key)
        if entry is None:
            raise ImageReadError(self.errors.get(key) or f"cannot read image {key}: not in the cache {self.directory}")
        return entry

    def __call__(self, sample: Sample) -> torch.Tensor:
        """The cached image of ``sample``; ImageReadError (naming it) if it was unreadable or is not cached."""
        entry = self.entry(sample)
        if self._data is None:
            self._data = np.memmap(self.directory / DATA, dtype=np.uint8, mode="r")
        offset, nbytes, h, w = entry[:4]
        data = torch.from_numpy(np.array(self._data[offset:offset + nbytes]))  # one copy out of the page cache
        if self.format == "jpeg":
            return decode_jpeg(data)
        return data.view(3, h, w)


def open_cache(
    samples: Sequence[Sample], cache_dir: str | Path, preprocess: Preprocess, *, fmt: str = "raw", workers: int = 4
) -> ImageCache:
    """The cache of ``samples`` for ``preprocess`` under ``cache_dir``: reused when it matches, else built."""
    short_side = cache_short_side(preprocess)
    directory = Path(cache_dir) / f"{fmt}{short_side}_{cache_key(samples, short_side, fmt)}"
    if (directory / INDEX).is_file():
        log.info("reusing image cache %s", directory)
    else:
        log.info("building the image cache of %d images at short side %d in %s", len(samples), short_side, directory)
        build_cache(samples, directory, short_side, fmt=fmt, workers=workers)
    return ImageCache(directory)


if __name__ == "__main__":
    sys.exit("python -m twincar.data.cache is now python -m twincar.cache")
