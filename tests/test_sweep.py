"""Sweeps as a cluster user runs them: through submitit (locally here), and an Optuna search."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SMALL_SPEC, run_cli

SMALL_DATA = [f"data.synthetic.{k}={v}" for k, v in SMALL_SPEC.items()]
TINY = ["experiment=smoke", "model.name=test_resnet", "data.image_size=32", "~callbacks.rich_progress_bar",
        "test=false", "export=false", *SMALL_DATA]


def test_slurm_launcher_takes_its_resources_from_the_trainer():
    from hydra import compose, initialize_config_module

    with initialize_config_module("twincar.conf", version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                                          "trainer.num_nodes=2", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    # Lightning's SLURMEnvironment requires one task per device: SLURM_NTASKS_PER_NODE == trainer.devices
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.partition == "gpu" and launcher.max_num_timeout > 0  # requeued after a time limit


@pytest.mark.slow
def test_submitit_local_ddp_sweep_runs_each_job_with_its_own_processes(tmp_path, data_dir):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = run_cli("twincar.train", "-m", "hydra/launcher=submitit_local", "optimizer=adam,sgd", "trainer=ddp",
                   "trainer.accelerator=cpu", "trainer.devices=2", "trainer.sync_batchnorm=false",
                   f"paths.data_dir={data_dir}", *TINY, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [j.name for j in jobs] == ["0", "1"]
    for job, optimizer in zip(jobs, ["adam", "sgd"], strict=True):
        assert f"optimizer={optimizer}" in (job / ".hydra" / "overrides.yaml").read_text()
        metrics = json.loads((job / "metrics.json").read_text())
        # one epoch: the best checkpoint is that epoch's, and the final validate on it gives the same accuracy
        assert metrics["epochs"] == 1 and metrics["val/acc_best"] == pytest.approx(metrics["val/acc"], abs=1e-6)
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert not list(job.glob("*rank*"))
    logs = list((sweep / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2  # each job ran as its own submitit job


@pytest.mark.slow
def test_optuna_search_records_a_failed_trial_and_goes_on(tmp_path, data_dir):
    optuna = pytest.importorskip("optuna")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    # An odd global batch makes every trial that picks augmentation=strong (Mixup/CutMix) raise.
    # With the config's sampler seed the 3 trials are: strong (fails), none, none.
    db = tmp_path / "study.db"
    proc = run_cli("twincar.train", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3", "data.batch_size=7",
                   f"hydra.sweeper.storage=sqlite:///{db}", f"paths.data_dir={data_dir}", *TINY, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Failed experiment: " in out
    assert "Mixup/CutMix needs an even batch, got 7: use an even data.batch_size" in out

    study = optuna.load_study(study_name="twincar", storage=f"sqlite:///{db}")  # the study is in the file
    states = [t.state.name for t in study.trials]
    assert states.count("FAIL") == 1 and states.count("COMPLETE") == 2, states
    assert study.trials[0].params["augmentation"] == "strong"
    searched = set(study.trials[1].params)
    assert searched == {"optimizer.lr", "optimizer.weight_decay", "optimizer.head_lr_mult", "augmentation"}

    (sweep,) = (tmp_path / "outputs" / "multiruns").iterdir()
    best = [json.loads((sweep / str(t.number) / "metrics.json").read_text())["val/acc_best"]
            for t in study.trials if t.state.name == "COMPLETE"]
    assert study.best_value == pytest.approx(max(best))  # what train() returned: val/acc_best
    assert (sweep / "optimization_results.yaml").is_file()
