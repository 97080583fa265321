"""The predict CLI as a user runs it: files in, a CSV/JSON of make/model/year out, bad files reported."""

from __future__ import annotations

import csv
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_NAMES, run_cli
from twincar import Predictor
from twincar.data.images import find_images
from twincar.inference.engines import resolve_precision
from twincar.models import WeightsError
from twincar.predict import main


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def png_bomb(path: Path, side: int = 30_000) -> Path:
    """A tiny PNG whose header claims side x side pixels (decoding it would need gigabytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture()
def mixed_folder(tmp_path, car_images) -> Path:
    """Good photos plus every kind of bad file: not an image, zero bytes, truncated, decompression bomb."""
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    for p in car_images:
        target = d / p.relative_to(p.parents[1] if p.parent.name == "sub" else p.parent)
        target.write_bytes(p.read_bytes())
    (d / "notes.jpg").write_text("not an image")
    (d / "empty.png").write_bytes(b"")
    jpeg = (d / "a.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    png_bomb(d / "bomb.png")
    (d / "readme.txt").write_text("not listed: not an image extension")
    return d


@pytest.mark.slow  # a subprocess: imports torch and starts a decoding worker (10-40 s on 2 shared cores)
def test_cli_writes_one_row_per_image_with_the_original_columns_and_error_rows(tiny_export, mixed_folder, tmp_path):
    out = tmp_path / "reports" / "preds.csv"  # the folder does not exist yet
    proc = run_cli("twincar.predict", "--images", str(mixed_folder), "--model", str(tiny_export), "--output", str(out),
                   "--batch-size", "2", "--workers", "1", "--precision", "fp32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = read_csv(out)
    assert list(rows[0])[:10] == ["image", "make", "model", "year", "confidence", "class", "label",
                                  "top1_class", "top1_prob", "top2_class"]
    assert list(rows[0])[-3:] == ["top5_class", "top5_prob", "error"]
    names = [Path(r["image"]).relative_to(mixed_folder).as_posix() for r in rows]
    assert names == ["a.jpg", "b.png", "bomb.png", "empty.png", "notes.jpg", "sub/c.png", "truncated.jpg"]
    by_name = dict(zip(names, rows, strict=True))
    assert "decompression bomb" in by_name["bomb.png"]["error"]
    assert "empty (0 bytes)" in by_name["empty.png"]["error"]
    assert "not an image" in by_name["notes.jpg"]["error"]
    assert "truncated.jpg" in by_name["truncated.jpg"]["error"]
    assert all(by_name[n]["class"] == "" and by_name[n]["confidence"] == "" for n in
               ("bomb.png", "empty.png", "notes.jpg", "truncated.jpg"))
    # the good rows are what the Python API says for the same files
    p = Predictor.load(tiny_export, device="cpu")
    for name in ("a.jpg", "b.png", "sub/c.png"):
        row, ref = by_name[name], p.predict(mixed_folder / name)
        assert row["error"] == "" and row["class"] == ref.name == row["top1_class"]
        assert (row["make"], row["model"], row["year"]) == (ref.make, ref.model, str(ref.year))
        assert float(row["confidence"]) == pytest.approx(ref.confidence, abs=1e-5)
        assert int(row["label"]) == TINY_NAMES.index(ref.name)
        probs = [float(row[f"top{i}_prob"]) for i in range(1, 6)]
        assert probs == sorted(probs, reverse=True) and probs[0] == pytest.approx(ref.confidence, abs=1e-5)
    assert "skipping unreadable image" in proc.stderr and "bomb.png" in proc.stderr
    assert "7 images, 4 errors" in proc.stdout
    assert not list(out.parent.glob(".*tmp"))  # written atomically: no temporary file left


def test_json_output_topk_and_parsed_names(tiny_export, car_images, tmp_path, capsys):
    out = tmp_path / "preds.json"
    assert main(["--images", str(car_images[0]), str(car_images[1]), "--model", str(tiny_export), "--format", "json",
                 "--topk", "3", "-o", str(out), "--workers", "0"]) == 0
    objects = json.loads(out.read_text())
    assert [o["image"] for o in objects] == [str(car_images[0]), str(car_images[1])]
    for o in objects:
        assert len(o["topk"]) == 3 and o["topk"][0]["class"] == o["class"]
        make = "Aston Martin" if o["class"].startswith("Aston") else o["class"].split()[0]
        assert o["make"] == make and o["class"] == f"{o['make']} {o['model']} {o['year']}"
    assert "2 images, 0 errors" in capsys.readouterr().out


def test_every_image_failing_exits_1_and_a_glob_selects_images(tiny_export, tmp_path, capsys):
    (tmp_path / "x.jpg").write_text("nope")
    (tmp_path / "y.jpg").write_bytes(b"")
    assert main(["--images", str(tmp_path / "*.jpg"), "--model", str(tiny_export), "-o", str(tmp_path / "o.csv")]) == 1
    assert "none of the 2 image(s) could be read" in capsys.readouterr().err
    assert len(read_csv(tmp_path / "o.csv")) == 2  # the error rows are still written


def test_class_list_problems_are_one_sentence_before_any_image_is_read(tiny_export, tmp_path, capsys):
    (tmp_path / "three.txt").write_text("A 2001\nB 2002\nC 2003\n")
    # --images points nowhere: the class check must come first
    args = ["--images", str(tmp_path / "missing"), "--model", str(tiny_export), "-o", str(tmp_path / "o.csv")]
    assert main([*args, "--classes", str(tmp_path / "three.txt")]) == 1
    err = capsys.readouterr().err
    assert "carries class names that differ from those given by --classes (6 classes against 3)" in err
    assert "Traceback" not in err
    bare = tmp_path / "bare" / "model.pth"  # the same weights without their model card
    bare.parent.mkdir()
    bare.write_bytes(tiny_export.read_bytes())
    assert main([*args[:2], "--model", str(bare), "--classes", str(tmp_path / "three.txt"), *args[4:]]) == 1
    err = capsys.readouterr().err
    assert "the class list has 3 names but" in err and "has 6 outputs" in err
    assert main(args) == 1
    assert f"--images {tmp_path / 'missing'}: no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


def test_find_images_recurses_sorts_and_dedups(car_images):
    root = car_images[0].parent
    assert find_images([root, car_images[0]]) == sorted(car_images)
    assert find_images([str(root / "*.png")]) == [car_images[1]]


def test_flip_tta_averages_the_image_and_its_mirror(tiny_export, car_images):
    plain = Predictor.load(tiny_export, device="cpu")
    tta = Predictor.load(tiny_export, device="cpu", tta="flip")
    prepared = plain.prepare(car_images[0])
    views = [plain.logits(prepared[None]), plain.logits(prepared[:, ::-1][None])]  # (S, S, 3): the mirror flips axis 1
    probs = torch.from_numpy(np.concatenate(views)).mean(0).softmax(0)
    avg = dict(zip(TINY_NAMES, probs.tolist(), strict=True))
    got = tta.predict(car_images[0], topk=6)
    assert got.name == max(avg, key=avg.get)
    assert dict(got.topk) == pytest.approx(avg, abs=1e-5)
    assert dict(got.topk) != pytest.approx(dict(plain.predict(car_images[0], topk=6).topk), abs=1e-5)


def test_precision_auto_follows_the_hardware(monkeypatch, tiny_export, car_images):
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None and resolve_precision("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_precision("auto", cpu) is None
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_precision("auto", cpu) is torch.bfloat16
    p = Predictor.load(tiny_export, device="cpu", precision="bf16")
    r = p.predict(car_images[0], topk=6)
    assert r.ok and r.name in TINY_NAMES and sum(q for _, q in r.topk) == pytest.approx(1, abs=1e-3)


def test_img_size_and_resize_mode_change_the_bare_state_dict_default(tiny_export, car_images, tmp_path):
    bare = tmp_path / "model.pth"
    bare.write_bytes(tiny_export.read_bytes())
    with pytest.raises(WeightsError, match="does not fit architecture resnet50"):  # a bare file is taken for resnet50
        Predictor.load(bare, classes=TINY_NAMES)
    p = Predictor.load(bare, classes=TINY_NAMES, architecture="resnet18", image_size=96, resize_mode="crop")
    assert (p.preprocess.image_size, p.preprocess.resize_mode) == (96, "crop")
    assert p.prepare(car_images[0]).shape == (96, 96, 3)
    assert Predictor.load(bare, TINY_NAMES, architecture="resnet18").preprocess.resize_mode == "squash"  # the original


@pytest.mark.slow
def test_predict_on_a_training_run_with_and_without_classes(trained_run, data_dir, tmp_path):
    """The README's command on what `make demo` writes: RUN/model.pth (+ classes.txt, model_card.json)."""
    images = sorted(data_dir.glob("synthetic/*/cars_test/*.jpg"))[:6]
    assert images
    for extra in (["--classes", str(trained_run / "classes.txt")], []):
        out = tmp_path / "p.csv"
        assert main(["--images", *map(str, images), "--model", str(trained_run / "model.pth"), "-o", str(out),
                     "--workers", "0", *extra]) == 0
        rows = read_csv(out)
        names = (trained_run / "classes.txt").read_text().splitlines()
        assert len(rows) == 6 and all(r["class"] in names and not r["error"] for r in rows)
    best = json.loads((trained_run / "metrics.json").read_text())["best_checkpoint"]  # model.pth's weights,
    ckpt = Predictor.load(best, device="cpu").predict(images[0])  # calibrated like it at the end of training
    pth = Predictor.load(trained_run / "model.pth", device="cpu").predict(images[0])
    assert (ckpt.name, ckpt.confidence) == (pth.name, pytest.approx(pth.confidence, abs=1e-5))
    assert Predictor.load(trained_run / "model.pth").preprocess.image_size == 64  # from the model card


