"""Items of a LitData pack split (``python -m twincar.cache pack``) read one by one, as samples: ``Sample(path=SPLIT,
index=i)`` is item ``i`` of the split at ``SPLIT`` (:func:`twincar.data.images.sample_source`). Torch-free."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path


def pack_location(path: str | Path) -> str:
    """A split's location as LitData reads it: a ``Path`` made of a URL has lost one ``/`` (``s3:/b/x``)."""
    text = str(path)
    m = re.match(r"^([a-z][a-z0-9+.-]*):/+(.*)$", text)
    return f"{m[1]}://{m[2]}" if m and len(m[1]) > 1 else text


def split_items(location: str):
    """The raw items of one split (no transform): one ``StreamingDataset`` per split and process (a DataLoader
    worker opens its own, never its parent's copy)."""
    return _split_items(location, os.getpid())


@functools.lru_cache(maxsize=8)
def _split_items(location: str, pid: int):
    import litdata  # only a pack's items come here: the stream pipeline checked it is installed

    return litdata.StreamingDataset(location)


def item_bytes(path: Path, index: int) -> bytes:
    """The encoded image of item ``index`` of the pack split at ``path`` (the samples of
    :func:`twincar.data.stream.split_samples`)."""
    return split_items(pack_location(path))[index]["image"]
