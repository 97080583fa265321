"""Streaming shards (LitData): a dataset packed once into chunked shards, read by ``data.pipeline=stream``.

At DVM-CAR's size (1.45 M images), a folder of small JPEG files read over network storage starves a multi-GPU
node. :func:`pack` writes the train, val and test images of a data config as LitData shards (``litdata.optimize``):
each item is the image's encoded bytes (the file as it is, or a JPEG pre-resized to a short side), its label, its
car box and its name. ``classes.txt`` / ``classes.csv`` (make, model, year), ``split.json`` and ``pack.json`` go
beside the three splits. Packing runs over the cores, and a rerun keeps the splits already written::

    python -m twincar.cache pack out=DIR [short_side=N] [data=cars data.root=PATH]

Training reads them with ``data.pipeline=stream data.stream=DIR_OR_URL`` through ``litdata.StreamingDataset``
and ``StreamingDataLoader``: from a local folder or from ``s3://`` (credentials and endpoint from the environment,
as boto3 reads them: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``). Each rank and worker
reads its own part of each epoch (no sampler), the train split shuffled per epoch with ``data.split_seed``; the
images go through the same decode, car-box crop and transforms as ``data.pipeline=files``. The loader's state
is saved in Lightning checkpoints, so a resumed run restarts mid-epoch.

LitData is an optional extra (``pip install 'twincar[stream]'``); only this pipeline needs it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.io import encode_jpeg

from twincar.data.cache import JPEG_QUALITY, resized_sample
from twincar.data.classes import CarName, read_classes_csv, write_class_tables
from twincar.data.datasets import car_box, scale_box
from twincar.data.formats import Sample
from twincar.data.formats.packed import split_items
from twincar.data.images import ImageReadError, decode_rgb_bytes, oriented_box, read_header, sample_source
from twincar.data.pipeline import PipelineError
from twincar.data.transforms import crop_to_box, to_tensor
from twincar.errors import TwinCarError
from twincar.files import write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
META = "pack.json"
CLASSES = "classes.csv"
NO_BOX = (0, 0, 0, 0)
CHUNK_BYTES = "64MB"  # LitData's own default: a chunk is one object-storage read


class StreamError(TwinCarError, OSError):
    """A pack that cannot be written or read; the message names it."""


def require_litdata():
    """The ``litdata`` module, or a :class:`PipelineError` saying how to install it."""
    try:
        import litdata
    except ImportError as e:
        raise PipelineError("data.pipeline=stream and python -m twincar.cache pack need LitData: "
                            "pip install 'twincar[stream]'") from e
    return litdata


def is_url(location: str | Path) -> bool:
    """True for ``s3://``, ``gs://``, ``azure://`` ... locations (LitData reads them), False for a local path."""
    return "://" in str(location)


@dataclass(frozen=True)
class PackItem:
    """Sample number ``i`` -> one shard item: ``image`` (encoded bytes), ``label``, ``box`` (1-based, in the
    pixels of the stored image before EXIF orientation; ``NO_BOX`` when none) and ``name``. With ``short_side``,
    the image is decoded, shrunk to that short side and stored as a JPEG (box scaled to it). Unreadable: None
    (``pack`` refuses such samples before they get here)."""

    samples: Sequence[Sample]
    short_side: int | None = None

    def __call__(self, i: int) -> dict:
        if torch.get_num_threads() > 1:  # a forked worker: torch's thread pool may be the parent's (OpenMP hangs)
            torch.set_num_threads(1)  # one core per worker; the workers are the parallelism
        sample = self.samples[i]
        if self.short_side is None:
            source = sample_source(sample)
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            box = sample.bbox or NO_BOX
        else:
            img = resized_sample(sample, self.short_side)
            data = encode_jpeg(img, quality=JPEG_QUALITY).numpy().tobytes()
            box = car_box(sample, img.shape[2], img.shape[1]) if sample.bbox else NO_BOX
        return {"image": data, "label": int(sample.label), "box": [int(v) for v in box], "name": sample.name}


def pack(splits: dict[str, Sequence[Sample]], out: str | Path, class_names: list[str], cars: list[CarName],
         split: dict, *, short_side: int | None = None, workers: int | None = None,
         chunk_bytes: str = CHUNK_BYTES) -> Path:
    """Write each split of ``splits`` (``train``, ``val``, ``test``) as LitData shards in ``out/<split>``, and the
    class tables, ``split`` (``split.json``) and ``pack.json`` beside them. A split already written (its
    ``index.json`` there) is kept: a rerun after a kill writes only what is missing. Workers are forked (LitData
    would otherwise set this whole process's start method to spawn), one torch thread each."""
    litdata = require_litdata()
    out = Path(out)
    if is_url(out):
        raise StreamError(f"pack writes to a local folder, not {out}: pack there, then copy the folder to object "
                          "storage (aws s3 sync DIR s3://BUCKET/PATH) and train with data.stream=s3://BUCKET/PATH")
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or max(1, min(len(os.sched_getaffinity(0)), 8))
    counts = {}
    for name in SPLITS:
        samples = list(splits.get(name) or [])
        counts[name] = len(samples)
        if not samples:
            continue
        target = out / name
        if (target / "index.json").is_file():
            log.info("pack: %s already written, kept", target)
            continue
        log.info("pack: %d %s images -> %s (%d workers)", len(samples), name, target, workers)
        litdata.optimize(fn=PackItem(tuple(samples), short_side), inputs=list(range(len(samples))),
                         output_dir=str(target), chunk_bytes=chunk_bytes, num_workers=min(workers, len(samples)),
                         mode="overwrite", verbose=False, reorder_files=False, start_method="fork")
    write_class_tables(class_names, out / "classes.txt", cars)
    write_json(out / "split.json", split)
    write_json(out / META, {"splits": counts, "short_side": short_side, "classes": len(class_names),
                            "boxes": all(s.bbox is not None for v in splits.values() for s in v or [])})
    return out


