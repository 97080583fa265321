"""Predict's output files, written row by row: every column from the first row on, typed Parquet, JSON a user can
parse, and an output left as it was when no image could be read."""

from __future__ import annotations

import csv
import json

import pyarrow.parquet as pq
import pytest

import twincar.inference.writers as prediction_files
from tests.conftest import TINY_NAMES
from twincar.inference.results import Prediction
from twincar.inference.writers import columns, write_predictions


def predictions() -> list[Prediction]:
    """An unreadable image first, then a known car with two neighbours, then an unknown car with one."""
    return [
        Prediction(source="bad.jpg", error="bad.jpg: cannot identify image file"),
        Prediction(source="a.jpg", name=TINY_NAMES[2], label=2, confidence=0.9, make="BMW", model="M3 Coupe",
                   year=2012, topk=[(TINY_NAMES[2], 0.9), (TINY_NAMES[0], 0.05)], unknown_score=7.5, num_classes=6,
                   neighbours=[("train/1.jpg", TINY_NAMES[2], 0.8), ("train/2.jpg", TINY_NAMES[0], 0.7)]),
        Prediction(source="b.jpg", name=TINY_NAMES[0], label=0, confidence=0.4, make="Audi", model="S4 Sedan",
                   year=2012, topk=[(TINY_NAMES[0], 0.4), (TINY_NAMES[1], 0.3)], known=False, unknown_score=1.5,
                   num_classes=6, neighbours=[("train/3.jpg", TINY_NAMES[1], 0.2)]),
    ]


def test_csv_has_the_neighbour_columns_even_when_the_first_image_is_unreadable(tmp_path):
    out = tmp_path / "p.csv"
    written = write_predictions(out, iter(predictions()), "csv", topk=2, neighbours=2, open_set=True)
    assert (written.images, written.errors, written.unknown, written.saved) == (3, 1, 1, True)
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == columns(2, 2, True)
    assert list(rows[0])[:5] == ["image", "make", "model", "year", "confidence"]  # the original TwinCars columns
    assert rows[0]["error"].startswith("bad.jpg") and rows[0]["nn1_image"] == rows[0]["class"] == ""
    assert (rows[1]["nn2_image"], rows[1]["nn2_similarity"], rows[1]["known"]) == ("train/2.jpg", "0.7", "true")
    assert (rows[2]["nn1_class"], rows[2]["nn2_class"], rows[2]["known"]) == (TINY_NAMES[1], "", "false")
    assert rows[2]["class"] == "not one of the 6 known classes" and rows[2]["top1_class"] == TINY_NAMES[0]


def test_parquet_is_typed_and_written_in_row_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(prediction_files, "PARQUET_ROW_GROUP", 2)
    out = tmp_path / "p.parquet"
    write_predictions(out, predictions(), "parquet", topk=2, neighbours=2, open_set=True)
    file = pq.ParquetFile(out)
    assert file.metadata.num_row_groups == 2  # rows go out as they come, not all at the end
    types = {f.name: str(f.type) for f in file.schema_arrow}
    assert (types["year"], types["known"], types["top1_prob"], types["nn1_similarity"]) == \
        ("int64", "bool", "double", "double")
    rows = file.read().to_pylist()
    assert rows[0]["year"] is None and rows[0]["known"] is None and rows[0]["error"].startswith("bad.jpg")
    assert (rows[1]["year"], rows[1]["known"], rows[2]["known"], rows[1]["label"]) == (2012, True, False, 2)
    assert rows[2]["year"] is None and rows[2]["unknown_score"] == 1.5  # an unknown car has no year


def test_json_is_one_object_per_line_with_a_topk_list(tmp_path):
    out = tmp_path / "p.json"
    write_predictions(out, predictions(), "json", topk=2, neighbours=2, open_set=False)
    lines = out.read_text().splitlines()
    assert lines[0] == "[" and lines[-1] == "]" and len(lines) == 5
    objects = json.loads(out.read_text())
    assert objects[1]["topk"] == [{"class": TINY_NAMES[2], "prob": 0.9}, {"class": TINY_NAMES[0], "prob": 0.05}]
    assert "known" not in objects[1] and objects[0]["topk"] == []
    write_predictions(tmp_path / "none.json", [], "json", topk=1)
    assert json.loads((tmp_path / "none.json").read_text()) == []


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_an_output_is_left_as_it_was_when_no_image_could_be_read(tmp_path, fmt):
    out = tmp_path / f"p.{fmt}"
    out.write_bytes(b"the earlier run")
    written = write_predictions(out, [predictions()[0]], fmt, topk=2)
    assert (written.images, written.errors, written.saved) == (1, 1, False)
    assert out.read_bytes() == b"the earlier run" and [p.name for p in tmp_path.iterdir()] == [out.name]
    fresh = tmp_path / f"new.{fmt}"  # no earlier file: the error rows are written
    assert write_predictions(fresh, [predictions()[0]], fmt, topk=2).saved and fresh.stat().st_size > 0
