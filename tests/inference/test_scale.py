"""Predict and evaluate on many processes (issue 18): two gloo processes on the CPU against one process.

Over 203 readable images plus 2 unreadable files: every image appears exactly once, in input order, with the
one-process answer; a job killed after its first shard finishes with ``--resume``, reading that shard back; eval
with ``trainer.devices=2`` writes the metrics of one process.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import twincar.inference.shards as shards
from tests.conftest import TINY_NAMES, run_cli
from tests.trained import compose, trained_run
from twincar.errors import TwinCarError
from twincar.inference.results import Prediction
from twincar.inference.shards import (
    JOB_FILE,
    file_key,
    merged,
    shard_files,
    shard_keys,
    to_record,
    write_shard,
)
from twincar.inference.writers import shard_dir
from twincar.predict import predict_files

TWO_CPU_PROCESSES = ["--devices", "2", "--accelerator", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir) -> Path:
    return trained_run(tmp_path_factory, data_dir)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder of 203 rendered cars of the trained run's six classes, a truncated JPEG and a text file."""
    from twincar.data.discovery import find_images
    from twincar.data.synthetic import SyntheticSpec, generate

    root = generate(tmp_path_factory.mktemp("scale_data") / "cars",
                    SyntheticSpec(num_classes=6, train_per_class=30, test_per_class=4, seed=7))
    folder = tmp_path_factory.mktemp("scale_images")
    for i, path in enumerate(find_images([str(root)])[:203]):
        shutil.copy(path, folder / f"car{i:03d}{path.suffix}")
    (folder / "car100b.jpg").write_bytes((folder / "car100.jpg").read_bytes()[:200])  # truncated
    (folder / "car150b.png").write_text("not an image")
    return folder


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def assert_same_predictions(rows: list[dict], reference: list[dict]) -> None:
    """The same images in the same order, the same top-1 and probabilities within 1e-5, the same error rows."""
    assert [r["image"] for r in rows] == [r["image"] for r in reference]
    for r, ref in zip(rows, reference, strict=True):
        assert bool(r["error"]) == bool(ref["error"]), r["image"]
        if not ref["error"]:
            assert r["class"] == ref["class"], r["image"]
            for k in range(1, 6):
                assert r[f"top{k}_class"] == ref[f"top{k}_class"]
                assert abs(float(r[f"top{k}_prob"]) - float(ref[f"top{k}_prob"])) <= 1e-5


@pytest.fixture(scope="module")
def one_process(run, images, tmp_path_factory) -> list[dict]:
    """The one-process predictions of the folder (the reference)."""
    out = tmp_path_factory.mktemp("one") / "predictions.csv"
    summary = predict_files([str(images)], run / "model.pth", output=out, progress=False)
    assert summary.images == 205 and summary.errors == 2
    return read_rows(out)


