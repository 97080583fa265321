"""Hugging Face parquet copies (e.g. a snapshot of tanganke/stanford_cars), read with pyarrow only.

``data/{train,test}-0000N-of-0000M.parquet`` (or in the root, or ``{train,test}/*.parquet`` as the hub's
parquet conversion writes them) with columns ``image``
(struct of ``bytes`` and ``path``) and ``label``; class names from the schema's ``huggingface``
metadata (``info.features.label.names``). No boxes. Images stay in the parquet files: each process
reads a file's image column once (:func:`image_bytes`) and decodes rows on demand.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

from twincar.data.formats.common import CarsData, DatasetFormatError, Sample

EXPECTS = "data/train-*.parquet (and test-*.parquet), or train-*.parquet or train/*.parquet in ROOT"
_SPLIT = re.compile(r"^(train|test)[-_.]", re.I)
_IMAGE_COLUMNS: dict[Path, object] = {}  # per process: parquet file -> its image column (a pyarrow array)
_LOAD_LOCK = threading.Lock()


def parquet_files(root: Path) -> dict[str, list[Path]]:
    """``{"train": [...], "test": [...]}``: ``{train,test}-*.parquet`` under ``root/data`` or ``root``, or
    ``{train,test}/*.parquet`` under ``root``, ``root/data`` or ``root/default`` (the hub's parquet conversion)."""
    for folder in (root / "data", root):
        files: dict[str, list[Path]] = {}
        for f in sorted(folder.glob("*.parquet")):
            m = _SPLIT.match(f.name)
            if m:
                files.setdefault(m.group(1).lower(), []).append(f)
        if files.get("train"):
            return files
    for folder in (root, root / "data", root / "default"):
        files = {split: sorted((folder / split).glob("*.parquet")) for split in ("train", "test")}
        if files["train"]:
            return files
    return {}


def find_parquet(root: Path) -> Path | None:
    """``root`` when it holds ``train-*.parquet`` files in ``data/`` or in itself."""
    return root if parquet_files(root) else None


def read_class_names(path: Path) -> list[str]:
    """Class names from a parquet file's ``huggingface`` schema metadata (``info.features.label.names``)."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        raise DatasetFormatError(f"{path} is not a readable parquet file: {e}") from e
    try:
        info = json.loads(meta[b"huggingface"])["info"]["features"]["label"]
        names = info["names"]
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetFormatError(
            f"{path} has no class names in its 'huggingface' schema metadata (info.features.label.names): "
            "use a copy saved by the datasets library"
        ) from e
    return [str(n).strip() for n in names]


def _labels(path: Path) -> list[int]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["label"])
    except Exception as e:
        raise DatasetFormatError(f"{path}: cannot read its 'label' column ({e})") from e
    return table.column("label").to_pylist()


def read_parquet(root: Path) -> CarsData:
    """Both splits of a parquet copy; the label column is 0-based already."""
    files = parquet_files(root)
    names = read_class_names(files["train"][0])
    splits: dict[str, list[Sample]] = {"train": [], "test": []}
    for split, paths in files.items():
        for f in paths:
            for row, label in enumerate(_labels(f)):
                if label is None or not 0 <= label < len(names):
                    raise DatasetFormatError(f"{f}: row {row} has label {label}, outside 0..{len(names) - 1}")
                splits[split].append(Sample(f, int(label), None, index=row))
    return CarsData("parquet", root, names, splits["train"], splits["test"])


def image_bytes(path: Path, index: int) -> bytes:
    """The encoded image of row ``index`` of parquet file ``path`` (the file's column is read once per process)."""
    import pyarrow.parquet as pq

    column = _IMAGE_COLUMNS.get(path)
    if column is None:
        with _LOAD_LOCK:  # the check's threads ask at once: read each file once
            column = _IMAGE_COLUMNS.get(path)
            if column is None:
                try:  # kept chunked: one array of a large file's bytes would overflow 32-bit offsets
                    column = _IMAGE_COLUMNS[path] = pq.read_table(path, columns=["image"]).column("image")
                except Exception as e:
                    raise DatasetFormatError(f"{path}: cannot read its 'image' column ({e})") from e
    value = column[index]
    value = value["bytes"] if column.type.num_fields else value  # struct {bytes, path}, or plain binary
    return value.as_py() or b""  # a row without bytes reads as an empty image
