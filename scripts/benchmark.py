#!/usr/bin/env python
"""Side-by-side performance benchmark: the original TwinCars pipelines vs TwinCar's, same images, one run.

    python scripts/benchmark.py [--images DIR] [--json out.json] [--quick]
                                [--model model.pth --classes classes.txt] [--only MEASURE,...]

Measures (each prints img/s of the reference and of TwinCar, and their ratio):

* ``train_pipeline``: one CPU core (one DataLoader worker): the original per-image PIL pipeline (decode,
  RandomResizedCrop, flip, RandomRotation, ColorJitter, GaussianBlur, ToTensor, Normalize; torchvision v1)
  vs TwinCar's worker side from the same JPEGs. TwinCar's per-batch device work (jitter, blur, normalise,
  Mixup/CutMix) is timed apart, as ms per batch on this machine's device.
* ``train_pipeline_cached``: the same with ``data.pipeline=cache`` (pre-resized raw copy, memory-mapped).
* ``train_pipeline_stream``: the same with ``data.pipeline=stream``: the images packed once as LitData shards
  (``python -m twincar.cache pack``, JPEGs pre-resized to the cache's short side; packing time per image on one
  core reported), read back through ``litdata.StreamingDataset`` on one core. Skipped without LitData.
* ``eval_pipeline``: one core: decode, Resize((224, 224)), ToTensor, Normalize vs TwinCar's eval
  preprocessing (reduced-size decode, resize, crop, per-batch normalise); from the cache as an extra field.
* ``cpu_predict``: whole processes on 2 cores, JPEG files to a CSV (512 generated images unless ``--images``):
  the original predict loop (eager fp32 torchvision resnet50, batch 1) vs ``python -m twincar.predict`` with
  its defaults on the same weights: wall time, start-up and per-image cost, peak RSS, top-1 agreement (only
  with ``--model``: a random network predicts one class for everything) and how close a call the
  disagreements were. ``cpu_predict_onnx``: the same for ``twincar.predict`` on the fp32 ONNX export of those
  weights, which runs on the torch-free runtime (numpy, PIL, onnxruntime; torch is never imported).
  ``cpu_predict_int8``: the same for ``twincar.predict`` on an int8 ONNX export of those
  weights (``twincar.export quantize=int8``, quantised on other images: ``--int8-images DIR`` or generated).
* ``predict_scaling``: whole ``twincar.predict`` processes over the same JPEGs: one process (the plain loop) vs
  ``--devices 2 --accelerator cpu`` (Lightning ``Trainer.predict``, two gloo processes, sharded output); also one
  process through the sharded path (``--resume``). Start-up is measured on one image and reported apart. On a
  2-core machine two processes share the same cores, so the ratio is bound near 1: it measures the overhead.
* ``serve``: ``python -m twincar.serve`` (a real server on 127.0.0.1; JPEG bodies POSTed by 1, 4 and 16 concurrent
  clients, with batching on, ``--max-batch-size 16``, and off, 1): requests/s, p50/p95 latency and the largest batch,
  against predict's own img/s in-process (``Predictor.predict``, batch 16) on the same weights and images: the
  server's overhead. ``serve_onnx``: the same on the fp32 ONNX export (torch-free).
* ``shard_merge``: rank 0's end of a many-process predict job, 100,000 rows in shards of 5,000 written by 4
  processes, into one CSV: every row read into memory, then written (the reference) vs the streamed merge
  (``twincar.inference.shards.merged``: a shard is read when its first row is due) into the row-by-row writer
  (``twincar.inference.writers``); rows/s of each (in the img/s columns) and the peak Python memory of each
  (``tracemalloc``), which for the stream stays near a shard per process instead of growing with the job.
* ``gpu_predict`` (CUDA only): inference img/s per GPU of a ResNet-50 at batch 256, bf16 autocast,
  channels_last: the model alone on in-memory uint8 tensors (the ceiling), the Predictor from JPEG files
  (decoded in DataLoader workers), and from JPEG files decoded on the GPU (``data.pipeline=gpu_decode``).
* ``open_set_cost``: in one process, a ResNet-18 at 224 (``Predictor`` defaults, this machine's cores), JPEG files to
  predictions: plain predict (the reference) vs predict with the unknown score and threshold (``unknown``), with the
  3 nearest images of an 8,144-image index (Stanford Cars' training set; ``neighbours``: one forward pass for the
  logits and the embeddings) and the same by a second forward pass (``neighbours_two_pass``, the earlier way); each
  as img/s, ratio to plain and ms per image over plain; the unknown answer alone (score and threshold on one batch's
  logits), and the search alone, torch vs faiss (when installed).
* ``train_step``: CPU training img/s of the network alone: fp32 vs bf16-mixed + channels_last.
* ``gpu_train`` (CUDA only): end-to-end training img/s from JPEG files through TwinCar's datamodule and
  model (bf16-mixed, channels_last, optionally compiled) at 224 and 448, next to the model alone on
  in-memory tensors (the ceiling) and the original pipeline on the same GPU; also from the cache, with the
  JPEGs decoded on the GPU (``data.pipeline=gpu_decode``) and from the cache held in GPU memory
  (``data.pipeline=gpu_cache``).

Without ``--images`` a fixed set of JPEGs is generated (sizes like Stanford Cars: ~700x480 on average,
~110 KB, some large ones). ``--quick`` runs in seconds (tiny models and sizes: for the tests, not for numbers).
Reference and TwinCar run interleaved, round by round, so a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from a checkout: import this checkout's twincar
    sys.path.insert(0, str(REPO))

from twincar.data.cache import cache_short_side, open_cache  # noqa: E402
from twincar.data.formats import Sample  # noqa: E402
from twincar.data.images import load_rgb, load_sample  # noqa: E402
from twincar.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess  # noqa: E402
from twincar.data.transforms import (  # noqa: E402
    Augmentation,
    BatchTransform,
    EvalImageTransform,
    TrainImageTransform,
    to_tensor,
    train_decode_min_side,
)

MEASURES = ("train_pipeline", "train_pipeline_cached", "train_pipeline_stream", "eval_pipeline", "cpu_predict",
            "predict_scaling", "serve", "shard_merge", "open_set_cost", "train_step", "gpu_train", "gpu_predict")
MERGE_ROWS = 100_000  # shard_merge: rows of a many-process predict job (quick: 2,000)
INDEX_IMAGES = 8144  # open_set_cost's index: as many images as Stanford Cars' training split
PREDICT_IMAGES = 512  # cpu_predict's generated set: enough that per-image work, not start-up, sets the ratio
# The seed augmentation (conf/augmentation/seed.yaml), for both pipelines.
SEED_AUG = Augmentation(scale=(0.35, 1.0), ratio=(0.75, 1.3333), hflip=0.5, rotation=10.0,
                        color_jitter=(0.3, 0.3, 0.3, 0.02), color_jitter_prob=0.8, blur_prob=0.2, blur_sigma=(0.1, 1.5))
# Stanford Cars-like sizes (mean about 700x480), two large ones in every 16.
SIZES = [(700, 480), (640, 480), (800, 533), (500, 375), (1024, 683), (600, 400), (720, 540), (1600, 1200),
         (640, 427), (560, 420), (768, 512), (480, 360), (900, 600), (680, 453), (2048, 1536), (400, 300)]


# -- images ------------------------------------------------------------------------------------------------
def make_images(out: Path, count: int, quick: bool = False, num_classes: int = 14, seed: int = 0) -> list[Path]:
    """Write ``count`` JPEGs of synthetic cars with photo-like grain (deterministic per ``seed``), ~110 KB at
    700x480. The first ``k`` images of a seed are the same whatever ``count``.

    Cars are drawn small by the embedded dataset's renderer and enlarged (drawing large is slow); the grain
    gives the files the entropy, hence the decode cost, of photos.
    """
    from twincar.data.classes import parse_car_name
    from twincar.data.synthetic import select_classes
    from twincar.data.synthetic.render import render_car

    out.mkdir(parents=True, exist_ok=True)
    names = select_classes(num_classes)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        w, h = (160, 120) if quick else SIZES[i % len(SIZES)]
        small, _ = render_car(parse_car_name(names[i % len(names)]), rng, max(64, w // 4), max(48, h // 4), 0.5)
        pixels = np.asarray(small.convert("RGB").resize((w, h), Image.BICUBIC), dtype=np.int16)
        pixels = pixels + rng.normal(0, 6, pixels.shape).astype(np.int16)
        path = out / f"{i:05d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


# -- timing ------------------------------------------------------------------------------------------------
class one_thread:  # noqa: N801 - a context manager used like a function
    """Limit torch to one thread (a DataLoader worker's setting) inside the block."""

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def interleaved(fns: dict[str, Callable[[], int]], rounds: int) -> dict[str, float]:
    """Run each ``fn`` (returns the number of images it did) once per round, alternating; img/s of each."""
    for fn in fns.values():  # warm-up: allocations, lazy imports, page cache
        fn()
    done = dict.fromkeys(fns, 0)
    spent = dict.fromkeys(fns, 0.0)
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for name in order:
            start = time.perf_counter()
            done[name] += fns[name]()
            spent[name] += time.perf_counter() - start
    return {name: done[name] / spent[name] for name in fns}


def result(reference: float, twincar: float, **extra) -> dict:
    """The two rates as printed (0.01 img/s) and their ratio, computed from those printed figures."""
    reference, twincar = round(reference, 2), round(twincar, 2)
    return {"reference_img_s": reference, "twincar_img_s": twincar, "ratio": round(twincar / reference, 2), **extra}


# -- the original TwinCars pipelines (torchvision v1, PIL, per image) ---------------------------------------
def reference_train_transform(size: int):
    from torchvision import transforms as T

    k = 2 * int(3 * SEED_AUG.blur_sigma[1]) + 1
    return T.Compose([
        T.RandomResizedCrop(size, scale=SEED_AUG.scale, ratio=SEED_AUG.ratio),
        T.RandomHorizontalFlip(SEED_AUG.hflip),
        T.RandomRotation(SEED_AUG.rotation),
        T.RandomApply([T.ColorJitter(*SEED_AUG.color_jitter)], p=SEED_AUG.color_jitter_prob),
        T.RandomApply([T.GaussianBlur(k, SEED_AUG.blur_sigma)], p=SEED_AUG.blur_prob),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def reference_eval_transform(size: int):
    from torchvision import transforms as T

    return T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def _pil_rgb(path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


# -- 1-3: input pipelines, per core ----------------------------------------------------------------------
def device_batch_ms(size: int, batch: int, rounds: int) -> dict:
    """TwinCar's per-batch work (jitter, blur, normalise, Mixup/CutMix) on the training device, ms per batch."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    aug = Augmentation(**{**SEED_AUG.__dict__, "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mix_prob": 1.0})
    tf = BatchTransform(Preprocess(image_size=size), aug, num_classes=196).to(device)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 196, (batch,), device=device)
    tf(images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(rounds):
        tf(images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"device_batch_ms": round((time.perf_counter() - start) / rounds * 1000, 2), "device_batch_size": batch,
            "device": name}


def _tensor(image) -> torch.Tensor:
    """A decoded image (numpy (H, W, 3): the file decoder; a (3, H, W) tensor: the cache) as a (3, H, W) tensor."""
    return to_tensor(image) if isinstance(image, np.ndarray) else image


def train_pipeline(paths: Sequence[Path], size: int, rounds: int, cache=None) -> dict:
    reference = reference_train_transform(size)
    twincar = TrainImageTransform(Preprocess(image_size=size), SEED_AUG)
    samples = [Sample(p, 0) for p in paths]
    read = cache if cache is not None else partial(
        load_sample, min_side=train_decode_min_side(Preprocess(image_size=size), SEED_AUG))
    with one_thread():
        speed = interleaved({
            "reference": lambda: sum(1 for p in paths if reference(_pil_rgb(p)) is not None),
            "twincar": lambda: sum(1 for s in samples if twincar(_tensor(read(s))) is not None),
        }, rounds)
    return result(speed["reference"], speed["twincar"], image_size=size, images=len(paths))


def train_pipeline_stream(paths: Sequence[Path], work: Path, size: int, rounds: int) -> dict:
    """``train_pipeline`` from LitData shards of the same images (pre-resized to the cache's short side), and the
    packing cost per image on one core."""
    try:
        import litdata  # noqa: F401
    except ImportError:
        return {"skipped": "LitData is not installed (pip install 'twincar[stream]')"}
    from twincar.data.classes import CarName
    from twincar.data.stream import StreamItem, open_split, pack

    pre = Preprocess(image_size=size)
    short_side = cache_short_side(pre)
    start = time.perf_counter()
    pack({"train": [Sample(p, 0, name=p.name) for p in paths]}, work / "stream", ["car"],
         [CarName("car", "car", "", None)], {}, short_side=short_side, workers=1)
    pack_s = time.perf_counter() - start
    reference = reference_train_transform(size)
    item = StreamItem(TrainImageTransform(pre, SEED_AUG), None, train_decode_min_side(pre, SEED_AUG))
    stream = open_split(str(work / "stream"), "train", item, shuffle=False, seed=0)
    with one_thread():
        speed = interleaved({
            "reference": lambda: sum(1 for p in paths if reference(_pil_rgb(p)) is not None),
            "twincar": lambda: sum(1 for x, _ in stream if x is not None),
        }, rounds)
    shard_mb = sum(f.stat().st_size for f in (work / "stream" / "train").glob("*.bin")) / 2**20
    return result(speed["reference"], speed["twincar"], image_size=size, images=len(paths), short_side=short_side,
                  pack_s_per_image=round(pack_s / len(paths), 4),
                  shard_kb_per_image=round(shard_mb * 1024 / len(paths), 1))


def eval_pipeline(paths: Sequence[Path], size: int, rounds: int, cache=None, batch: int = 32) -> dict:
    reference = reference_eval_transform(size)
    pre = Preprocess(image_size=size)
    per_image, per_batch = EvalImageTransform(pre), BatchTransform(pre)
    samples = [Sample(p, 0) for p in paths]

    def twincar(read) -> int:  # per image in the worker, then the per-batch normalisation (here on the same core)
        for i in range(0, len(samples), batch):
            per_batch(torch.stack([per_image(_tensor(read(s))) for s in samples[i:i + batch]]))
        return len(samples)

    fns = {"reference": lambda: sum(1 for p in paths if reference(_pil_rgb(p)) is not None),
           "twincar": lambda: twincar(partial(load_sample, min_side=pre.decode_min_side))}
    if cache is not None:
        fns["cached"] = lambda: twincar(cache)
    with one_thread():
        speed = interleaved(fns, rounds)
        # where the time goes: the decode alone (full size and reduced), per image
        # and the floor: 1/8-scale decoding, where the inverse DCT is nearly free and Huffman decoding remains
        decode = interleaved({"full": lambda: sum(1 for p in paths if load_rgb(p) is not None),
                              "reduced": lambda: sum(1 for p in paths if load_rgb(p, min_side=pre.decode_min_side)
                                                     is not None),
                              "floor": lambda: sum(1 for p in paths if load_rgb(p, min_side=1) is not None)}, 1)
    extra = {"twincar_cached_img_s": round(speed["cached"], 2),
             "cached_ratio": round(speed["cached"] / speed["reference"], 2)} if cache is not None else {}
    return result(speed["reference"], speed["twincar"], image_size=size, images=len(paths), **extra,
                  profile={"decode_full_ms": round(1000 / decode["full"], 2),
                           "decode_reduced_ms": round(1000 / decode["reduced"], 2),
                           "decode_floor_ms": round(1000 / decode["floor"], 2),
                           "reference_total_ms": round(1000 / speed["reference"], 2),
                           "twincar_total_ms": round(1000 / speed["twincar"], 2)})


# -- 4: whole-process CPU predict --------------------------------------------------------------------------
# Runs a command and reports its peak RSS. A small process of its own: a child forked from this (large) benchmark
# process would report this process's RSS as its own peak (Linux keeps the high-water mark across fork + exec).
_LAUNCHER = """import json, resource, subprocess, sys
with open(sys.argv[1], "w") as log:
    rc = subprocess.run(sys.argv[3:], stdout=log, stderr=subprocess.STDOUT).returncode
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
open(sys.argv[2], "w").write(json.dumps({"rc": rc, "maxrss_kb": peak}))
"""


def _run_measured(cmd: list[str], log: Path, threads: int) -> dict:
    """Run ``cmd`` to completion: wall time and peak RSS (its largest process, KB from ``getrusage``)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    usage = log.with_suffix(".rusage.json")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", _LAUNCHER, str(log), str(usage), *cmd], env=env, check=True)
    wall = time.perf_counter() - start
    measured = json.loads(usage.read_text())
    if measured["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({measured['rc']}):\n{log.read_text()[-3000:]}")
    return {"wall_s": wall, "peak_rss_mb": measured["maxrss_kb"] / 1024}


def _read_predictions(path: Path) -> dict[str, str]:
    """file name -> predicted class name, from a CSV whose columns name the file and the class."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    cols = list(rows[0])
    file_col = next(c for c in ("path", "file", "image", "source", "filename") if c in cols)
    name_col = next(c for c in ("name", "class_name", "prediction", "predicted", "class", "label") if c in cols)
    return {Path(r[file_col]).name: r[name_col] for r in rows if r.get(name_col)}


def _margins(path: Path) -> dict[str, float]:
    """file name -> top-1 minus top-2 probability, from a ``twincar.predict`` CSV (how close a call it was)."""
    with open(path, newline="") as f:
        return {Path(r["image"]).name: float(r["top1_prob"]) - float(r.get("top2_prob") or 0)
                for r in csv.DictReader(f) if r.get("top1_prob")}


def _predict_weights(work: Path, model: Path | None, classes: Path | None, quick: bool) -> tuple[Path, str]:
    """The weights both predict loops read, alone in a folder with a model card that says 224 squash (the
    original preprocessing) and names the classes; a random network without ``--model``."""
    from twincar.data.preprocess import TWINCARS_PREPROCESS
    from twincar.models.card import build_model_card, write_model_card

    arch = "resnet18" if quick and model is None else "resnet50"
    weights = work / "predict_model" / "model.pth"
    weights.parent.mkdir(exist_ok=True)
    if model is not None:
        from twincar.models.checkpoint import read_state_dict

        torch.save(read_state_dict(model), weights)  # .ckpt / .safetensors / .pth -> a plain state dict
        names = Path(classes).read_text().splitlines()
    else:
        import torchvision

        from twincar.data.synthetic import select_classes

        names = select_classes(14)
        torch.save(getattr(torchvision.models, arch)(num_classes=len(names)).state_dict(), weights)
    (weights.parent / "classes.txt").write_text("\n".join(names) + "\n")
    write_model_card(weights.parent, build_model_card(names, TWINCARS_PREPROCESS, arch))
    return weights, arch


def cpu_predict(paths: Sequence[Path], work: Path, model: Path | None, classes: Path | None, quick: bool,
                predict_args: Sequence[str] = (), repeats: int = 1,
                int8_images: Sequence[Path] = ()) -> dict[str, dict]:
    """Whole processes, JPEG files to a CSV, on 2 cores: the original batch-1 fp32 loop vs ``twincar.predict``
    with its defaults (``cpu_predict``) and on an int8 ONNX export of the same weights (``cpu_predict_int8``,
    quantised on ``int8_images``, never on the measured images; skipped when none are given).

    Each command also runs on one image: its start-up (imports, model load); ``per_image_ms`` is the rest.
    """
    weights, arch = _predict_weights(work, model, classes, quick)
    folders = {}
    for name, subset in (("all", paths), ("one", paths[:1])):
        folders[name] = work / f"predict_images_{name}"
        if not folders[name].is_dir():
            folders[name].mkdir()
            for p in subset:
                shutil.copy(p, folders[name] / p.name)
    class_file = weights.parent / "classes.txt"

    def twincar_cmd(model_file: Path) -> Callable[[Path, Path], list[str]]:
        return lambda images, out: [sys.executable, "-m", "twincar.predict", "--images", str(images), "--model",
                                    str(model_file), "--output", str(out), "--device", "cpu", "--no-progress",
                                    *predict_args]

    commands: dict[str, Callable[[Path, Path], list[str]]] = {
        "reference": lambda images, out: [sys.executable, str(REPO / "scripts" / "twincars_predict.py"), str(images),
                                          str(weights), str(class_file), str(out), arch],
        "twincar": twincar_cmd(weights),
    }
    from twincar.export import export_model

    start = time.perf_counter()
    fp32 = export_model(weights, "onnx", work / "onnx")  # the torch-free runtime: Predictor.load("model.onnx")
    onnx_export_s = time.perf_counter() - start
    commands["onnx"] = twincar_cmd(fp32)
    export_s = None
    if int8_images:
        start = time.perf_counter()
        int8 = export_model(weights, "onnx", work / "int8", quantize="int8", int8_images=list(int8_images),
                            int8_count=len(int8_images))
        export_s = time.perf_counter() - start
        commands["int8"] = twincar_cmd(int8)
    threads = min(2, os.cpu_count() or 1)
    runs: dict[tuple[str, str], list[dict]] = {(name, size): [] for name in commands for size in folders}
    for r in range(repeats):  # interleaved, best of each
        for name in (list(commands) if r % 2 == 0 else list(commands)[::-1]):
            for size, images in folders.items():
                out = work / f"{name}_{size}.csv"
                runs[name, size].append(_run_measured(commands[name](images, out), work / f"{name}.log", threads))
    best = {k: min(v, key=lambda m: m["wall_s"]) for k, v in runs.items()}
    n = len(paths)
    ref = _read_predictions(work / "reference_all.csv")

    def measure(name: str) -> dict:
        ours = _read_predictions(work / f"{name}_all.csv")
        common = sorted(set(ref) & set(ours))
        differ = [k for k in common if ref[k].lower() != ours[k].lower()]
        agreement = 1 - len(differ) / len(common) if common and model else None
        margins = _margins(work / f"{name}_all.csv")
        wall, one = best[name, "all"]["wall_s"], best[name, "one"]["wall_s"]
        ref_wall, ref_one = best["reference", "all"]["wall_s"], best["reference", "one"]["wall_s"]
        return result(
            n / ref_wall, n / wall, images=n, threads=threads,
            top1_agreement=None if agreement is None else round(agreement, 4),
            agreement_note=None if model else "not measured: no --model (random weights predict one class)",
            disagreement_max_margin=round(max(margins[k] for k in differ), 4) if differ and model else None,
            distinct_predictions=len(set(ours.values())), peak_rss_mb=round(best[name, "all"]["peak_rss_mb"], 1),
            reference_peak_rss_mb=round(best["reference", "all"]["peak_rss_mb"], 1),
            reference_wall_s=round(ref_wall, 2), twincar_wall_s=round(wall, 2),
            reference_startup_s=round(ref_one, 2), twincar_startup_s=round(one, 2),
            reference_per_image_ms=round((ref_wall - ref_one) / max(1, n - 1) * 1000, 1),
            twincar_per_image_ms=round((wall - one) / max(1, n - 1) * 1000, 1),
            twincar_command=" ".join(commands[name](Path("IMAGES"), Path("OUT.csv"))[1:7]), model=arch,
        )

    out = {"cpu_predict": measure("twincar"),
           "cpu_predict_onnx": {**measure("onnx"), "export_s": round(onnx_export_s, 1),
                                "path": "torch-free runtime: numpy, PIL, onnxruntime (no torch import)"}}
    out["cpu_predict_int8"] = ({**measure("int8"), "export_s": round(export_s, 1),
                                "int8_images": len(int8_images)} if int8_images else
                               {"reference_img_s": None, "twincar_img_s": None, "ratio": None,
                                "skipped": "no int8 images"})
    return out


def predict_scaling(paths: Sequence[Path], work: Path, model: Path | None, classes: Path | None,
                    quick: bool, repeats: int = 1) -> dict:
    """``twincar.predict`` on 1 process (plain loop) vs 2 CPU processes (``--devices 2``), whole processes, on the
    same JPEGs; per-image rates leave out start-up (each command is also run on two images: one per process)."""
    weights, arch = _predict_weights(work, model, classes, quick)
    folders = {"all": work / "scaling_all", "one": work / "scaling_one"}
    if quick:  # the tests: no start-up runs (per-image rates then include start-up)
        del folders["one"]
    for name, subset in (("all", paths), ("one", paths[:2]))[:len(folders)]:
        if not folders[name].is_dir():
            folders[name].mkdir()
            for p in subset:
                shutil.copy(p, folders[name] / p.name)
    variants = {"one_process": [], "two_processes": ["--devices", "2", "--accelerator", "cpu"]}
    if not quick:
        variants["one_process_sharded"] = ["--resume", "--accelerator", "cpu"]
    threads = min(2, os.cpu_count() or 1)
    wall: dict[tuple[str, str], float] = {}
    for r in range(repeats):  # interleaved, best of each
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            for size, images in folders.items():
                out = work / f"scaling_{name}_{size}.csv"
                cmd = [sys.executable, "-m", "twincar.predict", "--images", str(images), "--model", str(weights),
                       "--output", str(out), "--no-progress", *variants[name]]
                took = _run_measured(cmd, work / f"scaling_{name}.log", threads)["wall_s"]
                wall[name, size] = min(took, wall.get((name, size), took))
    n = len(paths)

    def per_image(name: str) -> float:  # img/s after start-up (with it, when it was not measured: quick)
        if (name, "one") not in wall:
            return n / wall[name, "all"]
        return (n - 2) / max(1e-9, wall[name, "all"] - wall[name, "one"])

    same = _read_predictions(work / "scaling_one_process_all.csv") == _read_predictions(
        work / "scaling_two_processes_all.csv")
    return result(per_image("one_process"), per_image("two_processes"), images=n, model=arch, threads=threads,
                  one_process_sharded_img_s=None if quick else round(per_image("one_process_sharded"), 2),
                  **{f"{k}_startup_s": round(wall[k, "one"], 2) for k in variants if (k, "one") in wall},
                  **{f"{k}_wall_s": round(wall[k, "all"], 2) for k in variants},
                  same_predictions=same, note="2 processes share this machine's cores: the ratio is the overhead")


def _serve_requests(url: str, bodies: Sequence[bytes], clients: int) -> dict:
    """Every body POSTed once to ``url`` by ``clients`` threads at once: requests/s, p50/p95 latency (ms), largest
    batch the server reported (``X-Batch-Size``)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    todo, lock, times, batches = list(range(len(bodies))), threading.Lock(), [], []

    def client() -> None:
        with httpx.Client(timeout=120) as c:
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                start = time.perf_counter()
                r = c.post(url, content=bodies[i], headers={"Content-Type": "image/jpeg"})
                r.raise_for_status()
                with lock:
                    times.append(time.perf_counter() - start)
                    batches.append(int(r.headers.get("x-batch-size", 1)))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - start
    p50, p95 = np.percentile(np.array(times) * 1000, [50, 95])
    return {"req_s": round(len(bodies) / wall, 2), "p50_ms": round(float(p50), 1), "p95_ms": round(float(p95), 1),
            "max_batch": max(batches)}


def serve(paths: Sequence[Path], work: Path, model: Path | None, classes: Path | None, quick: bool,
          clients: Sequence[int] = (1, 4, 16)) -> dict[str, dict]:
    """``python -m twincar.serve`` (a real server on 127.0.0.1, JPEG bodies POSTed by 1, 4 and 16 concurrent
    clients; batching on: ``--max-batch-size 16``, and off: 1) vs predict's own throughput in-process
    (``Predictor.predict`` over the same files, batch 16, after a warm-up) on the same weights: the server's
    overhead over predict. ``serve`` on the ``.pth`` (PyTorch), ``serve_onnx`` on its fp32 ONNX export."""
    import signal
    import socket

    import httpx

    from twincar.export import export_model
    from twincar.inference.predictor import Predictor

    weights, arch = _predict_weights(work, model, classes, quick)
    models = {"serve": weights}
    if not quick:
        models["serve_onnx"] = export_model(weights, "onnx", work / "serve_onnx")
    bodies = [p.read_bytes() for p in paths]
    clients = (1, 4) if quick else clients
    out = {}
    for name, path in models.items():
        predictor = Predictor.load(path, device="cpu")
        predictor.predict(list(paths[:4]), batch_size=16)  # warm-up
        start = time.perf_counter()
        predictor.predict(list(paths), batch_size=16)
        reference = len(paths) / (time.perf_counter() - start)
        del predictor
        runs = {}
        for batch in (16, 1):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            env = {**os.environ, "HF_HUB_OFFLINE": "1",
                   "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
            log = (work / f"{name}_{batch}.log").open("w")
            proc = subprocess.Popen([sys.executable, "-m", "twincar.serve", "--model", str(path), "--port", str(port),
                                     "--max-batch-size", str(batch), "--log-level", "warning"], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                deadline = time.monotonic() + 300
                while True:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"the server did not start: {(work / f'{name}_{batch}.log').read_text()}")
                    with contextlib.suppress(httpx.TransportError):
                        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                            break
                    time.sleep(0.3)
                url = f"http://127.0.0.1:{port}/predict"
                _serve_requests(url, bodies[:4], 1)  # warm-up
                for c in clients:
                    runs[f"batch{batch}_clients{c}"] = _serve_requests(url, bodies, c)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                log.close()
        best = runs[f"batch16_clients{max(clients)}"]["req_s"]
        out[name] = result(reference, best, images=len(paths), model=arch, engine="onnx" if name.endswith("onnx")
                           else "torch", note=f"reference: predict in-process img/s; twincar: the server's req/s at "
                           f"{max(clients)} clients, batching on", **runs)
    return out


def shard_merge(work: Path, quick: bool, rounds: int) -> dict:
    """The merge of a many-process predict job's shards into its CSV: all rows in memory (the reference) vs the
    stream; rows/s and peak traced memory of each (see the module docstring)."""
    import tracemalloc

    from twincar.inference.results import Prediction
    from twincar.inference.shards import merged, read_shard, shard_keys, shard_name, to_record, write_shard
    from twincar.inference.writers import write_predictions

    rows, processes, per_shard, topk = (2_000, 4, 100, 5) if quick else (MERGE_ROWS, 4, 5_000, 5)
    names = [f"Make{c % 49} Model{c} Sedan {1991 + c % 22}" for c in range(196)]
    keys = [(f"/photos/{i // 1000:04d}/car{i:07d}.jpg", 100_000 + i, 1_700_000_000_000_000_000 + i)
            for i in range(rows)]
    folder = work / "merge" / "predictions.csv.shards"
    if not folder.is_dir():
        for rank in range(processes):  # Lightning's sampler: rank r predicts images r, r + P, ...
            mine = list(range(rank, rows, processes))
            for n in range(0, len(mine), per_shard):
                records = []
                for i in mine[n:n + per_shard]:
                    top = [(names[(i + j) % 196], round(0.9 / (j + 1), 6)) for j in range(topk)]
                    records.append(to_record(Prediction(source=keys[i][0], name=top[0][0], label=i % 196,
                                                        confidence=top[0][1], make=f"Make{i % 49}",
                                                        model=f"Model{i % 196}", year=1991 + i % 22, topk=top,
                                                        num_classes=196), keys[i]))
                write_shard(folder / shard_name("bench", rank, n // per_shard), records)

    def all_in_memory() -> int:  # the merge before the stream: every shard's rows by key, then the file
        done = {key: p for path in shard_keys(folder) for key, p in read_shard(path)}
        return write_predictions(work / "merge" / "reference.csv", [done[k] for k in keys], "csv", topk=topk).images

    def streamed() -> int:
        return write_predictions(work / "merge" / "twincar.csv", merged(folder, keys), "csv", topk=topk).images

    fns = {"reference": all_in_memory, "twincar": streamed}
    rates = interleaved(fns, rounds)
    peak_mb = {}
    for name, fn in fns.items():
        tracemalloc.start()
        fn()
        peak_mb[name] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        tracemalloc.stop()
    same = (work / "merge" / "reference.csv").read_bytes() == (work / "merge" / "twincar.csv").read_bytes()
    return result(rates["reference"], rates["twincar"], rows=rows, processes=processes, shard_rows=per_shard,
                  reference_peak_mb=peak_mb["reference"], twincar_peak_mb=peak_mb["twincar"], same_output=same,
                  note="rows/s in the img/s columns")


def gpu_predict(paths: Sequence[Path], work: Path, quick: bool, device: torch.device | None = None) -> dict:
    """Inference img/s per GPU, ResNet-50 at batch 256, bf16, channels_last: model alone on in-memory uint8 tensors
    (the ceiling: ``reference``) vs the Predictor from JPEG files (``twincar``, DataLoader workers decoding) and
    from JPEG files decoded on the GPU (``data.pipeline=gpu_decode``)."""
    device = device or (torch.device("cuda") if torch.cuda.is_available() else None)
    if device is None:
        return {"reference_img_s": None, "twincar_img_s": None, "ratio": None, "skipped": "no CUDA device"}
    from twincar.data.datamodule import CarsDataModule
    from twincar.data.synthetic import select_classes
    from twincar.inference.predictor import Predictor
    from twincar.models.factory import create_model

    torch.backends.cudnn.benchmark = True
    arch, size, batch, steps = ("resnet10t", 32, 4, 2) if quick else ("resnet50", 224, 256, 30)
    workers = 0 if quick else min(16, os.cpu_count() or 1)
    names = select_classes(196)
    predictor = Predictor(create_model(arch, len(names)), names, Preprocess(image_size=size), device=device,
                          precision="bf16")
    synthetic = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)  # prepared: NHWC
    model_only = _loop([None], lambda _: len(predictor.outputs(synthetic)[0]), 3, steps, device)
    repeat = max(1, batch * (steps + 3) // len(paths) + 1)
    files = [str(p) for p in paths] * repeat
    loader = (b for b in predictor.prepared_batches(files, batch_size=batch, num_workers=workers))
    from_files = _loop(loader, lambda b: len(predictor.outputs(b[1])[0]), 3, steps, device)
    root = _devkit_of(paths, work / "predict_devkit")
    dm = CarsDataModule(root=str(root), image_size=size, batch_size=batch, eval_batch_size=batch, num_workers=workers,
                        val_fraction=0.05, split_dir=None, pipeline="gpu_decode")
    import twincar.data.device as device_paths

    check_cuda = device_paths.check_cuda
    if device.type != "cuda":  # measured on whatever device the batch is on (the CPU in the tests)
        device_paths.check_cuda = lambda option: None
    try:
        dm.prepare_data()
        dm.setup("fit")
        every = dm.train_set.samples + dm.val_set.samples  # read as eval images (no augmentation) by the val set
        dm.val_set.samples = every * max(1, batch * (steps + 3) // len(every) + 1)
        dm.eval_batch_transform.to(device)

        def decoded_on_device(b) -> int:
            x, _ = dm.on_after_batch_transfer((b[0], b[1].to(device)), 0)
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                return len(predictor.model(x.contiguous(memory_format=torch.channels_last)))

        gpu_decode = _loop(dm.val_dataloader(), decoded_on_device, 3, steps, device)
    finally:
        device_paths.check_cuda = check_cuda
    return result(model_only, from_files, model=arch, image_size=size, batch_size=batch, workers=workers,
                  precision="bf16", channels_last=True, gpu_decode_img_s=round(gpu_decode, 2),
                  gpu_decode_ratio=round(gpu_decode / model_only, 3),
                  note="reference = the model alone on in-memory tensors (the ceiling)",
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")


# -- 5: CPU training step ----------------------------------------------------------------------------------
# -- 5: the unknown score and the neighbours against plain predict ------------------------------------------------
def open_set_cost(paths: Sequence[Path], quick: bool, rounds: int, batch: int = 32) -> dict:
    """img/s of plain predict and of predict with the unknown answer and with neighbours (one or two forward passes),
    interleaved in one process; the neighbour search alone, torch vs faiss."""
    import timm

    from twincar.data.synthetic import select_classes
    from twincar.evaluation.neighbours import NeighbourIndex, faiss_installed
    from twincar.inference.predictor import Predictor

    size, arch = (32, "resnet10t") if quick else (224, "resnet18")
    names = select_classes(14)
    torch.manual_seed(0)
    plain = Predictor(timm.create_model(arch, num_classes=len(names)), names, Preprocess(image_size=size),
                      device="cpu", unknown="off")
    unknown = plain.with_calibration({"temperature": 1.5, "threshold": 0.0})
    dim = plain.model.num_features
    count = 256 if quick else INDEX_IMAGES
    keys = torch.nn.functional.normalize(torch.randn(count, dim, generator=torch.Generator().manual_seed(0)), dim=1)
    index = NeighbourIndex(keys, torch.arange(count) % len(names), [f"{i:05d}.jpg" for i in range(count)], names,
                           "torch")
    images = list(paths)

    def predict(p: Predictor, **kw) -> int:
        return sum(r.ok for r in p.iter_predict(images, batch_size=batch, **kw))

    def two_pass() -> int:  # the predictions, then the embeddings of a second pass
        done = predict(unknown)
        index.search(unknown.embed(images, batch_size=batch), 3)
        return done

    speed = interleaved({"plain": lambda: predict(plain), "unknown": lambda: predict(unknown),
                         "neighbours": lambda: predict(unknown, neighbours=partial(index.search, k=3)),
                         "neighbours_two_pass": two_pass}, rounds)
    # the unknown answer alone, on one batch's logits: the score and the threshold (in noise end to end)
    raw, calibrated = unknown.outputs(np.stack([unknown.prepare(p) for p in images[:batch]]))
    sources = [str(p) for p in images[:batch]]
    answer = interleaved({
        "plain": lambda: len(plain.results(calibrated, sources)),
        "unknown": lambda: len(unknown.results(calibrated, sources, scores=unknown.unknown_scores(raw))),
    }, 10 * rounds)
    queries = torch.nn.functional.normalize(torch.randn(batch, dim, generator=torch.Generator().manual_seed(1)), dim=1)
    backends = ["torch", "faiss"] if faiss_installed() else ["torch"]
    searchers = {b: NeighbourIndex(keys, index.labels, index.paths, names, b) for b in backends}
    search = interleaved({b: lambda i=i: len(i.top_k(queries, 3)[0]) for b, i in searchers.items()}, 3 * rounds)
    extra = {}
    for name in ("unknown", "neighbours", "neighbours_two_pass"):
        extra[f"{name}_img_s"] = round(speed[name], 2)
        extra[f"{name}_ratio"] = round(speed[name] / speed["plain"], 3)
        extra[f"{name}_extra_ms_per_image"] = round(1000 / speed[name] - 1000 / speed["plain"], 2)
    return result(speed["plain"], speed["neighbours"], arch=arch, image_size=size, images=len(images),
                  index_images=count, embedding_dim=dim, **extra,
                  **{f"search_{b}_ms_per_query": round(1000 / v, 4) for b, v in search.items()},
                  unknown_answer_ms_per_image=round(1000 / answer["unknown"] - 1000 / answer["plain"], 4),
                  faiss=faiss_installed())


def cpu_bf16_native() -> bool:
    """True when this CPU has bf16 instructions (AVX512-BF16 or AMX): bf16 autocast then pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _train_steps(model, batch, steps: int, bf16: bool, channels_last: bool, device: torch.device) -> float:
    x, y = batch
    model = model.to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * len(x) / (time.perf_counter() - start)


def train_step(quick: bool) -> dict:
    import timm

    arch, size, batch, steps = ("resnet10t", 32, 4, 1) if quick else ("resnet50", 224, 16, 3)
    torch.manual_seed(0)
    data = (torch.randn(batch, 3, size, size), torch.randint(0, 196, (batch,)))
    cpu = torch.device("cpu")
    speed = {}
    configs = (("fp32", False, False), ("bf16_channels_last", True, True), ("fp32_channels_last", False, True))
    with one_thread() if quick else contextlib.nullcontext():  # quick: no thread spin-waits on a busy machine
        threads = torch.get_num_threads()
        for name, bf16, cl in configs:
            speed[name] = _train_steps(timm.create_model(arch, num_classes=196), data, steps, bf16, cl, cpu)
    return result(speed["fp32"], speed["bf16_channels_last"], model=arch, image_size=size, batch_size=batch,
                  threads=threads, fp32_channels_last_img_s=round(speed["fp32_channels_last"], 2),
                  cpu_bf16_native=cpu_bf16_native())


# -- 6: GPU end-to-end training --------------------------------------------------------------------------
class GpuUtilisation(threading.Thread):
    """Samples ``nvidia-smi``'s GPU utilisation every half second while running; ``mean`` in percent."""

    def __init__(self, index: int = 0):
        super().__init__(daemon=True)
        self.index, self.samples, self.stop = index, [], threading.Event()

    def run(self):
        while not self.stop.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "-i", str(self.index), "--query-gpu=utilization.gpu",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
                self.samples.append(float(out.stdout.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def _devkit_of(paths: Sequence[Path], root: Path, num_classes: int = 196) -> Path:
    """A devkit-layout dataset over ``paths`` (links), labels cycling over ``num_classes`` real names."""
    from twincar.data.formats import write_annotations, write_meta

    names = [n for n in (REPO / "twincar" / "data" / "stanford_cars_classes.txt").read_text().splitlines() if n]
    names = names[:min(num_classes, len(paths))]  # every class has an image (the readers check it)
    if (root / "devkit" / "cars_test_annos.mat").is_file():
        return root
    for d in ("devkit", "cars_train", "cars_test"):
        (root / d).mkdir(parents=True, exist_ok=True)
    samples = []
    for i, p in enumerate(paths):
        link = root / "cars_train" / p.name
        if not link.exists():
            link.symlink_to(p.resolve())
        w, h = _size(p)
        samples.append(Sample(Path(p.name), i % len(names), (1, 1, w, h)))
    write_meta(root / "devkit" / "cars_meta.mat", names)
    write_annotations(root / "devkit" / "cars_train_annos.mat", samples, with_class=True)
    write_annotations(root / "devkit" / "cars_test_annos.mat", samples[:1], with_class=False)
    return root


def _loop(loader, step: Callable, warmup: int, steps: int, device: torch.device) -> float:
    """Images per second over ``steps`` batches of ``loader`` (after ``warmup``), cycling as needed."""
    def batches():
        while True:
            yield from loader

    it = batches()
    for _ in range(warmup):
        step(next(it))
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    n, start = 0, time.perf_counter()
    for _ in range(steps):
        n += step(next(it))
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    return n / (time.perf_counter() - start)


def gpu_train_at(paths: Sequence[Path], work: Path, size: int, batch: int, steps: int, workers: int,
                 device: torch.device, compile_model: bool = False, arch: str = "resnet50") -> dict:
    """End-to-end training img/s at ``size``: TwinCar (files, cached, GPU decode, cache in GPU memory), model
    alone, original pipeline."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, Dataset

    from twincar.data.datamodule import CarsDataModule
    from twincar.models.factory import create_model

    root = _devkit_of(paths, work / "devkit_dataset")
    repeat = max(1, (batch * (steps + 5)) // len(paths) + 1)  # enough samples for every timed step

    def twincar_dm(pipeline: str) -> CarsDataModule:
        dm = CarsDataModule(root=str(root), image_size=size, batch_size=batch, num_workers=workers,
                            val_fraction=0.05, split_dir=None, augmentation=SEED_AUG.__dict__, pipeline=pipeline,
                            cache_dir=str(work / "cache"))
        dm.prepare_data()
        dm.setup("fit")
        dm.train_set.samples = dm.train_set.samples * repeat
        return dm

    def make_model(channels_last: bool):
        model = create_model(arch, 196).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        return model, (torch.compile(model) if compile_model else model), opt

    model, net, opt = make_model(True)

    def train(x: torch.Tensor, targets: torch.Tensor, bf16: bool = True, channels_last: bool = True) -> int:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(net(x), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return len(x)

    def twincar_step(dm):
        def step(b):
            images, labels = (t.to(device, non_blocking=True) for t in b)
            x, targets = dm.train_batch_transform(images, labels)
            return train(x, targets)
        return step

    def gpu_input_step(dm):  # the loader yields ImageRefs: the datamodule's per-batch step decodes or slices them
        dm.trainer = SimpleNamespace(training=True)

        def step(b):
            x, _, targets = dm.on_after_batch_transfer((b[0], b[1].to(device, non_blocking=True)), 0)
            return train(x, targets)
        return step

    util = GpuUtilisation(device.index or 0) if device.type == "cuda" else None
    dm = twincar_dm("files")
    dm.train_batch_transform.to(device)
    if util is not None:
        util.start()
    files = _loop(dm.train_dataloader(), twincar_step(dm), 3, steps, device)
    if util is not None:
        util.stop.set()
    cached_dm = twincar_dm("cache")
    cached_dm.train_batch_transform.to(device)
    cached = _loop(cached_dm.train_dataloader(), twincar_step(cached_dm), 3, steps, device)
    gpu_input = {}  # the GPU input paths: JPEGs decoded on the device, the cache held in device memory
    import twincar.data.device as device_paths

    check_cuda = device_paths.check_cuda
    if device.type != "cuda":  # measured on whatever device the batch is on (the CPU in the tests)
        device_paths.check_cuda = lambda option: None
    try:
        for name, pipeline in (("gpu_decode", "gpu_decode"), ("device_cache", "gpu_cache")):
            gpu_dm = twincar_dm(pipeline)
            gpu_dm.train_batch_transform.to(device)
            gpu_input[name] = _loop(gpu_dm.train_dataloader(), gpu_input_step(gpu_dm), 3, steps, device)
            del gpu_dm  # lets the device copy of the cache go before the next measure
    finally:
        device_paths.check_cuda = check_cuda

    synthetic = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)  # training: NCHW
    labels = torch.randint(0, 196, (batch,), device=device)
    model_only = _loop([None], lambda _: train(dm.train_batch_transform(synthetic, labels)[0], labels), 3, steps,
                       device)

    # the original project: per-image PIL pipeline in the same number of workers, fp32 NCHW eager model
    ref_tf = reference_train_transform(size)

    class Reference(Dataset):
        def __len__(self):
            return len(paths) * repeat

        def __getitem__(self, i):
            return ref_tf(_pil_rgb(paths[i % len(paths)])), i % 196

    model, net, opt = make_model(False)
    ref_loader = DataLoader(Reference(), batch_size=batch, shuffle=True, num_workers=workers,
                            pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    reference = _loop(ref_loader, lambda b: train(b[0].to(device), b[1].to(device), bf16=False,
                                                  channels_last=False), 3, steps, device)
    return result(reference, files, image_size=size, batch_size=batch, workers=workers,
                  model_only_img_s=round(model_only, 2), loader_efficiency=round(files / model_only, 3),
                  cached_img_s=round(cached, 2), cached_loader_efficiency=round(cached / model_only, 3),
                  **{f: v for name, speed in gpu_input.items() for f, v in (
                      (f"{name}_img_s", round(speed, 2)), (f"{name}_loader_efficiency", round(speed / model_only, 3)))},
                  gpu_utilisation_pct=util.mean if util else None, compiled=compile_model,
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")


def gpu_train(paths, work, quick: bool, compile_model: bool, device: torch.device | None = None) -> dict:
    device = device or (torch.device("cuda") if torch.cuda.is_available() else None)
    if device is None:
        return {"reference_img_s": None, "twincar_img_s": None, "ratio": None, "skipped": "no CUDA device"}
    torch.backends.cudnn.benchmark = True
    workers = min(16, os.cpu_count() or 1)
    if quick:
        return gpu_train_at(paths, work, 32, 4, 2, 0, device, False, arch="resnet10t")
    at224 = gpu_train_at(paths, work, 224, 256, 40, workers, device, compile_model)
    at448 = gpu_train_at(paths, work, 448, 64, 40, workers, device, compile_model)
    return {**at224, "at_448": at448}


# -- driver ------------------------------------------------------------------------------------------------
def jpegs(folder: str | Path) -> list[Path]:
    """The .jpg/.jpeg files directly in ``folder``, sorted."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu_bf16_native": cpu_bf16_native(), "python": platform.python_version()}


def run(args: argparse.Namespace) -> dict:
    only = [m.strip() for m in args.only.split(",")] if args.only else list(MEASURES)
    unknown = set(only) - set(MEASURES)
    if unknown:
        raise SystemExit(f"unknown measure(s): {', '.join(sorted(unknown))}; choose from {', '.join(MEASURES)}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="twincar-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.images:
        paths = jpegs(args.images)
        if not paths:
            raise SystemExit(f"no .jpg files in {args.images}")
        predict_paths = paths[:args.predict_images] if args.predict_images else paths
    else:  # cpu_predict wants more images (start-up is a fixed cost): the pipelines take the first 64
        count = 6 if args.quick else 64
        if {"cpu_predict", "predict_scaling", "serve"} & set(only) and not args.quick:
            count = max(count, args.predict_images or PREDICT_IMAGES)
        generated = make_images(work / "images", count, quick=args.quick)
        paths, predict_paths = generated[:6 if args.quick else 64], generated
    size = 32 if args.quick else 224
    rounds = 1 if args.quick else args.rounds
    report = {"machine": machine(), "quick": args.quick, "images": len(paths),
              "mean_file_kb": round(sum(p.stat().st_size for p in paths) / len(paths) / 1024, 1),
              "mean_size_px": np.mean([_size(p) for p in paths], axis=0).round().astype(int).tolist(),
              "measures": {}}
    cache = None
    if {"train_pipeline_cached", "eval_pipeline"} & set(only):
        start = time.perf_counter()
        cache = open_cache([Sample(p, 0) for p in paths], work / "cache", Preprocess(image_size=size), workers=1)
        cache_build_s = time.perf_counter() - start
    out = report["measures"]
    for name in only:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        if name == "train_pipeline":
            out[name] = {**train_pipeline(paths, size, rounds), **device_batch_ms(size, 8 if args.quick else 64, 3)}
        elif name == "train_pipeline_cached":
            out[name] = train_pipeline(paths, size, rounds, cache=cache)
            out[name].update(cache_short_side=cache_short_side(Preprocess(image_size=size)),
                             cache_build_s_per_image=round(cache_build_s / len(paths), 4),
                             cache_mb_per_image=round((cache.directory / "images.bin").stat().st_size / 2**20
                                                      / len(paths), 3))
        elif name == "train_pipeline_stream":
            out[name] = train_pipeline_stream(paths, work, size, rounds)
        elif name == "eval_pipeline":
            out[name] = eval_pipeline(paths, size, rounds, cache=cache)
        elif name == "cpu_predict":
            if args.no_int8:
                int8_images = []
            elif args.int8_images:
                int8_images = jpegs(args.int8_images)
            else:  # another seed: never the measured images
                int8_images = make_images(work / "int8_images", 4 if args.quick else 256, quick=args.quick, seed=1)
            out.update(cpu_predict(predict_paths, work, args.model, args.classes, args.quick,
                                   args.predict_args.split(), repeats=1 if args.quick else args.predict_repeats,
                                   int8_images=int8_images))
        elif name == "predict_scaling":
            out[name] = predict_scaling(predict_paths, work, args.model, args.classes, args.quick,
                                        repeats=1 if args.quick else args.predict_repeats)
        elif name == "serve":
            out.update(serve(predict_paths, work, args.model, args.classes, args.quick))
        elif name == "shard_merge":
            out[name] = shard_merge(work, args.quick, rounds)
        elif name == "gpu_predict":
            out[name] = gpu_predict(paths, work, args.quick)
        elif name == "open_set_cost":
            out[name] = open_set_cost(paths, args.quick, rounds)
        elif name == "train_step":
            out[name] = train_step(args.quick)
        elif name == "gpu_train":
            out[name] = gpu_train(paths, work, args.quick, args.compile)
        print(f"  {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return report


def table(report: dict) -> str:
    m = report["machine"]
    lines = [f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, GPU: {m['cuda'] or 'none'}; "
             f"{report['images']} JPEGs, mean {report['mean_size_px'][0]}x{report['mean_size_px'][1]} px, "
             f"{report['mean_file_kb']} KB",
             f"{'measure':<24}{'reference img/s':>16}{'twincar img/s':>15}{'ratio':>8}  notes"]
    for name, r in report["measures"].items():
        if r.get("skipped"):
            lines.append(f"{name:<24}{'-':>16}{'-':>15}{'-':>8}  skipped: {r['skipped']}")
            continue
        notes = {k: v for k, v in r.items() if k not in ("reference_img_s", "twincar_img_s", "ratio", "at_448")}
        lines.append(f"{name:<24}{r['reference_img_s']:>16.1f}{r['twincar_img_s']:>15.1f}{r['ratio']:>7.2f}x  "
                     + ", ".join(f"{k}={v}" for k, v in notes.items()))
        if "at_448" in r:
            a = r["at_448"]
            lines.append(f"{'  at 448':<24}{a['reference_img_s']:>16.1f}{a['twincar_img_s']:>15.1f}"
                         f"{a['ratio']:>7.2f}x  model_only_img_s={a['model_only_img_s']}, "
                         f"loader_efficiency={a['loader_efficiency']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", help="a folder of .jpg files (default: a generated Stanford Cars-like set)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="seconds, tiny sizes: checks the benchmark runs")
    parser.add_argument("--model", type=Path, help="trained weights for cpu_predict's top-1 agreement (.pth/.ckpt)")
    parser.add_argument("--classes", type=Path, help="classes.txt of --model")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(MEASURES)}")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per pipeline measure")
    parser.add_argument("--compile", action="store_true", help="gpu_train: torch.compile the network")
    parser.add_argument("--predict-args", default="", help="extra flags for python -m twincar.predict")
    parser.add_argument("--predict-images", type=int,
                        help=f"cpu_predict: N images (default: all of --images, or {PREDICT_IMAGES} generated)")
    parser.add_argument("--int8-images", help="cpu_predict_int8: quantise on the .jpg files of this folder "
                                              "(default: 256 generated images, none of them measured)")
    parser.add_argument("--no-int8", action="store_true", help="cpu_predict: skip the int8 ONNX export")
    parser.add_argument("--predict-repeats", type=int, default=1,
                        help="cpu_predict, predict_scaling: runs of each process, best kept")
    parser.add_argument("--workdir", help="keep generated images, cache and CSVs here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.model and not args.classes:
        parser.error("--model needs --classes")
    report = run(args)
    print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"results written to {args.json}")
    return report


if __name__ == "__main__":
    main()
