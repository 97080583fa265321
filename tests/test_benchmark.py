"""scripts/benchmark.py: it runs and writes every field; the fast pipelines give what the reference gives."""

from __future__ import annotations

import json
import runpy
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from twincar.data.cache import open_cache
from twincar.data.datasets import CarsDataset
from twincar.data.formats import Sample
from twincar.data.images import load_sample
from twincar.data.preprocess import TWINCARS_PREPROCESS, Preprocess
from twincar.data.transforms import BatchTransform, EvalImageTransform, TrainImageTransform, to_tensor

BENCH = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "benchmark.py"))
FIELDS = {"reference_img_s", "twincar_img_s", "ratio"}
# the ratio is printed and stored to 2 decimals, the img/s to 1: the recomputed ratio agrees within that rounding
# (abs=0.006), or within 2% of itself


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    return BENCH["make_images"](tmp_path_factory.mktemp("photos"), 4, quick=True)


def test_quick_benchmark_of_the_input_pipelines_trains_nothing(tmp_path, capsys):
    out = tmp_path / "bench.json"
    BENCH["main"](["--quick", "--json", str(out), "--only", "train_pipeline,eval_pipeline"])
    printed = capsys.readouterr().out
    m = json.loads(out.read_text())["measures"]
    assert set(m) == {"train_pipeline", "eval_pipeline"}
    for name, r in m.items():
        assert name in printed
        assert r["ratio"] == pytest.approx(r["twincar_img_s"] / r["reference_img_s"], rel=0.02, abs=0.006)


def test_open_set_cost_measures_the_unknown_answer_and_the_neighbours_against_plain_predict(tmp_path, capsys):
    out = tmp_path / "bench.json"
    BENCH["main"](["--quick", "--json", str(out), "--only", "open_set_cost"])
    r = json.loads(out.read_text())["measures"]["open_set_cost"]
    assert "open_set_cost" in capsys.readouterr().out and r["images"] == 6 and r["index_images"] == 256
    assert r["reference_img_s"] > 0 and r["twincar_img_s"] == r["neighbours_img_s"]
    for name in ("unknown", "neighbours", "neighbours_two_pass"):
        assert r[f"{name}_ratio"] == pytest.approx(r[f"{name}_img_s"] / r["reference_img_s"], rel=0.02, abs=0.006)
    assert r["search_torch_ms_per_query"] > 0 and ("search_faiss_ms_per_query" in r) == r["faiss"]


def test_shard_merge_streams_the_same_csv_as_reading_every_row_first(tmp_path, capsys):
    out = tmp_path / "bench.json"
    BENCH["main"](["--quick", "--json", str(out), "--only", "shard_merge"])
    r = json.loads(out.read_text())["measures"]["shard_merge"]
    assert "shard_merge" in capsys.readouterr().out and (r["rows"], r["processes"], r["shard_rows"]) == (2000, 4, 100)
    assert r["same_output"] is True  # byte for byte: the stream changes memory, not the file
    assert r["ratio"] == pytest.approx(r["twincar_img_s"] / r["reference_img_s"], rel=0.02, abs=0.006)
    assert 0 < r["twincar_peak_mb"] < r["reference_peak_mb"]  # a few shards held, not the job


@pytest.mark.slow  # train_step and gpu_train are training measures: optimizer steps on a network
def test_quick_benchmark_writes_every_measure_and_field(tmp_path, capsys):
    out = tmp_path / "bench.json"
    BENCH["main"](["--quick", "--json", str(out), "--only",
                   "train_pipeline,train_pipeline_cached,eval_pipeline,train_step,gpu_train"])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    m = report["measures"]
    assert set(m) == {"train_pipeline", "train_pipeline_cached", "eval_pipeline", "train_step", "gpu_train"}
    for name in ("train_pipeline", "train_pipeline_cached", "eval_pipeline", "train_step"):
        r = m[name]
        assert FIELDS <= set(r) and r["reference_img_s"] > 0 and r["twincar_img_s"] > 0
        assert r["ratio"] == pytest.approx(r["twincar_img_s"] / r["reference_img_s"], rel=0.02, abs=0.006)
        assert name in printed
    assert {"device_batch_ms", "device"} <= set(m["train_pipeline"]) and m["train_pipeline"]["device_batch_ms"] > 0
    assert m["train_pipeline_cached"]["cache_short_side"] == 37  # 1.15 x 32: crop pct 0.875 leaves too little
    assert {"twincar_cached_img_s", "profile"} <= set(m["eval_pipeline"])
    assert {"fp32_channels_last_img_s", "cpu_bf16_native"} <= set(m["train_step"])
    if not torch.cuda.is_available():
        assert m["gpu_train"] == {"reference_img_s": None, "twincar_img_s": None, "ratio": None,
                                  "skipped": "no CUDA device"}
    assert report["machine"]["cores"] >= 1 and report["images"] == 6


