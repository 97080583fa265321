"""Prediction files: predict's rows written one at a time, as CSV, JSON or Parquet.

The columns are fixed before the first row (:func:`columns`), so a million-image job holds one batch of rows in
memory, not the job, and an error row has every column of a good one. The file grows beside its final path and is
renamed into place once complete (:func:`twincar.files.atomic_path`): a kill never leaves half an output. No torch
here (the ONNX runtime writes through it too); pyarrow is imported for Parquet only.
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from twincar.cluster import is_launching_process, run_lock
from twincar.files import atomic_path, dumps
from twincar.inference.results import Prediction

FORMATS = ("csv", "json", "parquet")
PARQUET_ROW_GROUP = 10_000  # rows buffered per Parquet row group


def columns(topk: int, neighbours: int = 0, open_set: bool = False) -> list[str]:
    """The columns of every row (:meth:`Prediction.to_row` with these arguments), in order."""
    return list(Prediction(source="").to_row(topk, open_set, neighbours))


@dataclass
class Written:
    """What a prediction file holds."""

    images: int = 0
    errors: int = 0  # rows of images that could not be read
    unknown: int = 0  # cars that are not one of the known classes (below the unknown threshold)
    saved: bool = False  # False: no image could be read and the file that was there is left as it was

    def count(self, p: Prediction) -> None:
        self.images += 1
        self.errors += not p.ok
        self.unknown += p.ok and not p.known


class _NothingRead(Exception):
    """Every image failed: the existing output is kept (raised inside :func:`atomic_path` to drop the new file)."""


def write_predictions(output: str | Path, predictions: Iterable[Prediction], fmt: str, *, topk: int,
                      neighbours: int = 0, open_set: bool = False) -> Written:
    """Write the rows of ``predictions`` (any iterable: consumed once, row by row) to ``output`` atomically.

    CSV: a header, then one row per image. Parquet: the CSV's columns, typed (:func:`typed_row`: an empty cell is
    null, ``known`` a boolean). JSON: a list with one typed object per line (:func:`json_record`), its ``topk`` a list
    of ``{"class", "prob"}``. ``topk``
    class and ``neighbours`` neighbour columns; ``open_set``: the ``known`` and ``unknown_score`` columns (a model
    with an unknown threshold). When no image could be read and ``output`` exists, it is left as it was.
    """
    output = Path(output)
    written = Written()
    write = {"csv": _write_csv, "json": _write_json, "parquet": _write_parquet}[fmt]
    try:
        with atomic_path(output) as tmp:
            write(tmp, _counted(predictions, written), columns(topk, neighbours, open_set), topk, neighbours,
                  open_set)
            if written.images and written.errors == written.images and output.exists():
                raise _NothingRead
        written.saved = True
    except _NothingRead:
        pass
    return written


def _counted(predictions: Iterable[Prediction], written: Written) -> Iterable[Prediction]:
    for p in predictions:
        written.count(p)
        yield p


def _write_csv(path: Path, predictions, fields: list[str], topk: int, neighbours: int, open_set: bool) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for p in predictions:
            writer.writerow(p.to_row(topk, open_set, neighbours))


def typed_row(p: Prediction, topk: int, open_set: bool = False, neighbours: int = 0) -> dict[str, object]:
    """:meth:`Prediction.to_row` typed: an empty cell is None, ``known`` a boolean (Parquet's and JSON's cells)."""
    return {k: None if v == "" else v == "true" if k == "known" else v
            for k, v in p.to_row(topk, open_set, neighbours).items()}


def json_record(p: Prediction, open_set: bool = False, neighbours: int = 0) -> dict[str, object]:
    """One prediction as predict's JSON writes it (and the server answers it): the typed row without the top-k
    columns, its ``topk`` a list of ``{"class", "prob"}``, most likely first."""
    record = typed_row(p, 0, open_set, neighbours)
    record["topk"] = [{"class": n, "prob": round(q, 6)} for n, q in p.topk]
    return record


def _write_json(path: Path, predictions, fields: list[str], topk: int, neighbours: int, open_set: bool) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write("[")
        for i, p in enumerate(predictions):
            f.write(("," if i else "") + "\n" + dumps(json_record(p, open_set, neighbours), indent=None))
        f.write("\n]\n")


def _write_parquet(path: Path, predictions, fields: list[str], topk: int, neighbours: int, open_set: bool) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, _parquet_type(name, pa)) for name in fields])
    rows: list[dict] = []
    with pq.ParquetWriter(path, schema) as writer:
        for p in predictions:
            rows.append(typed_row(p, topk, open_set, neighbours))
            if len(rows) >= PARQUET_ROW_GROUP:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                rows = []
        writer.write_table(pa.Table.from_pylist(rows, schema=schema))  # the last rows (an empty table: none)


def _parquet_type(column: str, pa):
    """A column's Arrow type, from its name (:meth:`Prediction.to_row`)."""
    if column in ("year", "label"):
        return pa.int64()
    if column == "known":
        return pa.bool_()
    if column in ("confidence", "unknown_score") or column.endswith(("_prob", "_similarity")):
        return pa.float64()
    return pa.string()


def shard_dir(output: str | Path) -> Path:
    """The folder of ``output``'s shards (:mod:`twincar.inference.shards`) and of its lock: ``OUTPUT.shards``."""
    output = Path(output)
    return output.with_name(output.name + ".shards")


@contextlib.contextmanager
def job_lock(folder: Path) -> Iterator[None]:
    """Hold the lock of an output's shards folder (:func:`shard_dir`) inside the block (the launching process; the
    others run under it). Every predict takes it, one process or many, so a second job into the same output stops
    in one sentence instead of removing the first one's shards or overwriting its file; the folder is removed at
    the end when nothing is left in it. No torch: the ONNX runtime takes it too."""
    launching = is_launching_process()
    if launching:
        folder.mkdir(parents=True, exist_ok=True)
    with run_lock(folder, ("predict job", "predict into another --output")):
        yield
    if launching and folder.is_dir() and not any(folder.iterdir()):
        os.rmdir(folder)
