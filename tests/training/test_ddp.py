"""DDP as an ablation needs it: sweeps that launch one set of processes per job, a global batch,
evaluation that counts every image once. Two gloo processes on the CPU stand in for GPUs."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import run_cli
from twincar.data.sampling import BatchSizeError, eval_sampler, per_device_batch_size
from twincar.training.distributed import PerRankSeed, job_command

# 7 classes: 7 val images (one per class), an odd number, so padded shards would repeat one.
SPEC7 = dict(num_classes=7, train_per_class=12, test_per_class=4, seed=0)
DATA7 = [f"data.synthetic.{k}={v}" for k, v in SPEC7.items()]
TINY = ["model.name=test_resnet", "data.image_size=32", "~callbacks.rich_progress_bar"]


def test_global_batch_is_split_across_processes_or_refused():
    assert per_device_batch_size(64, 1) == 64
    assert per_device_batch_size(64, 4) == 16
    with pytest.raises(BatchSizeError, match=r"data.batch_size=30 is the global batch .* use a multiple of 4"):
        per_device_batch_size(30, 4)


def test_eval_shards_cover_every_image_exactly_once():
    dataset = list(range(7))
    shards = [list(eval_sampler(dataset, 2, rank)) for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == dataset  # no padding, no repeat
    assert [len(s) for s in shards] == [4, 3]
    assert eval_sampler(dataset, 1, 0) is None  # a single process: the plain loader


def test_each_rank_draws_its_own_augmentation_but_shards_stay_aligned(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "42")  # the distributed sampler's seed: must stay the same on all ranks
    draws = []
    for rank in (0, 1):
        torch.manual_seed(42)  # seed_everything: the same on every rank
        PerRankSeed(42).setup(SimpleNamespace(world_size=2, global_rank=rank), None, "fit")
        draws.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1])
    assert os.environ["PL_GLOBAL_SEED"] == "42"
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    PerRankSeed(42).setup(SimpleNamespace(world_size=1, global_rank=0), None, "fit")  # one process: untouched
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.slow
def test_a_global_batch_that_does_not_split_stops_before_any_process_starts(tmp_path, data_dir):
    proc = run_cli("twincar.train", "experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                   "trainer.sync_batchnorm=false", "data.batch_size=7", f"paths.data_dir={data_dir}", *DATA7, *TINY,
                   cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert ("data.batch_size=7 is the global batch and does not divide across 2 processes "
            "(trainer.devices x trainer.num_nodes): use a multiple of 2") in out
    assert "Traceback" not in out and "[rank: 1]" not in out


def _hydra_job(tmp_path: Path, file_logging: bool = True):
    """The parts of a sweep job's Hydra config that job_command reads."""
    return OmegaConf.create({
        "overrides": {"hydra": ["hydra.mode=MULTIRUN", "hydra.sweep.dir=/sweeps/x", "hydra/launcher=submitit_local",
                                "hydra.verbose=true"],
                      "task": ["optimizer=sgd", "experiment=smoke", "data.root='/my data'"]},
        "runtime": {"output_dir": str(tmp_path / "sweep" / "1"), "cwd": str(tmp_path),
                    "config_sources": [{"path": "twincar.conf", "schema": "pkg", "provider": "main"},
                                       {"path": "/extra/conf", "schema": "file", "provider": "command-line"}]},
        "job": {"name": "train", "config_name": "train"},
        "job_logging": {"handlers": {"console": {}, "file": {}} if file_logging else {"console": {}},
                        "root": {"handlers": ["console", "file"] if file_logging else ["console"]}},
    })


def test_rank_command_is_a_single_run_of_the_job_in_its_directory(tmp_path):
    command, cwd = job_command(1, _hydra_job(tmp_path))
    assert command[:3] == [sys.executable, "-m", "twincar.train"]
    assert "-m" not in command[3:] and "--multirun" not in command
    assert command[3:7] == ["--config-name", "train", "--config-dir", "/extra/conf"]
    assert ["optimizer=sgd", "experiment=smoke", "data.root='/my data'"] == [
        c for c in command if c.startswith(("optimizer=", "experiment=", "data.root="))]
    assert f'hydra.run.dir="{tmp_path}/sweep/1"' in command and "hydra.mode=RUN" in command
    assert "hydra.verbose=true" in command  # the job's own Hydra options stay
    assert not [c for c in command if "sweep.dir" in c or "launcher" in c or "MULTIRUN" in c]
    assert "hydra.output_subdir=null" in command  # no second .hydra/
    assert "~hydra.job_logging.handlers.file" in command and "hydra.job_logging.root.handlers=[console]" in command
    assert cwd == str(tmp_path)
    command, _ = job_command(1, _hydra_job(tmp_path, file_logging=False))
    assert not [c for c in command if "job_logging" in c]


@pytest.mark.slow
def test_ddp_sweep_gives_one_directory_per_job_and_counts_each_val_image_once(tmp_path, data_dir):
    # The command: 2 jobs x 2 gloo processes. Lightning alone re-runs `-m` in rank 1, which
    # then runs the whole sweep again. Whole epochs (no limit on train batches) to check the batch.
    batch = 8
    proc = run_cli("twincar.train", "-m", "experiment=smoke", "optimizer=adam,sgd", "trainer=ddp",
                   "trainer.accelerator=cpu", "trainer.devices=2", "trainer.sync_batchnorm=false",
                   "trainer.limit_train_batches=1.0", f"data.batch_size={batch}", "test=false", "export=false",
                   f"paths.data_dir={data_dir}", *DATA7, *TINY, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert out.count("Launching 2 jobs locally") == 1
    (sweep,) = (tmp_path / "outputs" / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1"]
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["multiruns"]  # no stray runs/ folder

    from twincar.data.datamodule import CarsDataModule
    from twincar.inference.predictor import Predictor
    from twincar.models.metrics import classification_metrics

    for job, optimizer in zip(jobs, ["adam", "sgd"], strict=True):
        assert f"optimizer={optimizer}" in (job / ".hydra" / "overrides.yaml").read_text()
        assert not list(job.glob("*rank*")), "rank 1 wrote files"
        assert len({f.name.split(".")[4] for f in (job / "tensorboard").glob("events.out.tfevents.*")}) == 1  # 1 pid
        metrics = json.loads((job / "metrics.json").read_text())
        split = json.loads((job / "split.json").read_text())
        assert len(split["val"]) == 7
        # global batch: one optimizer step per `batch` training images, as on a single device
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == math.ceil(len(split["train"]) / batch)

        # the DDP val metrics equal a single-process evaluation of the same checkpoint on the 7 images
        dm = CarsDataModule(root=str(data_dir / "synthetic"), image_size=32, synthetic=SPEC7 | {
            "width": 128, "height": 96, "difficulty": 0.5}, split_dir=str(data_dir / "splits"))
        dm.setup()
        assert sorted(s.path.name for s in dm.val_set.samples) == sorted(split["val"])
        predictor = Predictor.load(metrics["best_checkpoint"], device="cpu")
        x = np.stack([predictor.prepare(s.path) for s in dm.val_set.samples])
        labels = torch.tensor([s.label for s in dm.val_set.samples])
        expected = classification_metrics(7, prefix="val/")(torch.from_numpy(predictor.logits(x)), labels)
        for name, value in expected.items():  # top-1 based (top-k ranks of near-equal logits may differ in float)
            if "top" not in name:
                assert metrics[name] == pytest.approx(value.item(), abs=1e-6), name