@pytest.mark.slow
def test_cpu_predict_runs_every_process_and_compares_their_csvs(photos, tmp_path):
    int8_images = BENCH["make_images"](tmp_path / "int8_images", 2, quick=True, seed=1)
    assert not {p.read_bytes() for p in int8_images} & {p.read_bytes() for p in photos}  # never the measured ones
    m = BENCH["cpu_predict"](photos, tmp_path, None, None, quick=True, int8_images=int8_images)
    assert set(m) == {"cpu_predict", "cpu_predict_onnx", "cpu_predict_int8"}
    for r in m.values():
        assert FIELDS <= set(r) and r["images"] == 4 and r["peak_rss_mb"] > 50 and r["reference_peak_rss_mb"] > 50
        assert r["top1_agreement"] is None and "not measured" in r["agreement_note"]  # random weights
        assert r["twincar_startup_s"] > 0 and r["reference_startup_s"] > 0 and "twincar_per_image_ms" in r
    assert m["cpu_predict_int8"]["int8_images"] == 2 and "model.int8.onnx" in m["cpu_predict_int8"][
        "twincar_command"]
    ref = BENCH["_read_predictions"](tmp_path / "reference_all.csv")
    for name in ("twincar", "int8"):
        ours = BENCH["_read_predictions"](tmp_path / f"{name}_all.csv")
        assert sorted(ref) == sorted(ours) == sorted(p.name for p in photos)


@pytest.mark.slow
def test_gpu_train_measure_runs_end_to_end_on_cpu(photos, tmp_path):
    # the CUDA measure's code path, on the CPU with a tiny network: numbers mean nothing here, fields do
    r = BENCH["gpu_train"](photos, tmp_path, True, False, device=torch.device("cpu"))
    assert FIELDS <= set(r) and r["twincar_img_s"] > 0 and r["model_only_img_s"] > 0 and r["cached_img_s"] > 0
    assert r["loader_efficiency"] == pytest.approx(r["twincar_img_s"] / r["model_only_img_s"], rel=0.01)
    for path in ("gpu_decode", "device_cache"):  # the GPU input paths, here on the CPU
        assert r[f"{path}_img_s"] > 0
        assert r[f"{path}_loader_efficiency"] == pytest.approx(r[f"{path}_img_s"] / r["model_only_img_s"], rel=0.01)


def test_fast_train_pipeline_matches_the_reference_in_shape_dtype_and_range(photos):
    reference = BENCH["reference_train_transform"](64)
    pre = Preprocess(image_size=64)
    worker = TrainImageTransform(pre, BENCH["SEED_AUG"])
    on_device = BatchTransform(pre, BENCH["SEED_AUG"], num_classes=3)
    cache = open_cache([Sample(p, 0) for p in photos], photos[0].parent / "cache", pre)
    draws = photos * 8  # 8 random augmentations of each photo: the means below average over crops and jitter
    torch.manual_seed(0)
    ref = torch.stack([reference(BENCH["_pil_rgb"](p)) for p in draws])
    lo = ((0 - torch.tensor(pre.mean)) / torch.tensor(pre.std)).view(1, 3, 1, 1)
    hi = ((1 - torch.tensor(pre.mean)) / torch.tensor(pre.std)).view(1, 3, 1, 1)
    labels = torch.arange(len(draws)) % 3
    for read in (lambda sample: to_tensor(load_sample(sample)), cache):
        uint8 = torch.stack([worker(read(Sample(p, 0))) for p in draws])
        assert uint8.dtype == torch.uint8 and uint8.shape == ref.shape == (32, 3, 64, 64)
        x, y = on_device(uint8, labels)
        assert x.dtype == ref.dtype == torch.float32 and torch.equal(y, labels)
        assert ((x >= lo - 1e-5) & (x <= hi + 1e-5)).all() and ((ref >= lo - 1e-5) & (ref <= hi + 1e-5)).all()
        assert abs(x.mean() - ref.mean()) < 0.5  # the same kind of images (30 seeds: at most 0.26 apart)


