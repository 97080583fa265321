"""python -m twincar.check: every kind of problem named, in a table and a CSV, with the exit code."""

import csv
import json
import shutil

import pytest

from tests.conftest import SMALL_SPEC, run_cli
from tests.layouts import build, make_images
from twincar.check import main
from twincar.data.images import MAX_IMAGE_PIXELS


def test_clean_copy_passes_and_counts_grayscale(small_root, capsys):
    assert main([str(small_root)]) == 0
    out = capsys.readouterr().out
    n_train = SMALL_SPEC["num_classes"] * SMALL_SPEC["train_per_class"]
    assert f"train: {n_train} images, 0 errors, 0 warnings" in out


def bomb_png() -> bytes:
    """A valid PNG header announcing more pixels than MAX_IMAGE_PIXELS (refused before decoding)."""
    import struct
    import zlib

    side = int(MAX_IMAGE_PIXELS**0.5) + 10
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = zlib.compress(b"\0" * 16)
    chunk += struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


@pytest.mark.parametrize("layout", ["devkit", "parquet"])
def test_every_problem_is_named_once_with_its_severity(tmp_path, capsys, layout):
    images = make_images()
    damaged = dict(enumerate(images))
    broken = {3: b"", 4: b"GIF89a not really", 6: images[6].data[:-200], 7: bomb_png()}
    for i, data in broken.items():
        damaged[i] = type(images[i])(**{**images[i].__dict__, "data": data})
    test_start = next(i for i, im in enumerate(images) if im.split == "test")
    damaged[test_start] = type(images[0])(**{**images[test_start].__dict__, "data": images[9].data})  # leaked
    root = build(layout, tmp_path / layout, list(damaged.values()))
    if layout == "devkit":
        (root / "cars_train" / "00009.jpg").unlink()
    report = tmp_path / "report.csv"
    assert main([str(root), "--report", str(report)]) == 1
    out = capsys.readouterr().out
    with open(report, newline="") as f:
        rows = {(r["severity"], r["problem"]): r for r in csv.DictReader(f)}
    expected = {("error", "empty"), ("error", "not an image"), ("error", "truncated"), ("error", "too large"),
                ("warning", "also in train"), ("info", "grayscale"), ("info", "CMYK")}
    if layout == "devkit":
        expected.add(("error", "missing"))
    assert set(rows) == expected
    name = "00004.jpg" if layout == "devkit" else "train-00000-of-00001.parquet#3"
    assert rows[("error", "empty")]["path"].endswith(name) and "(0 bytes)" in rows[("error", "empty")]["detail"]
    assert "decompression bomb" in rows[("error", "too large")]["detail"]
    assert rows[("warning", "also in train")]["split"] == "test"
    errors = len(expected) - 3
    assert f"train: 18 images, {errors} errors" in out and "test: 6 images, 0 errors, 1 warnings" in out
    assert out.index("error ") < out.index("warning ") < out.index("info ")  # errors listed first


def test_json_report_and_unknown_root(small_root, tmp_path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(small_root, root)
    (root / "cars_test" / "00002.jpg").unlink()
    assert main([str(root), "--report", str(tmp_path / "report.json")]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["format"] == "devkit" and report["splits"]["test"]["errors"] == 1
    (error,) = [f for f in report["findings"] if f["severity"] == "error"]
    assert error["problem"] == "missing" and error["path"] == str(root / "cars_test" / "00002.jpg")
    assert main([str(tmp_path / "nothing")]) == 2
    assert "does not exist: pass data.root=PATH" in capsys.readouterr().err


def test_the_old_spelling_of_the_tool_names_the_new_one(tmp_path):
    proc = run_cli("twincar.data.check", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "python -m twincar.data.check is now python -m twincar.check"
