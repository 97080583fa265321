"""Predict's shards: each process writes its predictions in Parquet files of ``--shard-size`` images, so that a job
of a million images killed at any point keeps all but the shards in progress, and ``--resume`` predicts only the
rest.

The shards of ``OUTPUT`` live in ``OUTPUT.shards/`` as ``<run>-<rank>-<n>.parquet``, each written atomically (a
kill leaves a temporary file, never a half shard that would be read back). A row is keyed by the image's resolved
path, size and modification time: an image that changed since is predicted again. Once every image has its row,
rank 0 merges the shards into the one output, in input order, and removes them.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from twincar.cluster import is_launching_process
from twincar.errors import TwinCarError
from twincar.files import atomic_path, read_json_object, remove_stale_temp_files, write_json
from twincar.inference.batches import BatchOutputs, source_name
from twincar.inference.predictor import Predictor
from twincar.inference.results import Prediction
from twincar.inference.writers import shard_dir
from twincar.models.card import FINGERPRINT, check_fingerprint

log = logging.getLogger(__name__)

Key = tuple[str, int, int]  # (resolved path, size in bytes, mtime in ns)

SCHEMA = pa.schema([
    ("key_path", pa.string()), ("key_size", pa.int64()), ("key_mtime_ns", pa.int64()),
    ("source", pa.string()), ("error", pa.string()), ("name", pa.string()), ("label", pa.int64()),
    ("confidence", pa.float64()), ("make", pa.string()), ("model", pa.string()), ("year", pa.int64()),
    ("known", pa.bool_()), ("unknown_score", pa.float64()), ("num_classes", pa.int64()),
    ("topk_names", pa.list_(pa.string())), ("topk_probs", pa.list_(pa.float64())),
    ("nn_images", pa.list_(pa.string())), ("nn_classes", pa.list_(pa.string())),
    ("nn_similarity", pa.list_(pa.float64())),
])


SHARD_NAME = re.compile(r"(?P<run>[A-Za-z0-9]+)-\d{5}-\d{6}\.parquet")  # <run>-<rank>-<n>.parquet (shard_name)


def shard_files(folder: Path, runs: Sequence[str] | None = None) -> list[Path]:
    """The finished shards in ``folder``: files named as :func:`shard_name` names them (temporary files of a killed
    writer, and any other file, a user's own ``.parquet`` included, are not among them); with ``runs``, only those of
    these runs (a job's: its ``job.json`` lists them)."""
    if not folder.is_dir():
        return []
    found = [(p, m) for p in folder.glob("*.parquet") if (m := SHARD_NAME.fullmatch(p.name))]
    return sorted(p for p, m in found if runs is None or m["run"] in runs)


def job_runs(folder: Path) -> list[str] | None:
    """The runs whose shards are the job's own (its ``job.json``): none when it has no readable one, None (every
    shard) for a job written before runs were recorded."""
    try:
        job = read_json_object(folder / JOB_FILE, "shard job file")
    except (OSError, TwinCarError):
        return []
    runs = job.get("runs")
    return [str(r) for r in runs] if isinstance(runs, list) else None


SHARD_VISIBLE_TIMEOUT_S = 120.0  # how long rank 0 waits for another node's shards to appear (NFS caches listings)


def wait_for_shards(folder: Path, names: Sequence[str], *, timeout: float = SHARD_VISIBLE_TIMEOUT_S,
                    poll: float = 1.0) -> None:
    """Return once every shard in ``names`` (those the job's processes wrote) is listed in ``folder``. A shared
    filesystem may show one node's new files to another only after its cache expires (NFS: up to a minute); a shard
    still missing after ``timeout`` seconds is named in the error, and ``--resume`` finishes the job."""
    deadline = time.monotonic() + timeout
    while missing := sorted(set(names) - {p.name for p in shard_files(folder)}):
        if time.monotonic() >= deadline:
            raise TwinCarError(f"{len(missing)} shard(s) another process wrote are not visible in {folder} after "
                               f"{timeout:.0f} s (first: {missing[0]}): once they are, run the same command with "
                               "--resume to merge them")
        time.sleep(poll)


def file_key(path: str | Path) -> Key:
    """What identifies an image across runs: resolved path, size and mtime (size and mtime -1: it cannot be read)."""
    resolved = Path(path).expanduser().resolve()
    try:
        stat = resolved.stat()
    except OSError:
        return str(resolved), -1, -1
    return str(resolved), stat.st_size, stat.st_mtime_ns


def to_record(p: Prediction, key: Key) -> dict:
    """One shard row: the prediction and its image's key."""
    return {
        "key_path": key[0], "key_size": key[1], "key_mtime_ns": key[2], "source": p.source, "error": p.error,
        "name": p.name, "label": p.label, "confidence": p.confidence, "make": p.make, "model": p.model,
        "year": p.year, "known": p.known, "unknown_score": p.unknown_score, "num_classes": p.num_classes,
        "topk_names": [n for n, _ in p.topk], "topk_probs": [q for _, q in p.topk],
        "nn_images": [n[0] for n in p.neighbours], "nn_classes": [n[1] for n in p.neighbours],
        "nn_similarity": [n[2] for n in p.neighbours],
    }


def from_record(r: dict) -> Prediction:
    """The :class:`Prediction` a shard row holds."""
    return Prediction(
        source=r["source"], name=r["name"], label=r["label"], confidence=r["confidence"], make=r["make"],
        model=r["model"], year=r["year"], topk=list(zip(r["topk_names"], r["topk_probs"], strict=True)),
        error=r["error"], known=r["known"], unknown_score=r["unknown_score"], num_classes=r["num_classes"],
        neighbours=list(zip(r["nn_images"], r["nn_classes"], r["nn_similarity"], strict=True)),
    )


SHARD_FINGERPRINT = b"twincar_fingerprint"  # the Parquet metadata key of the model that predicted a shard


def write_shard(path: Path, records: Sequence[dict], fingerprint: str | None = None) -> Path:
    """Write one shard atomically (temporary file beside it, fsync, rename), with the ``fingerprint`` of the model
    that predicted it in its metadata."""
    schema = SCHEMA.with_metadata({SHARD_FINGERPRINT: fingerprint.encode()}) if fingerprint else SCHEMA
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(list(records), schema=schema), tmp)
    return path


KEY_COLUMNS = ["key_path", "key_size", "key_mtime_ns"]


def _key(r: dict) -> Key:
    return r["key_path"], r["key_size"], r["key_mtime_ns"]


def shard_keys(folder: Path, *, predicted_only: bool = False, runs: Sequence[str] | None = None,
               fingerprint: str | None = None) -> dict[Path, list[Key]]:
    """The image keys of each finished shard in ``folder``, in its row order (the key columns only are read); with
    ``predicted_only``, those of the rows that are not an unreadable image's error (``--resume`` tries those
    again: the error may have passed). A shard that cannot be read, or that records another model's ``fingerprint``,
    is named in a warning and left out (its images are predicted again)."""
    keys: dict[Path, list[Key]] = {}
    for path in shard_files(folder, runs):
        try:
            table = pq.read_table(path, columns=[*KEY_COLUMNS, "error"])
        except (OSError, pa.ArrowException) as e:
            log.warning("shard %s cannot be read (%s): its images are predicted again", path, e)
            continue
        recorded = (table.schema.metadata or {}).get(SHARD_FINGERPRINT)
        if fingerprint and recorded and recorded.decode() != fingerprint:
            log.warning("shard %s was predicted by another model (fingerprint %s, this one's is %s): ignored, its "
                        "images are predicted again", path, recorded.decode(), fingerprint)
            continue
        rows = table.to_pylist()
        keys[path] = [_key(r) for r in rows if not (predicted_only and r["error"] is not None)]
    return keys


def read_shard(path: Path) -> list[tuple[Key, Prediction]]:
    """The rows of one shard: each image's key and prediction."""
    try:
        rows = pq.read_table(path, schema=SCHEMA).to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise TwinCarError(f"shard {path} cannot be read ({e}): remove it and run again with --resume (its images "
                           "are predicted again)") from e
    return [(_key(r), from_record(r)) for r in rows]


def merged(folder: Path, keys: Sequence[Key], runs: Sequence[str] | None = None,
           fingerprint: str | None = None) -> Iterator[Prediction]:
    """The prediction of every image, in input order (``keys``: the images' keys), streamed from ``folder``'s
    shards: each image appears once, and a shard is read only when the first of its images is due, so rank 0
    holds the rows of about one shard per process that wrote them, not the job's (each image's key and position it
    holds for the whole job). An image that no shard holds is refused before anything is returned. ``runs``: the
    job's own (:func:`job_runs`); another file in the folder is never read, nor a shard of another model's
    ``fingerprint``."""
    written = shard_keys(folder, runs=runs, fingerprint=fingerprint)
    covered = {k for shard in written.values() for k in shard}
    missing = [k[0] for k in keys if k not in covered]
    if missing:
        raise TwinCarError(f"{len(missing)} image(s) have no prediction in the shards (first: {missing[0]}): "
                           "run again with --resume")
    positions: dict[Key, list[int]] = {}  # an image given twice is answered twice
    for i, k in enumerate(keys):
        positions.setdefault(k, []).append(i)
    return _in_input_order(written, positions)


def _in_input_order(written: dict[Path, list[Key]], positions: dict[Key, list[int]]) -> Iterator[Prediction]:
    """A heap of (input position, tie, item): an unread shard waits at its first image's position; when it comes up,
    its rows join the heap at theirs. Shards go in first, so when a row comes up every copy of its image is in the
    heap: a predicted copy wins over an error row (an image that could not be read once and could on --resume), and
    the others are skipped."""
    tie = itertools.count()
    heap: list[tuple[int, int, Path | Prediction]] = []
    for path, shard in written.items():
        first = min((i for k in shard for i in positions.get(k, ())), default=None)
        if first is not None:  # a shard of images no longer asked for is never read
            heapq.heappush(heap, (first, next(tie), path))
    due = 0
    while heap:
        position, _, item = heapq.heappop(heap)
        if isinstance(item, Path):
            for key, prediction in read_shard(item):
                for i in positions.get(key, ()):
                    heapq.heappush(heap, (i, next(tie), prediction))
        elif position == due:
            while not item.ok and heap and heap[0][0] == due and not isinstance(heap[0][2], Path):
                item = heapq.heappop(heap)[2]  # another copy of this image: an error row gives way
            due += 1
            yield item
        elif position > due:  # cannot happen unless a shard changed while it was merged
            raise TwinCarError(f"image {due} of the input vanished from the shards while they were merged: run "
                               "again with --resume")


class ShardWriter(BasePredictionWriter):
    """Writes each process's predictions into shards of ``shard_size`` images (Lightning's prediction writer).

    Args:
        folder: the shards' folder (:func:`shard_dir`).
        images: the inputs of this run (item ``i`` of the dataset is ``images[i]``) and ``keys`` their keys.
        predictor: turns a batch's outputs into predictions (:meth:`Predictor.batch_predictions`), with ``topk``
            classes and ``neighbours`` (as that method takes them).
        options: what the predictions depend on (model, top-k, TTA...), kept in ``job.json`` for ``--resume``.
    """

    def __init__(self, folder: Path, images: Sequence[str], keys: Sequence[Key], predictor: Predictor, *,
                 shard_size: int, topk: int = 5, neighbours: Callable | None = None,
                 options: dict | None = None):
        super().__init__("batch")
        self.folder, self.images, self.keys = folder, images, keys
        self.predictor, self.topk, self.neighbours, self.shard_size = predictor, topk, neighbours, shard_size
        self.options = options or {}  # written to job.json: what --resume must match
        self.pending: list[dict] = []
        self.written: list[str] = []  # the names of this process's shards
        self.run_id, self.rank, self.count = "", 0, 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        run_id = new_run_id()
        if trainer.is_global_zero:
            start_job(self.folder, self.options, run_id)
        self.run_id = trainer.strategy.broadcast(run_id)  # rank 0's: one name for the run's shards, after start_job
        self.rank = trainer.global_rank
        if trainer.world_size > 1:
            self._check_same_inputs(trainer.world_size)

    def _check_same_inputs(self, world_size: int) -> None:
        """Every process listed its images itself: each must have the same list (else the sampler's shares overlap
        or miss images), and see the job's folder (a filesystem every node shares). Every process gets the same
        answer, so all stop together."""
        digest = hashlib.sha256("\n".join(f"{k[0]}\t{k[1]}\t{k[2]}" for k in self.keys).encode()).hexdigest()
        seen = [None] * world_size
        torch.distributed.all_gather_object(seen, (digest, (self.folder / JOB_FILE).is_file()))
        if any(d != seen[0][0] for d, _ in seen):
            raise TwinCarError(f"the {world_size} processes found different images to predict (files added, removed "
                               "or changed while they started): run again with --resume once the images are stable")
        if not all(visible for _, visible in seen):
            raise TwinCarError(f"{self.folder} is not visible to every process: put --output on a filesystem every "
                               "node shares")

    def write_on_batch_end(self, trainer, pl_module, prediction: BatchOutputs, batch_indices, batch, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        indices = sorted([*prediction.indices, *prediction.errors])
        predictions = self.predictor.batch_predictions(prediction, self.images, self.topk, self.neighbours)
        self.pending += [to_record(p, self.keys[i]) for i, p in zip(indices, predictions, strict=True)]
        if len(self.pending) >= self.shard_size:
            self.flush()
        if trainer.received_sigterm:  # Lightning's predict loop would run on until SIGKILL: stop here
            raise TwinCarError(f"stopped by SIGTERM: the images predicted so far are kept in {self.folder}; run the "
                               "same command with --resume to predict the rest")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Ctrl-C, SIGTERM or an error: the rows computed so far are complete predictions, so they become a shard
        (``--resume`` reads them back) instead of being lost."""
        self.flush()

    def flush(self) -> None:
        """Write the pending rows as this process's next shard."""
        if self.pending:
            path = write_shard(self.folder / shard_name(self.run_id, self.rank, self.count), self.pending,
                               self.options.get(FINGERPRINT))
            self.written.append(path.name)
            self.count += 1
            self.pending = []

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush()

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Rank 0 merges once every process has written its shards and rank 0 sees them all."""
        if trainer.world_size == 1:
            return
        written = [None] * trainer.world_size  # all_gather_object also waits for every process
        torch.distributed.all_gather_object(written, self.written)
        if trainer.is_global_zero:
            wait_for_shards(self.folder, [name for names in written for name in names])


def _named(files: Sequence[str], predictions: Iterator[Prediction]) -> Iterator[Prediction]:
    """Each prediction named as this run names its input (a resumed row was written with the killed run's spelling
    of the same file)."""
    for f, p in zip(files, predictions, strict=True):
        p.source = source_name(f)
        yield p


def new_run_id() -> str:
    """The name a run's shards share (``<run>-<rank>-<n>.parquet``): an earlier run's are never overwritten."""
    return uuid.uuid4().hex[:8]


def shard_name(run_id: str, rank: int, count: int) -> str:
    return f"{run_id}-{rank:05d}-{count:06d}.parquet"


def start_job(folder: Path, options: dict, run_id: str) -> None:
    """Make the shards' folder, drop a killed writer's temporary files and record the job's options and its runs:
    ``run_id`` after those of the runs it resumes (``options["runs"]``), so the job's shards are known by name."""
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(folder)  # a killed writer's half shard
    write_json(folder / JOB_FILE, {**options, "runs": [*(options.get("runs") or []), run_id]})


def remove_shards(folder: Path, runs: Sequence[str] | None) -> None:
    """Remove a merged job's own shards (those of its ``runs``) and its ``job.json``; any other file stays (the
    folder goes when :func:`~twincar.inference.writers.job_lock` releases it, if nothing else is left)."""
    for path in [*shard_files(folder, runs), folder / JOB_FILE]:
        path.unlink(missing_ok=True)
    remove_stale_temp_files(folder)


JOB_FILE = "job.json"  # the options the shards were predicted with: --resume refuses others


def job_options(model: str | Path, predictor: Predictor, *, topk: int, neighbours: int, precision: str,
                accelerator: str, index: str | Path | None = None) -> dict:
    """What a job's predictions depend on (``job.json``): the model file (its path, size and mtime: weights
    retrained into the same file are another model), its class names, the neighbour index's tensors file
    (``index``), and every option
    that changes a row (``precision`` ``auto`` with the ``accelerator``, which resolves it)."""
    path = Path(model).expanduser()
    names = hashlib.sha256("\n".join(predictor.class_names).encode()).hexdigest()[:16]
    return {"model": list(file_key(path)) if path.is_file() else str(model), FINGERPRINT: predictor.fingerprint,
            "classes": names, "topk": topk,
            "tta": predictor.tta, "image_size": predictor.preprocess.image_size,
            "resize_mode": predictor.preprocess.resize_mode, "unknown": predictor.unknown_threshold,
            "temperature": predictor.temperature, "neighbours": neighbours,
            "index": list(file_key(Path(index))) if neighbours and index else None,
            "precision": precision, "accelerator": accelerator}


def check_job(folder: Path, options: dict, resume: bool) -> list[str]:
    """Before a run into ``folder``: an unfinished job's shards are continued only with ``--resume``, its options
    and its model (fingerprint: :func:`~twincar.models.card.check_fingerprint`). Returns the runs whose shards are
    the job's (none for a new job); shard files of no run of the job (another job's, copied in) are named and
    ignored."""
    if not shard_files(folder):
        return []
    if not resume:
        raise TwinCarError(f"{folder} holds the shards of an unfinished run: pass --resume to finish it, or remove "
                           "the folder to start again")
    job = folder / JOB_FILE
    if not job.is_file():
        raise TwinCarError(f"{folder} holds shards but no {JOB_FILE} saying what they were predicted with: remove the "
                           "folder to start again")
    earlier = read_json_object(job, "shard job file")
    check_fingerprint(earlier.get(FINGERPRINT), options.get(FINGERPRINT), job,
                      "resume with the model that started the job, or remove the folder to start again")
    changed = sorted(k for k in options if k in earlier and k != FINGERPRINT and earlier[k] != options[k])
    if changed:
        raise TwinCarError(f"{folder} was predicted with other options ("
                           + ", ".join(f"{k}: {earlier[k]!r} then, {options[k]!r} now" for k in changed)
                           + "): resume with the same ones, or remove the folder to start again")
    runs = job_runs(folder)
    if runs is None:  # a job written before runs were recorded: every shard in its folder is its own
        runs = sorted({SHARD_NAME.fullmatch(p.name)["run"] for p in shard_files(folder)})
    if foreign := sorted(set(shard_files(folder)) - set(shard_files(folder, runs))):
        log.warning("%d shard file(s) in %s are not this job's (%s not among its runs in %s): ignored, and left in "
                    "place", len(foreign), folder, ", ".join(p.name for p in foreign[:3]), JOB_FILE)
    return runs


def predict_sharded(predictor: Predictor, files: Sequence[str], output: Path, processes, *, options: dict,
                    topk: int, batch_size: int, num_workers: int = 0, neighbours: Callable | None = None,
                    shard_size: int, resume: bool = False,
                    progress: bool = True) -> tuple[Iterator[Prediction], int] | None:
    """Predict ``files`` on ``processes`` (:func:`twincar.inference.parallel.run_inference`) into the shards beside
    ``output``;
    with ``resume``, only those the shards lack. On global rank 0: every file's prediction in input order, streamed
    from the shards (:func:`merged`), and how many came from earlier shards; None on the other ranks."""
    from twincar.cluster import requeue_on_time_limit
    from twincar.inference.parallel import run_inference

    folder = shard_dir(output)
    runs = check_job(folder, options, resume)
    options = {**options, "runs": runs}
    keys = [file_key(f) for f in files]
    fingerprint = options.get(FINGERPRINT)
    written = shard_keys(folder, predicted_only=True, runs=runs, fingerprint=fingerprint) if resume else {}
    done = {k for shard in written.values() for k in shard}  # an image's error row: it is tried again
    todo = [i for i, k in enumerate(keys) if k not in done]
    resumed = len(keys) - len(todo)
    if resume:
        log.info("resuming %s: %d of %d image(s) already predicted in %d shard(s); predicting the other %d", folder,
                 resumed, len(keys), len(written), len(todo))
    images = [files[i] for i in todo]
    if 0 < len(todo) < processes.world_size:  # Lightning's sampler gives each process one image at least
        log.info("%d image(s) left for %d processes: rank 0 predicts them alone", len(todo), processes.world_size)
        if not is_launching_process():
            return None
        run_id = new_run_id()
        start_job(folder, options, run_id)
        predictions = predictor.iter_predict(images, batch_size=batch_size, topk=topk, neighbours=neighbours)
        write_shard(folder / shard_name(run_id, 0, 0),
                    [to_record(p, keys[i]) for i, p in zip(todo, predictions, strict=True)], fingerprint)
    elif todo:
        log.info("predicting %d image(s) on %d process(es) (%d node(s) x %d %s), shards of %d in %s", len(todo),
                 processes.world_size, processes.num_nodes, processes.devices, processes.accelerator, shard_size,
                 folder)
        writer = ShardWriter(folder, images, [keys[i] for i in todo], predictor, topk=topk, shard_size=shard_size,
                             neighbours=neighbours, options=options)
        with requeue_on_time_limit():
            trainer = run_inference(predictor, predictor.inputs(images), processes, [writer], batch_size=batch_size,
                                    num_workers=num_workers, embeddings=neighbours is not None, progress=progress)
        if not trainer.is_global_zero:
            return None
    elif not is_launching_process():  # nothing left to predict: rank 0 alone merges
        return None
    return _named(files, merged(folder, keys, job_runs(folder), fingerprint)), resumed