def test_fast_eval_preprocessing_matches_the_reference_values(photos):
    # TwinCar's eval with the original preprocessing (224 squash) vs Resize((224, 224)) + ToTensor + Normalize
    reference = BENCH["reference_eval_transform"](224)
    per_image, per_batch = EvalImageTransform(TWINCARS_PREPROCESS), BatchTransform(TWINCARS_PREPROCESS)
    read = partial(load_sample, min_side=TWINCARS_PREPROCESS.decode_min_side)
    for p in photos:
        ref = reference(BENCH["_pil_rgb"](p))
        ours = per_batch(per_image(to_tensor(read(Sample(p, 0))))[None])[0]
        assert ours.shape == ref.shape == (3, 224, 224) and ours.dtype == ref.dtype
        assert (ours - ref).abs().mean() < 0.05  # ~2 grey levels on average: PIL vs torchvision resampling


def test_cached_train_batches_keep_labels_with_their_images(tmp_path):
    # solid images, one colour per label: every augmented image's centre must still show its label's colour
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (250, 250, 10), (10, 250, 250), (250, 10, 250)]
    samples = []
    for label, c in enumerate(colours):
        path = tmp_path / f"{label}.jpg"
        Image.fromarray(np.full((300, 400, 3), c, np.uint8)).save(path, quality=95)
        samples.append(Sample(path, label))
    pre = Preprocess(image_size=32)
    cache = open_cache(samples, tmp_path / "cache", pre)
    dataset = CarsDataset(samples, TrainImageTransform(pre, BENCH["SEED_AUG"]), reader=cache)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, shuffle=True, num_workers=0)
    seen = []
    for images, labels in loader:
        for img, label in zip(images, labels.tolist(), strict=True):
            centre = img[:, 16, 16].int()
            assert (centre - torch.tensor(colours[label])).abs().max() < 20
            seen.append(label)
    assert sorted(seen) == list(range(6))


@pytest.mark.slow  # two predict processes, one of them with two ranks
def test_predict_scaling_runs_one_and_two_processes_on_the_same_images(photos, tmp_path):
    r = BENCH["predict_scaling"](photos, tmp_path, None, None, quick=True)
    assert FIELDS <= set(r) and r["reference_img_s"] > 0 and r["twincar_img_s"] > 0 and r["images"] == 4
    assert r["ratio"] == pytest.approx(r["twincar_img_s"] / r["reference_img_s"], rel=0.02, abs=0.006)
    assert r["same_predictions"] is True  # the two processes' merged CSV names the same classes
    assert r["two_processes_wall_s"] > 0 and r["one_process_wall_s"] > 0


def test_gpu_predict_measures_the_model_alone_files_and_gpu_decode(photos, tmp_path):
    """Its CUDA measure, run on the CPU: every path gives a rate, against the model alone."""
    r = BENCH["gpu_predict"](photos, tmp_path, quick=True, device=torch.device("cpu"))
    assert FIELDS <= set(r) and r["reference_img_s"] > 0 and r["twincar_img_s"] > 0 and r["gpu_decode_img_s"] > 0
    assert (r["precision"], r["channels_last"], r["device"]) == ("bf16", True, "cpu")
    if not torch.cuda.is_available():
        assert BENCH["gpu_predict"](photos, tmp_path, quick=True)["skipped"] == "no CUDA device"
