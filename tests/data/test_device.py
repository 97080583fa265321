"""The GPU input paths (data.pipeline=gpu_decode|gpu_cache), run on the CPU: the same batches as
the worker path, EXIF orientation, unreadable files, car boxes, clear errors, a short training run with each."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tests.conftest import SMALL_SPEC
from tests.data.test_datamodule import make_dm
from tests.layouts import build
from twincar.data.datamodule import CarsDataModule
from twincar.data.datasets import CarsDataset, DeviceRefDataset
from twincar.data.device import DeviceImages, ImageRefs, check_cuda, check_fits, orient, read_encoded
from twincar.data.formats import Sample
from twincar.data.images import load_rgb
from twincar.data.pipeline import refuse_removed_overrides
from twincar.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from twincar.data.transforms import EvalImageTransform, to_tensor
from twincar.errors import TwinCarError

DECODE = dict(pipeline="gpu_decode")  # the GPU-decode code path, on the batch's device (the CPU here)


@pytest.fixture(autouse=True)
def device_paths_on_the_cpu(monkeypatch):
    """Run the on-device pipelines on whatever device the batch is on (the CPU here) instead of asking for CUDA."""
    monkeypatch.setattr("twincar.data.device.check_cuda", lambda option: None)


def on_device(tmp_path, kind: str) -> dict:
    """The datamodule options of a GPU input path (on the CPU here)."""
    if kind == "decode":
        return DECODE
    return dict(pipeline="gpu_cache", cache_dir=str(tmp_path / "cache"))


def batches(dm, loader, training: bool) -> list[tuple]:
    """Every batch of ``loader`` after the datamodule's per-batch step, as training or evaluation sees it."""
    dm.trainer = type("T", (), {"training": training, "is_global_zero": True})()
    return [dm.on_after_batch_transfer(b, 0) for b in loader]


@pytest.mark.parametrize("kind", ["decode", "cache"])
def test_batches_have_the_shape_dtype_range_and_labels_of_the_default_path(small_root, tmp_path, kind):
    plain, fast = make_dm(small_root, tmp_path), make_dm(small_root, tmp_path, **on_device(tmp_path, kind))
    raw = next(iter(fast.train_dataloader()))
    assert isinstance(raw[0], ImageRefs) and len(raw[0]) == len(raw[1]) == 8  # the loader decodes nothing
    (x, y, t), = batches(fast, [raw], True)
    (x0, y0, _), = batches(plain, [next(iter(plain.train_dataloader()))], True)
    assert x.shape == x0.shape == (8, 3, 64, 64) and x.dtype == x0.dtype == torch.float32
    assert torch.equal(t, y) and y.dtype == y0.dtype == torch.int64
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)  # 0..255 normalised: within these bounds
    lo, hi = float((-mean / std).min()), float(((1 - mean) / std).max())
    for batch in (x, x0):
        assert lo - 1e-4 <= float(batch.min()) and float(batch.max()) <= hi + 1e-4
    # labels stay with their images: the val batches come in sample order, labels as the samples say
    seen = batches(fast, fast.val_dataloader(), False)
    assert torch.equal(torch.cat([b[1] for b in seen]), torch.tensor([s.label for s in fast.val_set.samples]))
    assert all(b[0].shape[1:] == (3, 64, 64) and b[0].dtype == torch.float32 for b in seen)