@pytest.mark.slow  # two processes that import torch and Lightning on 2 shared cores
def test_two_processes_predict_every_image_once_in_input_order_as_one_process(run, images, one_process, tmp_path):
    out = tmp_path / "predictions.parquet"
    proc = run_cli("twincar.predict", "--images", str(images), "--model", str(run / "model.pth"), "-o", str(out),
                   "--format", "parquet", "--shard-size", "40", *TWO_CPU_PROCESSES, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "205 images, 2 errors" in proc.stdout
    rows = read_rows(out)
    assert len({r["image"] for r in rows}) == len(rows) == 205  # no image twice, no padding duplicate, none left out
    errors = {Path(r["image"]).name: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"car100b.jpg", "car150b.png"} and all("car1" in e for e in errors.values())
    assert_same_predictions(rows, one_process)
    assert not shard_dir(out).exists()  # a finished job's shards are merged into the output and removed


HARNESS = '''"""python harness.py ARGS: twincar-predict, SIGKILLed (all its processes) once a first shard is written."""
import os, signal, sys
import twincar.inference.shards as shards
write = shards.write_shard
def write_then_die(path, records, *fingerprint):
    write(path, records, *fingerprint)
    os.killpg(os.getpgid(0), signal.SIGKILL)
shards.write_shard = write_then_die
from twincar.predict import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow  # three runs of two processes
def test_a_job_killed_after_its_first_shard_resumes_and_reads_that_shard_back(run, images, one_process, tmp_path):
    out = tmp_path / "predictions.csv"
    args = ["--images", str(images), "--model", str(run / "model.pth"), "-o", str(out), "--shard-size", "40",
            *TWO_CPU_PROCESSES]
    (tmp_path / "harness.py").write_text(HARNESS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    killed = subprocess.run([sys.executable, "harness.py", *args], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600, start_new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not out.exists()
    finished = shard_files(shard_dir(out))
    assert 1 <= len(finished) <= 2  # the kill came right after the first: at most the other rank's first as well
    written = {k for keys in shard_keys(shard_dir(out)).values() for k in keys}
    assert 40 * len(finished) <= len(written) < 205  # every finished shard reads back whole
    # an unreadable image's error row is tried again on --resume (the error may have passed): not done
    done = {k for keys in shard_keys(shard_dir(out), predicted_only=True).values() for k in keys}

    again = run_cli("twincar.predict", *args, cwd=tmp_path)  # without --resume: refused, nothing lost
    assert again.returncode == 1 and "pass --resume to finish it" in again.stderr
    assert shard_files(shard_dir(out)) == finished

    # mark one row of the finished shard: if the resumed job recomputed that image, the mark would be gone
    rows = pq.read_table(finished[0]).to_pylist()
    marked = next(r for r in rows if r["error"] is None)
    marked["confidence"] = 0.123456
    marked_key = (marked["key_path"], marked["key_size"], marked["key_mtime_ns"])
    write_shard(finished[0], rows)
    resumed = run_cli("twincar.predict", *args, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (f"{len(done)} of 205 image(s) already predicted in {len(finished)} shard(s); predicting the other "
            f"{205 - len(done)}") in resumed.stderr
    assert f"{len(done)} read back from the shards of the earlier run" in resumed.stdout
    rows = read_rows(out)
    assert len({r["image"] for r in rows}) == len(rows) == 205
    assert_same_predictions(rows, one_process)
    by_key = {file_key(r["image"]): r for r in rows}
    assert by_key[marked_key]["confidence"] == "0.123456"  # the shard's row, not a recomputed one
    assert not shard_dir(out).exists()


@pytest.mark.slow  # trains the session's model; eval in two processes
def test_eval_on_two_processes_writes_the_metrics_of_one(run, tmp_path):
    from twincar.evaluation.recipes import evaluate

    best = json.loads((run / "metrics.json").read_text())["best_checkpoint"]
    one = evaluate(compose("eval", [f"ckpt={best}", f"paths.output_dir={tmp_path / 'one'}", "progress=false"]))
    proc = run_cli("twincar.eval", f"ckpt={best}", f"hydra.run.dir={tmp_path / 'two'}", "progress=false",
                   "trainer.devices=2", "trainer.accelerator=cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "reports" / "metrics.json").read_text())
    assert two["images"] == len(read_rows(tmp_path / "one" / "reports" / "predictions.csv"))
    for name, value in one.items():
        assert two[name] == pytest.approx(value, abs=1e-6), name
    assert read_rows(tmp_path / "two" / "reports" / "predictions.csv") == \
        read_rows(tmp_path / "one" / "reports" / "predictions.csv")
    assert not list((tmp_path / "two").glob("*rank1*"))  # the second process wrote nothing of its own


# -- one process, fast: the shards' bookkeeping ------------------------------------------------------------
def test_resume_in_one_process_predicts_only_what_the_shards_lack(tiny_export, car_images, tmp_path):
    out = tmp_path / "predictions.csv"
    folder = shard_dir(out)
    folder.mkdir()
    kept = Prediction(source="../another/spelling.jpg", name=TINY_NAMES[2], label=2, confidence=0.5,
                      topk=[(TINY_NAMES[2], 0.5)], num_classes=6)
    failed = Prediction(source=str(car_images[1]), error="cannot read image: Input/output error")  # it passed since
    write_shard(folder / "earlier-00000-000000.parquet",
                [to_record(kept, file_key(car_images[0])), to_record(failed, file_key(car_images[1]))])
    (folder / JOB_FILE).write_text(json.dumps({"topk": 1}))  # what the earlier run wrote (the options it records)
    summary = predict_files(car_images, tiny_export, output=out, resume=True, topk=1, progress=False)
    assert (summary.images, summary.resumed, summary.errors) == (3, 1, 0)  # the error row is tried again
    rows = read_rows(out)
    assert [r["image"] for r in rows] == [str(p) for p in car_images]  # named as this run names them
    assert (rows[0]["class"], rows[0]["confidence"]) == (TINY_NAMES[2], "0.5")  # read back, not predicted
    plain = tmp_path / "plain.csv"
    predict_files(car_images, tiny_export, output=plain, topk=1, progress=False)
    assert rows[1:] == read_rows(plain)[1:]
    assert not folder.exists()


def test_resume_refuses_shards_predicted_with_other_options(tiny_export, car_images, tmp_path):
    out = tmp_path / "predictions.csv"
    folder = shard_dir(out)
    folder.mkdir()
    write_shard(folder / "earlier-00000-000000.parquet",
                [to_record(Prediction(source=str(car_images[0]), error="x"), file_key(car_images[0]))])
    (folder / JOB_FILE).write_text(json.dumps({"topk": 5, "tta": None}))
    with pytest.raises(TwinCarError, match=r"other options \(topk: 5 then, 3 now\)"):
        predict_files(car_images, tiny_export, output=out, resume=True, topk=3, progress=False)
    with pytest.raises(TwinCarError, match="holds the shards of an unfinished run: pass --resume"):
        predict_files(car_images, tiny_export, output=out, devices=2, accelerator="cpu", progress=False)
    model = tmp_path / "model.pth"  # the same file name, other weights: another model
    shutil.copy(tiny_export, model)
    shutil.copy(tiny_export.with_name("model_card.json"), tmp_path / "model_card.json")
    (folder / JOB_FILE).write_text(json.dumps({"model": list(file_key(model))}))
    os.utime(model, ns=(1, 1))
    with pytest.raises(TwinCarError, match=r"other options \(model: \["):
        predict_files(car_images, model, output=out, resume=True, progress=False)
    (folder / JOB_FILE).write_text(json.dumps({"classes": "0123456789abcdef"}))  # the same file, other class names
    with pytest.raises(TwinCarError, match=r"other options \(classes: '0123456789abcdef' then, '[0-9a-f]{16}' now"):
        predict_files(car_images, model, output=out, resume=True, progress=False)
    (folder / JOB_FILE).unlink()  # shards that do not say what they were predicted with are not mixed in
    with pytest.raises(TwinCarError, match="holds shards but no job.json saying what they were predicted with"):
        predict_files(car_images, model, output=out, resume=True, progress=False)
    with pytest.raises(TwinCarError, match="an ONNX model predicts in one process"):
        predict_files(car_images, tmp_path / "model.onnx", output=out, devices=2)


def test_a_changed_image_is_predicted_again(tmp_path):
    image = tmp_path / "a.jpg"
    image.write_bytes(b"x")
    before = file_key(image)
    image.write_bytes(b"xy")
    assert file_key(image) != before and file_key(image)[0] == str(image.resolve())


def test_the_merge_streams_the_shards_in_input_order_holding_about_one_per_writer(tmp_path, monkeypatch):
    """120 images: a killed run of 3 processes (shards of 5, interleaved as Lightning's sampler shares them) did 90,
    its resumed run of 2 processes the rest. The merge gives input order, an image given twice twice, skips an
    older shard's second copy and a shard of images no longer asked for, and never holds all rows at once."""
    keys = [(f"/photos/car{i:03d}.jpg", 1000 + i, 7) for i in range(120)] + [("/photos/car003.jpg", 1003, 7)]

    def record(i: int) -> dict:
        return to_record(Prediction(source=f"car{i:03d}.jpg", name=TINY_NAMES[i % 6], label=i % 6, confidence=0.5,
                                    topk=[(TINY_NAMES[i % 6], 0.5)], num_classes=6), keys[i])

    folder = tmp_path / "out.csv.shards"
    for run, todo, ranks in (("killed", range(90), 3), ("resumed", range(90, 120), 2)):
        for rank in range(ranks):
            mine = list(todo)[rank::ranks]
            for n in range(0, len(mine), 5):
                write_shard(folder / shards.shard_name(run, rank, n // 5), [record(i) for i in mine[n:n + 5]])
    write_shard(folder / "aolder-00000-000000.parquet", [record(0)])  # a second copy of image 0
    write_shard(folder / "stale-00000-000000.parquet",
                [to_record(Prediction(source="gone.jpg", error="x"), ("/photos/gone.jpg", 1, 1))])

    read: dict[Path, int] = {}  # the shards read so far and their rows
    real = shards.read_shard

    def read_shard(path: Path):
        read[path] = len(rows := real(path))
        return rows

    monkeypatch.setattr(shards, "read_shard", read_shard)
    merged_rows, held = [], 0
    for p in merged(folder, keys):
        merged_rows.append(p.source)
        held = max(held, sum(read.values()) - len(merged_rows))  # rows read and not yet given out
    assert merged_rows == [f"car{i:03d}.jpg" for i in range(120)] + ["car003.jpg"]
    assert folder / "stale-00000-000000.parquet" not in read  # none of its images is asked for: never read
    assert 0 < held <= 2 * 3 * 5  # about one shard per process of the killed run, not the 121 rows


def test_the_merge_refuses_an_image_that_no_shard_holds_before_returning_any(tmp_path):
    folder = tmp_path / "out.csv.shards"
    keys = [("/photos/a.jpg", 1, 1), ("/photos/b.jpg", 2, 2)]
    write_shard(folder / "run-00000-000000.parquet", [to_record(Prediction(source="a.jpg", error="x"), keys[0])])
    with pytest.raises(TwinCarError, match=r"1 image\(s\) have no prediction in the shards \(first: /photos/b.jpg\)"):
        merged(folder, keys)


def test_processes_started_by_srun_or_torchrun_are_taken_and_a_disagreeing_flag_is_one_sentence(monkeypatch):
    from twincar.cluster import launched_processes
    from twincar.inference.parallel import resolve_processes

    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "SLURM_STEP_NUM_TASKS",
                 "SLURM_STEP_NUM_NODES", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert launched_processes() is None
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "16")  # srun: 2 nodes x 8 tasks
    monkeypatch.setenv("SLURM_STEP_NUM_NODES", "2")
    assert launched_processes() == ("srun", 8, 2)
    assert resolve_processes(None, None, "cpu") == resolve_processes(8, 2, "cpu")
    assert (resolve_processes(None, None, "cpu").world_size, resolve_processes(None, None, "cpu").num_nodes) == (16, 2)
    with pytest.raises(TwinCarError, match=r"--devices 4: srun started 8 \(per node: 8, nodes: 2\)"):
        resolve_processes(4, None, "cpu")
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # salloc's shell: Lightning leaves it alone, and so does this
    assert launched_processes() is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert launched_processes() == ("torchrun", 4, 2)
    with pytest.raises(TwinCarError, match="--num-nodes 3: torchrun started 2"):
        resolve_processes(None, 3, "cpu")


def test_a_second_job_into_the_same_output_stops_before_touching_the_first_ones_shards(tiny_export, car_images,
                                                                                      tmp_path):
    from twincar.inference.writers import job_lock

    out = tmp_path / "predictions.csv"
    with job_lock(shard_dir(out)):  # a job running (this process: alive)
        write_shard(shard_dir(out) / "first-00000-000000.parquet",
                    [to_record(Prediction(source="a.jpg", error="x"), file_key(car_images[0]))])
        with pytest.raises(TwinCarError, match=rf"another predict job \(PID {os.getpid()} on .*\) is writing into "
                                               r".*predictions.csv.shards: wait for it to end or predict into another "
                                               r"--output"):
            predict_files(car_images, tiny_export, output=out, resume=True, progress=False)
        assert shard_files(shard_dir(out)) == [shard_dir(out) / "first-00000-000000.parquet"]  # untouched
        (shard_dir(out) / "first-00000-000000.parquet").unlink()  # the first job ends (merged, cleaned up)
    summary = predict_files(car_images, tiny_export, output=out, progress=False, devices=1, resume=True)
    assert summary.images == 3 and not shard_dir(out).exists()  # the lock and the folder go with the job


def test_processes_that_list_other_images_or_cannot_see_the_folder_all_stop_in_one_sentence(tmp_path, monkeypatch):
    import torch

    from twincar.inference.shards import ShardWriter, start_job

    folder = tmp_path / "out.csv.shards"
    start_job(folder, {}, "abcd1234")
    writer = ShardWriter(folder, ["a.jpg"], [("/p/a.jpg", 1, 2)], predictor=None, shard_size=10)

    def gather(others):  # what the other process reports, as all_gather_object fills it in
        def fake(seen, mine):
            seen[:] = [mine, others(mine)]
        return fake

    monkeypatch.setattr(torch.distributed, "all_gather_object", gather(lambda mine: mine))
    writer._check_same_inputs(2)  # the same images, the folder seen: go on
    monkeypatch.setattr(torch.distributed, "all_gather_object", gather(lambda mine: ("another list", True)))
    with pytest.raises(TwinCarError, match="the 2 processes found different images to predict"):
        writer._check_same_inputs(2)
    monkeypatch.setattr(torch.distributed, "all_gather_object", gather(lambda mine: (mine[0], False)))
    with pytest.raises(TwinCarError, match="is not visible to every process: put --output on a filesystem every node"):
        writer._check_same_inputs(2)


def test_sigterm_keeps_the_rows_predicted_so_far_and_resume_finishes_the_rest(tiny_export, car_images, tmp_path,
                                                                            monkeypatch):
    """Lightning's predict loop only notes a SIGTERM and runs on until SIGKILL: the writer stops at the end of the
    batch, and the rows of every finished batch (no shard of 1,000 was full yet) become a shard."""
    from twincar.inference.predictor import Predictor

    images = [shutil.copy(car_images[i % 3], tmp_path / f"car{i:02d}.jpg") for i in range(12)]
    out = tmp_path / "predictions.csv"
    real, calls = Predictor.batch_outputs, []

    def batch_outputs(self, batch, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # during the third batch of 2, as a scheduler would
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batch, **kwargs)

    monkeypatch.setattr(Predictor, "batch_outputs", batch_outputs)
    with pytest.raises(TwinCarError, match=r"stopped by SIGTERM: the images predicted so far are kept in .*"
                                           r"predictions.csv.shards; run the same command with --resume"):
        predict_files(images, tiny_export, output=out, resume=True, batch_size=2, shard_size=1000, progress=False)
    assert not out.exists() and len(shard_keys(shard_dir(out))) == 1  # the 3 batches' rows, as one shard
    assert sum(len(k) for k in shard_keys(shard_dir(out)).values()) == 6
    monkeypatch.setattr(Predictor, "batch_outputs", real)
    summary = predict_files(images, tiny_export, output=out, resume=True, batch_size=2, progress=False)
    assert (summary.images, summary.resumed) == (12, 6) and not shard_dir(out).exists()
    plain = tmp_path / "plain.csv"
    predict_files(images, tiny_export, output=plain, batch_size=2, progress=False)
    assert read_rows(out) == read_rows(plain)


def test_rank_0_waits_for_the_shards_another_node_wrote_and_names_one_that_never_appears(tmp_path):
    """On NFS a file another node wrote may be listed only after the cache expires: rank 0 waits for the shards every
    process says it wrote before merging, and names a missing one rather than calling its images unpredicted."""
    import threading

    from twincar.inference.shards import wait_for_shards

    folder = tmp_path / "out.csv.shards"
    folder.mkdir()
    write_shard(folder / "run-00000-000000.parquet", [])
    late = threading.Timer(0.3, write_shard, [folder / "run-00001-000000.parquet", []])
    late.start()
    wait_for_shards(folder, ["run-00000-000000.parquet", "run-00001-000000.parquet"], timeout=30, poll=0.05)
    late.join()
    with pytest.raises(TwinCarError, match=r"1 shard\(s\) another process wrote are not visible in .*out.csv.shards "
                                           r"after 0 s \(first: run-00001-000001.parquet\): .* --resume"):
        wait_for_shards(folder, ["run-00000-000000.parquet", "run-00001-000001.parquet"], timeout=0.2, poll=0.05)


def test_slurms_signal_before_the_time_limit_requeues_the_job_and_keeps_the_rows_predicted(tiny_export, car_images,
                                                                                          tmp_path, monkeypatch):
    """``sbatch --requeue --signal=USR1@180``: rank 0 runs ``scontrol requeue JOB``, SLURM answers with SIGTERM (here
    the stand-in scontrol sends it), the rows so far become a shard, and the requeued job's --resume ends the work."""
    from twincar.inference.predictor import Predictor

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol-calls.txt"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nkill -TERM $PPID\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_PROCID", "0")

    images = [shutil.copy(car_images[i % 3], tmp_path / f"car{i:02d}.jpg") for i in range(12)]
    out = tmp_path / "predictions.csv"
    real, batches = Predictor.batch_outputs, []

    def batch_outputs(self, batch, **kwargs):
        batches.append(1)
        if len(batches) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # SLURM, 180 s before the time limit
        return real(self, batch, **kwargs)

    monkeypatch.setattr(Predictor, "batch_outputs", batch_outputs)
    with pytest.raises(TwinCarError, match="stopped by SIGTERM: the images predicted so far are kept"):
        predict_files(images, tiny_export, output=out, resume=True, batch_size=2, shard_size=1000, progress=False)
    assert calls.read_text() == "requeue 4242\n"
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the handler goes with the run
    assert sum(len(k) for k in shard_keys(shard_dir(out)).values()) == 4  # the 2 batches of 2 before the stop

    monkeypatch.setattr(Predictor, "batch_outputs", real)  # the requeued job
    summary = predict_files(images, tiny_export, output=out, resume=True, batch_size=2, progress=False)
    assert (summary.images, summary.resumed) == (12, 4) and not shard_dir(out).exists()
