"""Predict the make, model and year of car photos: ``python -m twincar.predict --images PATH... --model PATH``.

Also installed as ``twincar-predict``. Writes one row per image (the original TwinCars columns ``image,
make, model, year, confidence``, then ``class, label, top{i}_class, top{i}_prob``, ``known, unknown_score`` when the
model carries an unknown threshold (``--unknown``), and ``error``) to a CSV, JSON or Parquet file. ``predict_files``
is the pure function; ``main`` is the thin argparse entry point.

With ``--devices N [--num-nodes M]`` (or under ``torchrun`` / ``srun``) the images are shared among the processes by
Lightning's ``Trainer.predict`` (:mod:`twincar.inference.parallel`); each process writes its predictions in shards
and rank 0
merges them in input order (:mod:`twincar.inference.shards`). ``--resume`` finishes a killed job: only the images
without a
row in its shards are predicted.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from twincar.errors import TwinCarError
from twincar.files import check_writable
from twincar.inference.writers import FORMATS, job_lock, shard_dir, write_predictions

log = logging.getLogger(__name__)

DEFAULT_OUTPUT = "reports/predictions_custom_images.csv"  # the original project's output file
PROGRESS_MIN_IMAGES = 16  # show a progress bar from this many images on
DEFAULT_SHARD_SIZE = 10_000  # images per shard and process: at 2,500 img/s per GPU a kill loses 4 s of work


@dataclass
class PredictSummary:
    """What a predict run did."""

    output: Path
    images: int
    errors: int
    seconds: float
    unknown: int = 0  # images that are not one of the model's classes (below its unknown threshold)
    resumed: int = 0  # images whose rows came from the shards of the run that --resume finished

    @property
    def images_per_second(self) -> float:
        """Images this run went through (unreadable ones included; not those read back from shards) per second."""
        return (self.images - self.resumed) / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        unknown = f", {self.unknown} not one of the known classes" if self.unknown else ""
        resumed = f", {self.resumed} read back from the shards of the earlier run" if self.resumed else ""
        return (f"{self.images} images, {self.errors} errors{unknown}{resumed}, {self.images_per_second:.1f} img/s "
                f"-> {self.output}")


def predict_files(
    images: Sequence[str | Path],
    model: str | Path,
    *,
    classes: str | Path | None = None,
    output: str | Path = DEFAULT_OUTPUT,
    fmt: str = "csv",
    topk: int = 5,
    batch_size: int = 32,
    num_workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    image_size: int | None = None,
    resize_mode: str | None = None,
    tta: str | None = None,
    unknown: str = "auto",
    unknown_score: str | None = None,
    neighbours: int = 0,
    index: str | Path | None = None,
    progress: bool = True,
    devices: int | None = None,
    num_nodes: int | None = None,
    accelerator: str = "auto",
    resume: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> PredictSummary | None:
    """Predict every image and write the rows to ``output``; unreadable images get an ``error`` row.

    The model and its class list are checked before any image is read. ``num_workers`` decoding processes
    (None: :func:`default_workers`). An ``.onnx`` model runs on onnxruntime through the same
    :class:`~twincar.inference.predictor.Predictor` (numpy, PIL and onnxruntime; torch is never imported), decoding
    in this process. ``unknown``: ``auto`` (the
    model's calibrated threshold, when it carries one), ``off`` or a threshold on its unknown score; a car below it
    is "not one of the known classes"; ``unknown_score``: another of its scores than its default (``--unknown-score``).
    ``neighbours``: add the k nearest training images of each (from ``index``,
    default ``index/`` beside the model: built by ``python -m twincar.index``; PyTorch models only).

    ``devices`` processes per node on ``num_nodes`` nodes (``accelerator`` cpu or gpu; left out under torchrun:
    its own), or ``resume``: Lightning's ``Trainer.predict`` with shards of ``shard_size`` images per process
    (:mod:`twincar.inference.shards`); ``resume`` predicts only the images the shards beside ``output`` lack. Returns
    the
    summary on global rank 0, None on the other ranks.
    """
    from twincar.data.discovery import find_images

    if fmt not in FORMATS:
        raise TwinCarError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    for flag, value, least in (("--topk", topk, 1), ("--neighbours", neighbours, 0), ("--batch-size", batch_size, 1),
                               ("--workers", num_workers, 0), ("--shard-size", shard_size, 1)):
        if value is not None and value < least:
            raise TwinCarError(f"{flag} must be at least {least}, got {value}")
    output = check_writable(output, "--output")  # before the model loads: nothing computed is lost
    from twincar.cluster import launched_processes  # no torch: the ONNX path stays torch-free

    scale_out = resume or (devices or 1) > 1 or (num_nodes or 1) > 1 or launched_processes() is not None
    if str(model).endswith(".onnx"):  # checked before the model loads
        if scale_out:
            raise TwinCarError("--devices, --num-nodes and --resume run the PyTorch weights (.pth, .safetensors or "
                               ".ckpt): an ONNX model predicts in one process")
        if neighbours:
            raise TwinCarError("--neighbours needs the PyTorch weights (.pth, .safetensors or .ckpt): an ONNX model "
                               "computes no embeddings")
    from twincar.inference.engines import default_workers
    from twincar.inference.predictor import Predictor

    processes = None
    if scale_out:
        from twincar.inference.parallel import resolve_processes

        if device != "auto":
            raise TwinCarError(f"--device {device} names the device of a one-process run: with --devices, "
                               "--num-nodes or --resume choose --accelerator cpu|gpu")
        processes = resolve_processes(devices, num_nodes, accelerator)
        device = "cpu"  # Lightning moves the network to each process's own device
    predictor = Predictor.load(
        model, classes, device=device, precision=precision, image_size=image_size, resize_mode=resize_mode, tta=tta,
        unknown=unknown, unknown_score=unknown_score,
    )
    search, neighbour_folder = None, None
    if neighbours:
        from twincar.evaluation.neighbours import INDEX_TENSORS, find_index, index_folder

        neighbour_folder = index_folder(model, index)
        search = find_index(model, index, predictor.class_names, predictor.fingerprint, required=True).searcher(
            neighbours)
        neighbours = search.keywords["k"]  # at most the index's images
    if unknown == "auto" and predictor.unknown_threshold is None:
        log.info("%s carries no unknown threshold (python -m twincar.calibrate fits one): every car is named", model)
    files = find_images(images)
    start = time.perf_counter()
    if processes is None:
        log.info("predicting %d image(s) with %s (%d classes, %s, %s)", len(files), model,
                 len(predictor.class_names), "onnxruntime" if predictor.is_onnx else predictor.device,
                 "bf16" if predictor.autocast_dtype is not None else "fp32")
        workers = default_workers(predictor.device) if num_workers is None else num_workers
        stream = predictor.iter_predict(files, batch_size=batch_size, topk=topk, neighbours=search,
                                        num_workers=min(workers, max(0, len(files) // batch_size)))
        with job_lock(shard_dir(output)):  # a sharded job writing this output would overwrite it when it merges
            return _write(output, _with_progress(stream, len(files), progress), fmt, topk, start,
                          neighbours=neighbours, open_set=predictor.unknown_threshold is not None)
    from twincar.inference.shards import job_options, job_runs, predict_sharded, remove_shards

    options = job_options(model, predictor, topk=topk, neighbours=neighbours, precision=precision,
                          accelerator=processes.accelerator,
                          index=neighbour_folder / INDEX_TENSORS if neighbour_folder else None)
    with job_lock(shard_dir(output)):  # one job at a time writes these shards and this output
        done = predict_sharded(predictor, files, output, processes, options=options, topk=topk,
                               batch_size=batch_size, neighbours=search, resume=resume, shard_size=shard_size,
                               num_workers=default_workers(processes.accelerator, processes.devices)
                               if num_workers is None else num_workers,
                               progress=progress)
        if done is None:  # another rank than 0: rank 0 writes the output
            return None
        predictions, resumed = done
        summary = _write(output, predictions, fmt, topk, start, resumed, neighbours=neighbours,
                         open_set=predictor.unknown_threshold is not None)
        remove_shards(shard_dir(output), job_runs(shard_dir(output)))  # complete: its own shards are in the output
    return summary


def _write(output: Path, predictions, fmt: str, topk: int, start: float, resumed: int = 0, *, neighbours: int = 0,
           open_set: bool = False) -> PredictSummary:
    """Write the predictions as they come (unless none could be read and ``output`` exists already); the run's
    summary, timed from ``start`` (``time.perf_counter``)."""
    written = write_predictions(output, predictions, fmt, topk=topk, neighbours=neighbours, open_set=open_set)
    if not written.saved:
        log.error("no image could be read: %s is left as it was", output)
    return PredictSummary(output, written.images, written.errors, time.perf_counter() - start, written.unknown,
                          resumed)


def _with_progress(stream, total: int, progress: bool):
    """``stream`` with a progress bar (rich) from :data:`PROGRESS_MIN_IMAGES` images on."""
    if progress and total >= PROGRESS_MIN_IMAGES:
        try:
            from rich.progress import track
        except ImportError:  # the torch-free install has no rich: no progress bar
            return stream
        return track(stream, total=total, description="predicting", transient=True)
    return stream


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twincar-predict",
        description="Predict make, model and year of car photos into a CSV, JSON or Parquet file.",
    )
    parser.add_argument("--images", nargs="+", required=True, metavar="PATH",
                        help="image files, folders (searched recursively) or glob patterns")
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="a TwinCar .ckpt, an exported .pth/.safetensors/.onnx (run without torch), "
                             "local-dir:DIR or hf-hub:USER/REPO (a timm hub export), or the original TwinCars .pth")
    parser.add_argument("--classes", metavar="PATH",
                        help="classes.txt or classes.csv; needed when the model file carries no class names")
    parser.add_argument("--output", "-o", metavar="PATH",
                        help=f"output file (default {DEFAULT_OUTPUT}, .json with --format json)")
    parser.add_argument("--format", choices=FORMATS, default="csv",
                        help="output format (default csv; parquet for millions of rows)")
    parser.add_argument("--topk", type=int, default=5, help="top-k classes per image (default 5)")
    parser.add_argument("--batch-size", "-b", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--workers", "-j", type=int,
                        help="image decoding processes (default: 0 on the CPU, up to 8 with a GPU)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bf16 autocast where the CPU/GPU computes bf16 natively, else fp32")
    parser.add_argument("--img-size", type=int, metavar="N", help="network input side (default: from the model)")
    parser.add_argument("--resize-mode", choices=("crop", "squash"),
                        help="crop: short side + center crop; squash: whole image to NxN (default: from the model)")
    parser.add_argument("--tta", choices=("flip",),
                        help="test-time augmentation: average the logits with the mirror image's")
    parser.add_argument("--unknown", default="auto", metavar="auto|off|VALUE",
                        help="auto: mark cars below the model's calibrated unknown threshold as not one of its classes "
                        "(python -m twincar.calibrate; training fits it); off: always name a class; VALUE: a threshold "
                        "on the unknown score (max-logit by default)")
    parser.add_argument("--unknown-score", metavar="NAME",
                        help="the unknown score to use instead of the model's default (chosen by calibration): "
                        "max_logit, max_softmax, energy, knn, mahalanobis or rel_mahalanobis (one it has a threshold "
                        "for)")
    parser.add_argument("--neighbours", type=int, default=0, metavar="K",
                        help="add the K nearest training images and their classes to each row (an index built by "
                        "python -m twincar.index)")
    parser.add_argument("--index", metavar="DIR", help="the neighbour index folder (default: index/ beside the model)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    scale = parser.add_argument_group("many processes (Lightning Trainer.predict, sharded output)")
    scale.add_argument("--devices", type=int, metavar="N",
                       help="processes per node, one per GPU (default 1; under torchrun: its --nproc-per-node)")
    scale.add_argument("--num-nodes", type=int, metavar="M", help="nodes (default 1; under torchrun: its --nnodes)")
    scale.add_argument("--accelerator", choices=("auto", "cpu", "gpu"), default="auto",
                       help="what the processes run on (default auto: GPUs when there are any)")
    scale.add_argument("--resume", action="store_true",
                       help="finish a killed job: predict only the images that its shards (OUTPUT.shards/) lack")
    scale.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, metavar="N",
                       help=f"images per shard and process (default {DEFAULT_SHARD_SIZE}): what a kill can lose")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; a user error prints one sentence and exits 1, as does a run where every image failed."""
    from twincar.cluster import is_launching_process

    args = build_parser().parse_args(argv)
    level = logging.INFO if is_launching_process() else logging.WARNING  # rank 0 says what the job does
    logging.basicConfig(level=level, format="%(levelname)s %(message)s", stream=sys.stderr)
    output = args.output or str(Path(DEFAULT_OUTPUT).with_suffix(f".{args.format}"))
    try:
        summary = predict_files(
            args.images, args.model, classes=args.classes, output=output, fmt=args.format, topk=args.topk,
            batch_size=args.batch_size, num_workers=args.workers, device=args.device, precision=args.precision,
            image_size=args.img_size, resize_mode=args.resize_mode, tta=args.tta, unknown=args.unknown,
            unknown_score=args.unknown_score, neighbours=args.neighbours, index=args.index,
            progress=not args.no_progress, devices=args.devices, num_nodes=args.num_nodes,
            accelerator=args.accelerator, resume=args.resume, shard_size=args.shard_size,
        )
    except TwinCarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary is None:  # a rank other than 0 of a multi-process run: rank 0 reports
        return 0
    print(summary)
    if summary.errors == summary.images:
        print(f"error: none of the {summary.images} image(s) could be read", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