def test_a_large_jpeg_is_predicted_from_the_reduced_decode_that_eval_uses(tiny_export, tmp_path):
    # 1024x768 for a 64 px model: decoded at 1/8 (short side 96 >= the 73 px resize), as eval decodes it
    from functools import partial

    from PIL import Image

    from twincar.data.formats import Sample
    from twincar.data.images import load_rgb, load_sample

    rng = torch.Generator().manual_seed(0)
    path = tmp_path / "large.jpg"
    Image.fromarray(torch.randint(0, 256, (768, 1024, 3), generator=rng, dtype=torch.uint8).numpy()).save(path)
    p = Predictor.load(tiny_export, device="cpu", precision="fp32")
    eval_reader = partial(load_sample, min_side=p.preprocess.decode_min_side)  # what validation and twincar.eval read
    assert eval_reader(Sample(path, 0)).shape == (96, 128, 3)
    expected = torch.from_numpy(p.logits(p.prepare(eval_reader(Sample(path, 0)))[None])).softmax(1)[0]
    full = torch.from_numpy(p.logits(p.prepare(load_rgb(path))[None])).softmax(1)[0]
    assert not torch.allclose(expected, full, atol=1e-6)  # the two decodes do differ, so the check below can fail
    got = p.predict([path], topk=6)[0]
    assert dict(got.topk) == pytest.approx(dict(zip(TINY_NAMES, expected.tolist(), strict=True)), abs=1e-6)


def test_cpu_inference_decodes_in_process_and_a_gpu_gets_workers(monkeypatch):
    import os

    from twincar.inference.engines import default_workers

    assert default_workers(torch.device("cpu")) == 0  # workers would stall the network's threads on the same cores
    for cores, workers in ((2, 2), (32, 8), (None, 1)):  # a GPU: one per core, at most 8, one if unknown
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        assert default_workers(torch.device("cuda")) == workers, cores
        assert default_workers(torch.device("cpu")) == 0


@pytest.mark.slow  # a subprocess importing torch
def test_predicting_imports_no_training_code(tmp_path):
    # start-up is most of a short predict run: kornia, Lightning, Hydra are training-only imports, and timm is
    # imported only to build an eager network (an ONNX model needs none of it)
    import subprocess
    import sys

    code = ("import sys; from twincar.inference.predictor import Predictor; import twincar.predict; "
            "import twincar.models.loading; "
            "print(sorted(m for m in ('kornia', 'timm', 'lightning', 'torchmetrics', 'hydra') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
