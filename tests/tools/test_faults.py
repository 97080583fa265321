"""Nothing lost on a kill, a full disk or a strange file: one test per kind of fault.

The kills are deterministic: a harness script wraps ``torch.save`` so that the save of a chosen file writes half
of its bytes into the temporary file and then SIGKILLs its own process (the product code is not touched). The run
folder is a tmpfs mounted for the test, so it is on another filesystem than the system temp folder (where
Lightning's own save would stage a checkpoint before copying it).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import SMALL_SPEC, run_cli
from tests.training.test_resume import _epoch_rows
from twincar.cluster import LOCK, RunLockError, run_lock
from twincar.files import WriteError, atomic_path, temp_files
from twincar.models import WeightsError
from twincar.models.checkpoint import safe_torch_load, save_torch
from twincar.training.resume import ResumeError, find_resume_checkpoint

SMALL_DATA = [f"data.synthetic.{k}={v}" for k, v in SMALL_SPEC.items()]
# The smallest run that writes every kind of file: a tiny ResNet at 32 px, 2 batches an epoch, checkpoints at
# epoch ends only (last.ckpt and the best epoch_*.ckpt).
RUN = ["experiment=smoke", "model.name=test_resnet", "data.image_size=32", "~callbacks.rich_progress_bar",
       "~callbacks.step_checkpoint", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "test=false",
       "export=false", *SMALL_DATA]

HARNESS = '''
"""python harness.py TARGET N SNAPSHOT -- OVERRIDES: twincar.train, SIGKILLed while it saves TARGET the Nth time.
python harness.py TARGET N SNAPSHOT --code CODE: the same around CODE (one save, without a training run)."""
import fnmatch, io, os, runpy, shutil, signal, sys
import torch

target, count, snapshot = sys.argv[1], int(sys.argv[2]), sys.argv[3]
code = sys.argv[5] if sys.argv[4] == "--code" else None
sys.argv = ["twincar.train", *sys.argv[sys.argv.index("--") + 1:]] if code is None else sys.argv[:1]
real_save, seen = torch.save, [0]

def save(obj, f, *args, **kwargs):
    name = str(getattr(f, "name", f))
    if not fnmatch.fnmatch(os.path.basename(name), f".{target}.*.tmp"):
        return real_save(obj, f, *args, **kwargs)
    seen[0] += 1
    if seen[0] < count:
        return real_save(obj, f, *args, **kwargs)
    final = os.path.join(os.path.dirname(name), target)
    if os.path.isfile(final):  # the previous version, as it was when the kill came
        shutil.copyfile(final, snapshot)
    buf = io.BytesIO()
    real_save(obj, buf)
    out = f if hasattr(f, "write") else open(f, "wb")
    out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    out.flush()
    os.fsync(out.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save
if code is None:
    runpy.run_module("twincar.train", run_name="__main__")
else:
    exec(code)
'''


# -- helpers ---------------------------------------------------------------------------------------------
@pytest.fixture
def other_fs(tmp_path) -> Path:
    """A 64 MB tmpfs mounted for the test: another filesystem than the system temp folder."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        assert os.stat(mnt).st_dev != os.stat(tempfile.gettempdir()).st_dev
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _env(cwd: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf_home"), "PYTHONUNBUFFERED": "1"}


def _train(cwd: Path, run: Path, data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli("twincar.train", *RUN, f"hydra.run.dir={run}", f"paths.data_dir={data_dir}", *args, cwd=cwd)


def _train_killed(cwd: Path, run: Path, data_dir: Path, target: str, nth: int, *args: str) -> tuple[str, Path]:
    """Train until the ``nth`` save of ``target``, killed then; returns the output and the snapshot of the previous
    ``target`` (taken at the kill)."""
    harness, snapshot = cwd / "harness.py", cwd / f"{target}.before"
    harness.write_text(HARNESS)
    proc = subprocess.run([sys.executable, str(harness), target, str(nth), str(snapshot), "--", *RUN,
                           f"hydra.run.dir={run}", f"paths.data_dir={data_dir}", *args],
                          cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    return out, snapshot


def _no_damage(run: Path) -> None:
    """No zero-byte file in the run; every checkpoint loads."""
    files = [p for p in run.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert not [p for p in files if p.stat().st_size == 0 and p.suffix in (".ckpt", ".pth", ".json", ".csv")]
    for ckpt in run.glob("checkpoints/*.ckpt"):
        assert "state_dict" in safe_torch_load(ckpt)


def _ok(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


# -- SIGKILL during a save -----------------------------------------------------------------------------------
SAVES = {  # how TwinCar writes each file, run alone in the harness: a complete save, then one killed midway
    "epoch_001.ckpt": "from twincar.training.checkpoints import AtomicCheckpointIO\n"
                      "for epoch in (0, 1):\n"
                      "    state = {{'state_dict': {{'w': torch.ones(64)}}, 'epoch': epoch}}\n"
                      "    AtomicCheckpointIO().save_checkpoint(state, {path!r})",
    "model.pth": "import timm\nfrom twincar.models.checkpoint import export_state_dict\n"
                 "for seed in (0, 1):\n"
                 "    torch.manual_seed(seed)\n"
                 "    export_state_dict(timm.create_model('test_resnet', num_classes=6), {path!r})",
}


@pytest.mark.slow  # a subprocess importing torch (and timm): about 5 s each on 2 cores
@pytest.mark.parametrize("target", ["epoch_001.ckpt", "model.pth"])
def test_sigkill_during_a_checkpoint_or_model_save_leaves_the_previous_file(target, other_fs, tmp_path):
    written = (other_fs / "run" / "checkpoints" / target) if target.endswith(".ckpt") else other_fs / "run" / target
    written.parent.mkdir(parents=True)
    harness, snapshot = tmp_path / "harness.py", tmp_path / f"{target}.before"
    harness.write_text(HARNESS)
    code = SAVES[target].format(path=str(written))
    proc = subprocess.run([sys.executable, str(harness), target, "2", str(snapshot), "--code", code],
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, (proc.stdout + proc.stderr)[-3000:]
    stale = temp_files(written.parent)
    assert len(stale) == 1 and stale[0].name.startswith(f".{target}.")  # the kill came mid-write
    assert written.read_bytes() == snapshot.read_bytes()  # the previous version, byte for byte
    assert safe_torch_load(written)


@pytest.mark.slow
def test_sigkill_while_last_ckpt_is_saved_leaves_the_previous_one_and_resume_completes(other_fs, tmp_path, data_dir):
    target = "last.ckpt"
    run = other_fs / "run"
    ckpts = run / "checkpoints"
    # killed in the second epoch's save of last.ckpt, its second save
    out, snapshot = _train_killed(tmp_path, run, data_dir, target, 2, "trainer.max_epochs=2",
                                  "callbacks.model_checkpoint.save_top_k=-1")
    written = ckpts / target
    stale = temp_files(written.parent)
    assert len(stale) == 1 and stale[0].name.startswith(f".{target}.")  # the kill came mid-write
    assert written.read_bytes() == snapshot.read_bytes()  # the previous version, byte for byte
    assert safe_torch_load(written)["epoch"] == 0
    _no_damage(run)

    out = _ok(_train(tmp_path, run, data_dir, "trainer.max_epochs=2", "export=true",
                     "callbacks.model_checkpoint.save_top_k=-1"))
    assert f"removed {stale[0]}" in out and not stale[0].exists()
    assert f"resume=auto: continuing from {ckpts / 'last.ckpt'}" in out
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2
    assert safe_torch_load(ckpts / "last.ckpt")["epoch"] == 1 and (run / "model.pth").stat().st_size > 0
    assert not temp_files(run) and not temp_files(ckpts)
    _no_damage(run)


# -- a full disk -----------------------------------------------------------------------------------------------
def test_atomic_writes_on_a_full_disk_raise_write_error_and_keep_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "model.pth"
    save_torch({"w": torch.ones(3)}, target)
    before = target.read_bytes()

    def full(obj, f, *args, **kwargs):
        f.write(b"PK partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(WriteError, match=r"cannot write .*model.pth: No space left on device \(the previous file"):
        save_torch({"w": torch.zeros(3)}, target)
    assert target.read_bytes() == before and not temp_files(tmp_path)
    with pytest.raises(WriteError, match="No space left on device"), atomic_path(tmp_path / "x.json"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert not (tmp_path / "x.json").exists() and not temp_files(tmp_path)


@pytest.mark.slow
def test_a_disk_that_fills_during_a_checkpoint_save_ends_the_run_in_one_sentence(other_fs, tmp_path, data_dir):
    run = other_fs / "run"
    ckpts = run / "checkpoints"
    _ok(_train(tmp_path, run, data_dir, "trainer.max_epochs=1"))
    before = {p: p.read_bytes() for p in ckpts.iterdir()}
    size = (ckpts / "last.ckpt").stat().st_size
    free = os.statvfs(other_fs).f_bavail * os.statvfs(other_fs).f_frsize
    (other_fs / "filler").write_bytes(b"\0" * (free - size // 2))  # room for the logs, not for a checkpoint

    proc = _train(tmp_path, run, data_dir, "trainer.max_epochs=2")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" not in out
    assert f"cannot write {ckpts}/" in out
    assert "No space left on device (the previous file, if any, is unchanged)" in out
    assert {p: p.read_bytes() for p in ckpts.iterdir()} == before  # the previous checkpoints, byte for byte
    assert not temp_files(ckpts) and not temp_files(run)
    assert not (run / LOCK).exists()  # released on the way out


# -- two runs into one directory -------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_run_into_the_same_directory_stops_and_the_first_completes(tmp_path, data_dir):
    run = tmp_path / "run"
    args = [*RUN, f"hydra.run.dir={run}", f"paths.data_dir={data_dir}", "trainer.max_epochs=1000",
            "trainer.limit_train_batches=4"]  # runs until it is stopped below, however slow the machine
    first = subprocess.Popen([sys.executable, "-m", "twincar.train", *args], cwd=tmp_path, env=_env(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (run / LOCK).exists():
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()[-3000:]
        time.sleep(0.05)
    owner = json.loads((run / LOCK).read_text())
    assert owner["pid"] == first.pid and owner["host"] == socket.gethostname()

    second = run_cli("twincar.train", *args, cwd=tmp_path)  # reaches the lock while the first trains
    out = second.stdout + second.stderr
    assert second.returncode == 1, out[-3000:]
    assert f"another training run (PID {first.pid} on {socket.gethostname()}" in out and "Traceback" not in out
    assert f"is writing into {run}: wait for it to end or train into another hydra.run.dir" in out

    history = run / "csv" / "metrics.csv"
    last = run / "checkpoints" / "last.ckpt"  # written whole (atomically) at each epoch's end
    while not last.exists() or safe_torch_load(last)["epoch"] < 1:  # the first goes on training: 2 epochs at least
        assert first.poll() is None and time.monotonic() < deadline + 240, first.stdout.read()[-3000:]
        time.sleep(0.2)
    first.send_signal(signal.SIGTERM)  # stops at the end of its batch, writing last.ckpt (preemption)
    rest, _ = first.communicate(timeout=600)
    assert first.returncode == 0, rest[-3000:]
    epochs = _epoch_rows(history, "train/loss")
    assert len(epochs) >= 2 and epochs == list(range(len(epochs)))  # each epoch once: one writer
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(f".{first.pid}." in p.name for p in events)  # one TensorBoard run: the first's
    assert not (run / LOCK).exists()


def test_the_lock_is_taken_once_released_and_a_stale_one_taken_over(tmp_path, caplog, monkeypatch):
    with run_lock(tmp_path) as held:
        assert held and json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
        with pytest.raises(RunLockError, match=rf"another training run \(PID {os.getpid()} on "), run_lock(tmp_path):
            pass
    assert not (tmp_path / LOCK).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then"}))
    with run_lock(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert f"taking over the lock {tmp_path / LOCK} of a run that is no longer running (PID {dead.pid}" in caplog.text
    (tmp_path / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "now"}))
    with pytest.raises(RunLockError, match="PID 1 on elsewhere"), run_lock(tmp_path):
        pass
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP rank of the run that holds it: not blocked
    with run_lock(tmp_path) as held:
        assert not held


# -- resume=auto with a damaged last.ckpt ----------------------------------------------------------------------
def _ckpt(path: Path, step: int) -> bytes:
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": step // 2, "global_step": step}, path)
    return path.read_bytes()


def test_empty_and_truncated_checkpoints_are_named_as_such(tmp_path):
    good = _ckpt(tmp_path / "a.ckpt", 1)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "cut.ckpt").write_bytes(good[: len(good) // 2])
    with pytest.raises(WeightsError, match=r"empty.ckpt is empty \(0 bytes\)$"):
        safe_torch_load(tmp_path / "empty.ckpt")
    with pytest.raises(WeightsError, match=r"cut.ckpt is truncated or damaged \(\d+ bytes; .*central directory\)"):
        safe_torch_load(tmp_path / "cut.ckpt")


def test_resume_auto_falls_back_to_the_newest_readable_checkpoint_or_says_how_to_start_fresh(tmp_path, caplog):
    caplog.set_level("INFO")
    last = tmp_path / "last.ckpt"
    good = _ckpt(last, 8)
    last.write_bytes(good[:100])
    older, newer = _ckpt(tmp_path / "epoch_000.ckpt", 4), _ckpt(tmp_path / "epoch_001.ckpt", 6)
    (tmp_path / "epoch_002.ckpt").write_bytes(b"")  # damaged too: skipped
    assert find_resume_checkpoint("auto", tmp_path) == tmp_path / "epoch_001.ckpt"
    assert (f"resume=auto: {last} is truncated or damaged (100 bytes; " in caplog.text
            and f"continuing from {tmp_path / 'epoch_001.ckpt'}, the newest readable checkpoint" in caplog.text)

    for name in ("epoch_000.ckpt", "epoch_001.ckpt"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ResumeError) as e:
        find_resume_checkpoint("auto", tmp_path)
    assert str(e.value).startswith(f"resume=auto: no checkpoint in {tmp_path} can be read (last.ckpt is truncated")
    assert "epoch_000.ckpt is empty (0 bytes)" in str(e.value)
    assert str(e.value).endswith("start this run afresh with resume=null (its checkpoints are then overwritten) or "
                                 "train into a new hydra.run.dir")
    assert last.read_bytes() == good[:100] and older and newer  # nothing written


def test_every_strategy_saves_through_the_atomic_checkpoint_io_unless_the_config_brings_its_own():
    from lightning.pytorch import Trainer
    from lightning.pytorch.plugins.io import TorchCheckpointIO
    from lightning.pytorch.plugins.precision import Precision

    from twincar.training.checkpoints import AtomicCheckpointIO, with_atomic_checkpoints

    (atomic,) = with_atomic_checkpoints(None)
    assert isinstance(atomic, AtomicCheckpointIO)
    trainer = Trainer(strategy="ddp", accelerator="cpu", devices=2, plugins=with_atomic_checkpoints(None),
                      logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # DDP (rank 0 saves) too
    precision, own = Precision(), TorchCheckpointIO()
    assert with_atomic_checkpoints(own) == [own]  # the user's own checkpoint IO is kept, alone
    plugins = with_atomic_checkpoints([precision])
    assert plugins[0] is precision and isinstance(plugins[1], AtomicCheckpointIO)
    assert with_atomic_checkpoints(None, {"_target_": "DDPStrategy", "checkpoint_io": {"_target_": "X"}}) == []