def read_pack_file(location: str, name: str) -> str:
    """The text of ``name`` beside the shards at ``location`` (a folder or an ``s3://`` URL)."""
    if not is_url(location):
        path = Path(location) / name
        try:
            return path.read_text("utf-8")
        except OSError as e:
            raise StreamError(f"{path} is missing: data.stream={location} is not a pack written by "
                              "python -m twincar.cache pack out=DIR") from e
    if not location.startswith("s3://"):
        raise StreamError(f"data.stream={location}: only local folders and s3:// URLs are read")
    import boto3  # LitData's own S3 client library; endpoint and credentials from the environment

    bucket, _, prefix = location[len("s3://"):].partition("/")
    key = f"{prefix.rstrip('/')}/{name}" if prefix else name
    try:
        return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")
    except Exception as e:  # botocore raises many types: a missing key, no credentials, no endpoint
        raise StreamError(f"cannot read s3://{bucket}/{key}: {e}") from e


@dataclass(frozen=True)
class Pack:
    """What a pack says about itself: class names, make/model/year, the split it holds and ``pack.json``."""

    location: str
    class_names: list[str]
    cars: list[CarName]
    split: dict
    meta: dict

    @classmethod
    def open(cls, location: str | Path) -> Pack:
        """Read the files beside the shards at ``location``."""
        location = str(location).rstrip("/")
        meta = json.loads(read_pack_file(location, META))
        names, cars = read_classes_csv(f"{location}/{CLASSES}", read_pack_file(location, CLASSES))
        return cls(location, names, cars, json.loads(read_pack_file(location, "split.json")), meta)


class StreamItem:
    """A shard item -> ``(image tensor, label)`` through the same steps as ``data.pipeline=files``: decode
    (a large JPEG at reduced size), car-box crop (``bbox_margin``), ``transform``. An image that cannot be
    decoded is ``(None, message)``, left out by :func:`~twincar.data.datasets.collate_readable`."""

    def __init__(self, transform: torch.nn.Module, bbox_margin: float | None, min_side: int | None):
        self.transform, self.bbox_margin, self.min_side = transform, bbox_margin, min_side

    def __call__(self, item: dict) -> tuple:
        data, name = item["image"], item["name"]
        try:
            img = to_tensor(decode_rgb_bytes(data, name, min_side=self.min_side))
            box = tuple(int(v) for v in item["box"])
            if self.bbox_margin is not None and box != NO_BOX:
                header = read_header(data, name)
                box = scale_box(oriented_box(box, header), header, img.shape[-1], img.shape[-2])
                img = crop_to_box(img, box, self.bbox_margin)
        except ImageReadError as e:
            return None, str(e)
        return self.transform(img), int(item["label"])


def split_samples(location: str, split: str) -> list[Sample]:
    """The items of one pack split as samples (``path`` the split, ``index`` the item): what the evaluation loop
    and calibration read (:func:`~twincar.data.images.sample_source`), every image of the split once."""
    url = f"{location.rstrip('/')}/{split}"
    items = split_items(url)
    samples = []
    for i in range(len(items)):
        item = items[i]
        box = tuple(int(v) for v in item["box"])
        samples.append(Sample(Path(url), int(item["label"]), None if box == NO_BOX else box, index=i,
                              name=str(item["name"])))
    return samples


def open_split(location: str, split: str, transform, *, shuffle: bool, seed: int, cache_dir: str | None = None):
    """The ``litdata.StreamingDataset`` of one split of the pack at ``location``; ``transform`` maps each item.
    ``shuffle`` (training): a new order each epoch, seeded, and the same number of items on every rank (LitData
    leaves out the few that would make ranks uneven); without it, every item once in pack order."""
    litdata = require_litdata()
    url = f"{location.rstrip('/')}/{split}"
    if not is_url(url) and not (Path(url) / "index.json").is_file():
        raise StreamError(f"{url} holds no shards (no index.json): pack the data first "
                          "(python -m twincar.cache pack out=DIR)")
    return litdata.StreamingDataset(url, cache_dir=cache_dir if is_url(url) else None, shuffle=shuffle,
                                    drop_last=shuffle, seed=seed, transform=transform)


def streaming_loader(dataset, *, batch_size: int, num_workers: int, collate_fn, pin_memory: bool, drop_last: bool):
    """LitData's ``StreamingDataLoader`` (resumable: Lightning stores its ``state_dict`` in checkpoints)."""
    litdata = require_litdata()
    return litdata.StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                       collate_fn=collate_fn, pin_memory=pin_memory, drop_last=drop_last)