def test_eval_batches_decoded_per_batch_equal_the_worker_path(small_root, tmp_path):
    # on the CPU decode_jpeg is the workers' libjpeg-turbo: the same pixels exactly (nvJPEG's IDCT may differ
    # by a grey level: not measured, no GPU lent)
    plain, fast = make_dm(small_root, tmp_path), make_dm(small_root, tmp_path, **DECODE)
    for a, b in zip(batches(plain, plain.test_dataloader(), False), batches(fast, fast.test_dataloader(), False),
                    strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_on_device_cache_gives_the_eval_pixels_of_the_memory_mapped_cache(small_root, tmp_path):
    mapped = make_dm(small_root, tmp_path, pipeline="cache", cache_dir=str(tmp_path / "cache"))
    fast = make_dm(small_root, tmp_path, **on_device(tmp_path, "cache"))
    assert fast.train_dataloader().num_workers == 0
    for a, b in zip(batches(mapped, mapped.val_dataloader(), False), batches(fast, fast.val_dataloader(), False),
                    strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert fast.device_images.cache.flat.numel() == fast.image_cache.nbytes  # one flat tensor, loaded once


@pytest.mark.parametrize("layout", ["devkit", "parquet"])
def test_every_image_mode_and_parquet_rows_give_the_worker_pixels(tmp_path, layout):
    # grayscale, CMYK, palette, RGBA and EXIF-rotated files (tests/layouts.py), through a worker process
    root = build(layout, tmp_path / layout)
    plain, fast = make_dm(root, tmp_path, image_size=32), make_dm(root, tmp_path, image_size=32, **DECODE)
    samples = plain.train_set.samples + plain.val_set.samples
    expected = CarsDataset(samples, EvalImageTransform(plain.preprocess), None, plain.val_set.reader)
    refs = DeviceRefDataset(samples, fast.val_set.transform, None, fast.val_set.reader)
    loader = DataLoader(refs, batch_size=8, num_workers=1, collate_fn=fast.val_dataloader().collate_fn, timeout=60)
    x = torch.cat([b[0] for b in batches(fast, loader, False)])
    assert torch.equal(x, fast.eval_batch_transform(torch.stack([expected[i][0] for i in range(len(samples))])))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_load_rgb_does(tmp_path, orientation):
    path = tmp_path / f"o{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    pixels = np.random.default_rng(orientation).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95, exif=exif.tobytes())
    ref = read_encoded(Sample(path, 0))
    assert ref.source.dim() == 1 and ref.orientation == orientation  # bytes + header orientation from the worker
    (img,) = DeviceImages(None, None).decode([ref], torch.device("cpu"))
    assert torch.equal(img, to_tensor(load_rgb(path))) and (ref.width, ref.height) == (img.shape[2], img.shape[1])


def test_png_and_cmyk_jpeg_are_decoded_in_the_worker(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    for name in ("a.png", "cmyk.jpg"):
        ref = read_encoded(Sample(tmp_path / name, 0))
        assert ref.source.shape == (3, 30, 50) and torch.equal(ref.source, to_tensor(load_rgb(tmp_path / name)))
    assert torch.equal(orient(ref.source, 1), ref.source)


def test_a_truncated_jpeg_is_left_out_and_named_or_stops_the_run(small_root, tmp_path):
    root = shutil.copytree(small_root, tmp_path / "copy")
    dm = make_dm(root, tmp_path, on_corrupt="skip", skipped_file=str(tmp_path / "skipped.txt"), **DECODE)
    bad = dm.val_set.samples[1].path
    bad.write_bytes(bad.read_bytes()[:-300])  # after the header check: the worker reads it, the batch decode fails
    loader = DataLoader(dm.val_set, batch_size=4, collate_fn=dm.val_dataloader().collate_fn)
    out = batches(dm, loader, False)
    labels = torch.cat([b[1] for b in out])
    expected = [s.label for s in dm.val_set.samples if s.path != bad]
    assert torch.equal(labels, torch.tensor(expected)) and sum(len(b[0]) for b in out) == len(dm.val_set) - 1
    assert str(bad) in (tmp_path / "skipped.txt").read_text() and dm.skipped[-1].startswith(f"cannot read image {bad}")
    dm.hparams.on_corrupt = "fail"
    with pytest.raises(TwinCarError, match=f"{bad}: .*run `python -m twincar.check {root}`"):
        batches(dm, loader, False)


@pytest.mark.parametrize("kind", ["decode", "cache"])
def test_car_box_crop_frames_the_same_car(small_root, tmp_path, kind):
    # decode: the same full-size decode, the same crop, exactly; cache: the box scaled to the cached copy as
    # CarsDataset scales it, so the on-device crop equals the memory-mapped one
    base = {} if kind == "decode" else dict(pipeline="cache", cache_dir=str(tmp_path / "cache"))
    plain = make_dm(small_root, tmp_path, crop_to_bbox=True, **base)
    fast = make_dm(small_root, tmp_path, crop_to_bbox=True, **on_device(tmp_path, kind))
    (x0, y0), (x, y) = (batches(d, [next(iter(d.test_dataloader()))], False)[0] for d in (plain, fast))
    assert torch.equal(x0, x) and torch.equal(y0, y)


def test_wrong_settings_say_what_to_set(small_root, tmp_path, monkeypatch):
    monkeypatch.undo()  # the real CUDA check
    with pytest.raises(TwinCarError, match="^data.pipeline=gpu_cache holds the raw image cache: set "
                                           "data.cache_format=raw$"):
        CarsDataModule(root=str(small_root), pipeline="gpu_cache", cache_format="jpeg")
    if not torch.cuda.is_available():
        with pytest.raises(TwinCarError, match="^data.pipeline=gpu_decode needs a CUDA GPU and none is available: "
                                               r"use data.pipeline=files \(or data.pipeline=cache\)$"):
            make_dm(small_root, tmp_path, **DECODE).train_dataloader()
        with pytest.raises(TwinCarError, match="^data.pipeline=gpu_cache needs a CUDA GPU"):
            check_cuda("data.pipeline=gpu_cache")
    with pytest.raises(TwinCarError,
                       match="^data.pipeline=gpu is not one of files, cache, gpu_decode, gpu_cache, stream$"):
        CarsDataModule(root=str(small_root), pipeline="gpu")
    with pytest.raises(TwinCarError, match="^data.frobnicate is not an option of the data config"):
        CarsDataModule(root=str(small_root), frobnicate=1)
    check_fits(4 * 2**30, 70 * 2**30, 80 * 2**30, "cuda:0")  # Stanford Cars at 224 on an 80 GB GPU
    with pytest.raises(TwinCarError, match=r"the image cache \(4.0 GiB\) does not fit in cuda:0 .*"
                                           "use data.pipeline=cache"):
        check_fits(4 * 2**30, 5 * 2**30, 8 * 2**30, "cuda:0")


EVERY_PIPELINE = r" \(one of files, cache, gpu_decode, gpu_cache, stream\)$"


@pytest.mark.parametrize("flag, value, pipeline", [("cache", True, "cache"), ("decode_device", "cuda", "gpu_decode"),
                                                   ("cache_on_device", True, "gpu_cache"), ("cache", False, "files")])
def test_a_removed_pipeline_flag_names_the_pipeline_to_use(small_root, flag, value, pipeline):
    # passed to the datamodule: as a run's config.yaml or +data.FLAG=VALUE gives it
    sentence = f"^data.{flag}={str(value).lower()} was removed: use data.pipeline={pipeline}" + EVERY_PIPELINE
    with pytest.raises(TwinCarError, match=sentence):
        CarsDataModule(root=str(small_root), **{flag: value})
    # on the command line, before Hydra composes (where the key no longer exists)
    for override in (f"data.{flag}={str(value).lower()}", f"+data.{flag}={str(value).lower()}"):
        with pytest.raises(TwinCarError, match=sentence):
            refuse_removed_overrides(["data.image_size=64", override])
    refuse_removed_overrides(["data.pipeline=cache", "data.cache_format=jpeg", "data.cache_dir=/c"])  # no flag


def test_a_run_config_written_before_keeps_working(small_root, tmp_path):
    # every run directory written before the flags were removed has them, all null: unset
    dm = make_dm(small_root, tmp_path, cache=None, decode_device=None, cache_on_device=None)
    assert dm.pipeline == "files" and "cache" not in dm.hparams


def test_decode_failure_of_one_image_names_it_and_keeps_the_others(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(paths[-1])
    refs = [read_encoded(Sample(p, i)) for i, p in enumerate(paths)]
    refs[1] = refs[1]._replace(source=refs[1].source[:100])  # a truncated copy of its bytes
    tf = EvalImageTransform(Preprocess(image_size=16))
    x, y, failed = DeviceImages(tf, tf)(ImageRefs(refs), torch.tensor([0, 1, 2]), train=False)
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 2]
    assert len(failed) == 1 and failed[0].startswith(f"cannot read image {paths[1]}: ")


@pytest.mark.slow
@pytest.mark.parametrize("option", [["data.pipeline=gpu_decode", "data.num_workers=1"], ["data.pipeline=gpu_cache"]])
def test_a_short_training_run_works_with_each_option(tmp_path, data_dir, option):
    from hydra import compose, initialize_config_module

    from twincar.train import train

    with initialize_config_module("twincar.conf", version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=smoke", "model.name=test_resnet", "data.image_size=32", "~callbacks.rich_progress_bar",
            "export=false", f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}",
            f"paths.output_dir={tmp_path}/run", *option,
            *[f"data.synthetic.{k}={v}" for k, v in SMALL_SPEC.items()],
        ])
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # trained one epoch, then validated and tested through it: accuracies are counts over the images read
    val_images = len(json.loads((tmp_path / "run" / "split.json").read_text())["val"])  # <= 2 batches of 8
    assert metrics["epochs"] == 1 and math.isfinite(metrics["test/loss"])
    assert metrics["val/acc"] * val_images == pytest.approx(round(metrics["val/acc"] * val_images), abs=1e-4)
    assert metrics["test/acc"] * 16 == pytest.approx(round(metrics["test/acc"] * 16), abs=1e-4)  # 2 batches of 8
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
