"""Eval on a trained checkpoint: reproduces what training logged, writes every report, TTA, the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli
from tests.trained import compose, trained_run
from twincar.evaluation.loop import EvalError
from twincar.evaluation.recipes import evaluate
from twincar.evaluation.report import REPORT_FILES

SLOW = pytest.mark.slow  # the tests that use `run` train a small model once per session (30-120 s on 2 cores)
FINE = ("acc_make", "acc_family", "acc_year", "acc_year_in_family", "ece", "nll")


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir) -> Path:
    return trained_run(tmp_path_factory, data_dir)


def eval_cfg(tmp_path: Path, ckpt: Path, *overrides: str):
    return compose("eval", [f"ckpt={ckpt}", f"paths.output_dir={tmp_path}", "progress=false", *overrides])


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def val_eval(run, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("eval_val")
    best = json.loads((run / "metrics.json").read_text())["best_checkpoint"]
    return out, evaluate(eval_cfg(out, Path(best), "data.split=val"))


@SLOW
def test_eval_reproduces_the_metrics_training_logged(run, val_eval, tmp_path):
    logged = json.loads((run / "metrics.json").read_text())
    _, val = val_eval
    test = evaluate(eval_cfg(tmp_path, Path(logged["best_checkpoint"])))  # data.split=test by default
    for name in ("acc", "acc_top3", "acc_top5", "f1_macro", "loss", *FINE):
        assert val[f"val/{name}"] == pytest.approx(logged[f"val/{name}"], abs=1e-4, nan_ok=True), name
        assert test[f"test/{name}"] == pytest.approx(logged[f"test/{name}"], abs=1e-4, nan_ok=True), name
    # training logs them too; a right class has the right family, and a right family the right make
    assert logged["val/acc"] <= logged["val/acc_family"] <= logged["val/acc_make"]
    # the exported model.pth (+ classes.txt, preprocessing from the run's config) is the best checkpoint
    pth = evaluate(eval_cfg(tmp_path / "pth", run / "model.pth", "data.split=val"))
    assert pth["val/acc"] == pytest.approx(val["val/acc"]) and pth["val/nll"] == pytest.approx(val["val/nll"], abs=1e-4)


@SLOW
def test_eval_writes_every_report(run, val_eval):
    out, metrics = val_eval
    reports = out / "reports"
    for name in REPORT_FILES:
        assert (reports / name).is_file() and (reports / name).stat().st_size > 0, name
    saved = json.loads((reports / "metrics.json").read_text())
    assert saved["split"] == "val" and saved["tta"] == "none" and saved["skipped"] == []
    assert saved["val/acc"] == pytest.approx(metrics["val/acc"])
    preds = read_csv(reports / "predictions.csv")
    assert len(preds) == saved["images"] == len(json.loads((run / "split.json").read_text())["val"])
    assert sum(int(r["correct"]) for r in preds) / len(preds) == pytest.approx(metrics["val/acc"])
    assert all(Path(r["path"]).is_file() and r["top5"].count(";") == 4 for r in preds)
    per_class = read_csv(reports / "per_class.csv")
    names = (run / "classes.txt").read_text().splitlines()
    assert [r["name"] for r in per_class] == names
    assert sum(int(r["support"]) for r in per_class) == len(preds)
    for r in per_class:  # recall = right / support, from the predictions themselves
        mine = [p for p in preds if p["true_name"] == r["name"]]
        assert float(r["recall"]) == pytest.approx(sum(int(p["correct"]) for p in mine) / len(mine), abs=1e-5)
    pairs = read_csv(reports / "confused_pairs.csv")
    wrong = [(p["true_name"], p["pred_name"]) for p in preds if p["correct"] == "0"]
    assert sum(int(p["total"]) for p in pairs) == len(wrong)  # 6 classes: every confused pair is listed
    if pairs:
        a, b = pairs[0]["name_a"], pairs[0]["name_b"]
        assert int(pairs[0]["a_as_b"]) == wrong.count((a, b)) and int(pairs[0]["b_as_a"]) == wrong.count((b, a))
    rows = (max(1, -(-len(wrong) // 4)), max(1, -(-len(pairs) // 2)))  # 4 images a row; 2 pairs a row
    sizes = {"reliability.png": (500, 600), "top_losses.png": (1360, 360 * rows[0]),
             "confused_pairs.png": (1300, 290 * rows[1])}
    for name, size in sizes.items():
        with Image.open(reports / name) as img:
            assert img.format == "PNG" and img.size == size, name
            assert len(img.convert("L").getcolors(1 << 16)) > 50  # a picture, not a blank canvas


@SLOW
def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror(run, tmp_path):
    from twincar import Predictor

    ckpt = run / "checkpoints" / "last.ckpt"
    evaluate(eval_cfg(tmp_path, ckpt, "data.split=val", "tta=flip"))
    row = read_csv(tmp_path / "reports" / "predictions.csv")[0]
    p = Predictor.load(ckpt, device="cpu")
    x = p.prepare(row["path"])[None]
    probs = torch.from_numpy((p.logits(x) + p.logits(x[:, :, ::-1])) / 2).softmax(1)[0]  # p carries T: divides the mean
    assert row["pred_name"] == p.class_names[int(probs.argmax())]
    assert float(row["confidence"]) == pytest.approx(probs.max().item(), abs=1e-4)
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text())["tta"] == "flip"


@SLOW
def test_an_unreadable_image_is_skipped_and_named(run, tmp_path):
    from twincar.data.formats import Sample
    from twincar.evaluation.loop import collect_logits
    from twincar.inference.predictor import Predictor

    p = Predictor.load(run / "checkpoints" / "last.ckpt", device="cpu")
    good = tmp_path / "good.jpg"
    Image.new("RGB", (80, 60), "blue").save(good)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    out = collect_logits(p, [Sample(tmp_path / "bad.jpg", 1), Sample(good, 2)], batch_size=2, progress=False)
    assert out.labels.tolist() == [2] and out.samples[0].path == good and out.logits.shape == (1, len(p.class_names))
    assert out.skipped[0][0].endswith("bad.jpg") and "bad.jpg" in out.skipped[0][1]
    assert torch.equal(out.logits, torch.from_numpy(p.logits(p.prepare(good)[None])))


@SLOW
def test_cli_writes_reports_in_its_run_directory_and_errors_in_one_sentence(run, tmp_path):
    proc = run_cli("twincar.eval", f"ckpt={run}/checkpoints/last.ckpt", "data.split=val", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (reports,) = (tmp_path / "outputs" / "evals").glob("*/reports")
    assert {p.name for p in reports.iterdir()} >= set(REPORT_FILES)
    assert "year in family" in proc.stdout + proc.stderr
    proc = run_cli("twincar.eval", f"ckpt={tmp_path}/nothing.ckpt", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "nothing.ckpt does not exist" in out and "Traceback" not in out


def test_data_config_is_the_training_runs_with_overrides_or_a_chosen_group(tmp_path):
    from twincar.evaluation.loop import data_config

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text(
        "data:\n  _target_: twincar.data.datamodule.CarsDataModule\n  root: ./data/synthetic\n  image_size: 64\n"
        "  eval_batch_size: 64\n  num_workers: 2\n  augmentation: {hflip: 0.5}\n  synthetic: {num_classes: 6}\n")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    data, split = data_config(eval_cfg(tmp_path, ckpt, "data.root=/elsewhere", "data.num_workers=0"))
    assert split == "test" and data["root"] == "/elsewhere" and data["num_workers"] == 0
    assert data["image_size"] == 64 and data["eval_batch_size"] == 64 and data["synthetic"] == {"num_classes": 6}
    assert data["augmentation"] is None  # eval images get the model's preprocessing only
    data, split = data_config(eval_cfg(tmp_path, ckpt, "data=stanford_cars", "data.root=/cars", "data.split=val"))
    assert split == "val" and data["root"] == "/cars" and data["image_size"] == 224 and data["synthetic"] is None
    with pytest.raises(EvalError, match="data.split=train is not a split: use data.split=test or data.split=val"):
        data_config(eval_cfg(tmp_path, ckpt, "data.split=train"))
    with pytest.raises(EvalError, match="no training config.yaml found for .* pass data=stanford_cars data.root=PATH"):
        data_config(eval_cfg(tmp_path, tmp_path / "model.pth"))


@SLOW
def test_explain_reads_a_run_checkpoint_and_its_exported_model_pth(run, tmp_path):
    from twincar.explain import main

    best = json.loads((run / "metrics.json").read_text())["best_checkpoint"]
    names = (run / "classes.txt").read_text().splitlines()
    img = tmp_path / "car.png"
    Image.new("RGB", (96, 64), "grey").save(img)
    for model, out in ((best, "a"), (run / "model.pth", "b")):  # model.pth holds the best weights
        assert main(["--images", str(img), "--model", str(model), "--method", "gradcam++", "--target", names[3],
                     "--out", str(tmp_path / out)]) == 0
    a, b = (read_csv(tmp_path / d / "explain.csv")[0] for d in "ab")
    assert a["target_name"] == b["target_name"] == names[3] and a["pred_name"] == b["pred_name"]
    assert float(a["confidence"]) == pytest.approx(float(b["confidence"]), abs=1e-4)
    with Image.open(tmp_path / "a" / a["overlay"]) as im:
        assert im.size == (700, 380)


def test_reports_on_a_parquet_copy_name_rows_and_draw_them(tmp_path):
    """Eval goes through the datamodule's readers: parquet rows are named file#row and drawn from their bytes."""
    import timm

    from tests.layouts import NAMES, build
    from twincar import Predictor
    from twincar.data.preprocess import Preprocess
    from twincar.evaluation.loop import collect_logits, eval_samples
    from twincar.evaluation.report import write_reports

    root = build("parquet", tmp_path / "hf")
    data = {"_target_": "twincar.data.datamodule.CarsDataModule", "root": str(root), "format": "parquet",
            "image_size": 32, "num_workers": 0, "split_dir": None, "augmentation": None}
    torch.manual_seed(0)
    p = Predictor(timm.create_model("resnet18", num_classes=3), NAMES, Preprocess(image_size=32), device="cpu")
    samples, margin, left_out = eval_samples(data, "test", NAMES)
    assert len(samples) == 6 and margin is None and left_out == []
    out = collect_logits(p, samples, progress=False, batch_size=4)
    metrics = write_reports(out, p, tmp_path / "reports", split="test", extra={})
    rows = read_csv(tmp_path / "reports" / "predictions.csv")
    assert [r["path"].rsplit("/", 1)[-1] for r in rows][:2] == ["test-00000-of-00001.parquet#0",
                                                                 "test-00000-of-00001.parquet#1"]
    assert sum(int(r["correct"]) for r in rows) / 6 == pytest.approx(metrics["test/acc"])
    pairs = read_csv(tmp_path / "reports" / "confused_pairs.csv")
    assert pairs and all("#" in r["example_a"] for r in pairs)  # a random network confuses some (seeded)
    from twincar.evaluation.figures import _thumbnail
    from twincar.evaluation.report import report_image

    thumb = _thumbnail(report_image(samples[0]))  # figures draw a row from its parquet bytes, not a grey placeholder
    assert thumb.dtype == np.uint8 and thumb.shape[2] == 3 and len(np.unique(thumb)) > 10
    with Image.open(tmp_path / "reports" / "top_losses.png") as img:
        assert img.format == "PNG" and img.size[0] > 100
