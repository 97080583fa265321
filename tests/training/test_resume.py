"""Runs that survive a kill: resume=auto continues the same run directory, logs continue without a
duplicated epoch, and SIGTERM / SIGUSR1 write a checkpoint before stopping."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import SMALL_SPEC, run_cli
from tests.training.test_train import read_tensorboard
from twincar.training.resume import Preemption, ResumeError, find_resume_checkpoint

SMALL_DATA = [f"data.synthetic.{k}={v}" for k, v in SMALL_SPEC.items()]
STEPS_PER_EPOCH = 4
# Tiny and slow enough to be caught mid-epoch: 4 batches of 8 images at 32 px per epoch.
RUN = ["experiment=smoke", "model.name=test_resnet", "data.image_size=32", "~callbacks.rich_progress_bar",
       f"trainer.limit_train_batches={STEPS_PER_EPOCH}", "test=false", "export=false", *SMALL_DATA]


def test_resume_auto_finds_last_checkpoint_or_starts_fresh(tmp_path, caplog):
    caplog.set_level("INFO")
    assert find_resume_checkpoint("auto", tmp_path) is None
    assert "no " in caplog.text and "starting fresh" in caplog.text
    torch.save({"state_dict": {}}, tmp_path / "last.ckpt")  # a readable checkpoint (a damaged one: test_faults)
    assert find_resume_checkpoint("auto", tmp_path) == tmp_path / "last.ckpt"
    assert find_resume_checkpoint(None, tmp_path) is None
    with pytest.raises(ResumeError, match="resume='yes' is not an option: use resume=auto"):
        find_resume_checkpoint("yes", tmp_path)


def test_preemption_signal_checkpoints_then_hands_over_to_submitit(tmp_path):
    # submitit installs its requeue handler (SIGUSR2) before the job runs: it must run after last.ckpt is saved
    handed_over, saved = [], []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: handed_over.append(signum))
    try:
        trainer = SimpleNamespace(strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision),
                                  save_checkpoint=saved.append, should_stop=False, is_global_zero=True)
        callback = Preemption(tmp_path)
        callback.on_fit_start(trainer, None)
        callback.on_train_batch_end(trainer, None, None, None, 0)
        assert not saved and not trainer.should_stop  # no signal, nothing happens
        os.kill(os.getpid(), signal.SIGUSR2)
        assert not handed_over  # caught by the callback: nothing done inside the handler
        callback.on_train_batch_end(trainer, None, None, None, 1)
        assert saved == [tmp_path / "last.ckpt"] and trainer.should_stop and callback.stopped == "SIGUSR2"
        assert handed_over == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def _start(cwd: Path, run_dir: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf_home"), "PYTHONUNBUFFERED": "1",
           **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "twincar.train", *RUN, f"hydra.run.dir={run_dir}", *args],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _step(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # not written yet
        return -1


def _wait_for_step(proc: subprocess.Popen, ckpt: Path, at_least: int, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        if (step := _step(ckpt)) >= at_least:
            return step
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no checkpoint at step {at_least} in {timeout} s")


def _epoch_rows(metrics_csv: Path, column: str) -> list[int]:
    with open(metrics_csv, newline="") as f:
        return [int(float(r["epoch"])) for r in csv.DictReader(f) if r.get(column)]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_auto_continues_the_run(tmp_path, data_dir):
    run = tmp_path / "run"
    epochs = 3
    args = [f"paths.data_dir={data_dir}", f"trainer.max_epochs={epochs}",
            "callbacks.step_checkpoint.every_n_train_steps=1"]  # last.ckpt after every step
    proc = _start(tmp_path, run, *args)
    _wait_for_step(proc, run / "checkpoints" / "last.ckpt", STEPS_PER_EPOCH + 1)  # into the second epoch
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate()
    killed_at = _step(run / "checkpoints" / "last.ckpt")
    assert STEPS_PER_EPOCH < killed_at < epochs * STEPS_PER_EPOCH, killed_at
    assert not (run / "metrics.json").exists()

    done = run_cli("twincar.train", *RUN, f"hydra.run.dir={run}", *args, cwd=tmp_path)  # resume=auto: the default
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert f"resume=auto: continuing from {run}/checkpoints/last.ckpt" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == epochs
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if "last" in p.name) == ["last.ckpt"]
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == epochs * STEPS_PER_EPOCH  # the steps done before the kill were not redone

    # CSV: the history before the kill is kept, and every epoch appears once (the last row is the final validate)
    history = run / "csv" / "metrics.csv"
    assert _epoch_rows(history, "train/loss") == list(range(epochs))
    assert _epoch_rows(history, "val/acc") == [*range(epochs), epochs]
    # TensorBoard: one val/acc value per epoch (+ the final validate), none hidden or repeated
    _, scalars = read_tensorboard(run)
    assert len(scalars["val/acc"]) == epochs + 1 and len(scalars["train/loss"]) == epochs
    # best-so-far came back with the checkpoint: it is the best over all epochs, the first one included
    val_acc = scalars["val/acc"][:epochs]
    assert metrics["val/acc_best"] == pytest.approx(max(val_acc), abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_stop_signal_writes_a_checkpoint_and_exits_cleanly(tmp_path, data_dir, signum):
    run = tmp_path / "run"
    # inside a SLURM job (a fake scontrol records its arguments): SIGUSR1 requeues it, SIGTERM does not
    (tmp_path / "bin").mkdir()
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.txt\n")
    scontrol.chmod(0o755)
    env = {"SLURM_JOB_ID": "4242", "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    # no step checkpoints: last.ckpt is written at the end of epoch 1, then only by the signal
    proc = _start(tmp_path, run, f"paths.data_dir={data_dir}", "trainer.max_epochs=50", "~callbacks.step_checkpoint",
                  env=env)
    ckpt = run / "checkpoints" / "last.ckpt"
    seen = _wait_for_step(proc, ckpt, STEPS_PER_EPOCH)
    time.sleep(0.5)
    sent = time.time()
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    name = signal.Signals(signum).name
    assert f"stopped by {name}: checkpoint {ckpt} written" in out
    assert f"continue it with hydra.run.dir={run} resume=auto" in out
    assert ckpt.stat().st_mtime >= sent and _step(ckpt) >= seen  # a fresh checkpoint, taken when the signal came
    assert not (run / "metrics.json").exists()  # an unfinished run is not evaluated
    assert "Traceback" not in out
    requeued = (tmp_path / "scontrol.txt").read_text() if (tmp_path / "scontrol.txt").exists() else ""
    assert requeued == ("requeue 4242\n" if signum == signal.SIGUSR1 else "")
