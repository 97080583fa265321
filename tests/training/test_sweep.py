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


# -- Optuna (optuna >= 5, TwinCar's own sweeper) ------------------------------------------------------------
def test_the_optuna_sweeper_is_a_hydra_plugin_that_hparams_search_selects():
    from hydra import compose, initialize_config_module
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    with initialize_config_module("twincar.conf", version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=optuna", "paths.output_dir=run"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.twincar_optuna_sweeper.optuna_sweeper.TwinCarOptunaSweeper"
    assert "TwinCarOptunaSweeper" in [c.__name__ for c in Plugins.instance().discover(Sweeper)]
    assert cfg.hydra.sweeper.storage == "sqlite:///./outputs/optuna.db"  # persistent: a rerun continues the study
    assert cfg.optuna.monitor == "val/acc" and cfg.optuna.pruner._target_ == "optuna.pruners.MedianPruner"


def test_the_search_space_becomes_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from twincar.training.search import distributions

    space, fixed = distributions(["optimizer.lr=tag(log, interval(1e-4, 1e-1))", "augmentation=choice(none, seed)",
                                  "trainer.max_epochs=range(2, 8, 2)", "model.drop_rate=interval(0, 0.5)",
                                  "data.batch_size=16"])
    assert space["optimizer.lr"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert space["augmentation"] == CategoricalDistribution(["none", "seed"])
    assert space["trainer.max_epochs"] == IntDistribution(2, 6, step=2)
    assert space["model.drop_rate"] == FloatDistribution(0.0, 0.5)
    assert fixed == {"data.batch_size": "16"}


def test_a_finished_job_is_told_to_the_study_as_complete_pruned_or_failed(tmp_path):
    import optuna
    from hydra.core.utils import JobReturn, JobStatus

    from twincar.errors import TwinCarError
    from twincar.training.search import Search

    def job(status, value):
        ret = JobReturn()
        ret.status, ret.return_value = status, value
        return ret

    study = optuna.create_study(direction="maximize")
    search = Search(direction="maximize", study_name="s", storage="sqlite:///x.db", n_trials=1, n_jobs=1,
                    max_failure_rate=1.0, sampler=None, enqueue=[], params={}, launcher=None, sweep_dir=str(tmp_path),
                    parallel=False)
    outcomes = [search.tell(study, study.ask(), ret) for ret in (
        job(JobStatus.COMPLETED, 0.5), job(JobStatus.FAILED, optuna.TrialPruned("pruned after epoch 0")),
        job(JobStatus.FAILED, TwinCarError("Mixup/CutMix needs an even batch")), job(JobStatus.COMPLETED, None))]
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "FAIL", "FAIL"]
    assert study.best_value == 0.5 and outcomes[:2] == [None, None]
    assert str(outcomes[2]) == "Mixup/CutMix needs an even batch"


@pytest.mark.slow
def test_optuna_prunes_a_diverging_trial_and_a_rerun_continues_the_study(tmp_path, data_dir):
    optuna = pytest.importorskip("optuna", minversion="5")
    # Four known trials first; the last one's learning rate diverges (NaN val/loss from its first epoch), so the
    # median pruner, with three complete trials to compare, stops it before its last epoch.
    lrs = ["0.001", "0.002", "0.003", "1000000.0"]
    search = ["-m", "hparams_search=optuna", f"optimizer.lr=choice({', '.join(lrs)})", "trainer.max_epochs=2",
              "hydra.sweeper.enqueue=[" + ",".join(f"{{optimizer.lr:{lr}}}" for lr in lrs) + "]",
              "optuna.pruner.n_warmup_steps=0", f"paths.data_dir={data_dir}", *TINY]
    storage = f"sqlite:///{tmp_path}/outputs/optuna.db"  # the default: paths.log_dir/optuna.db
    proc = run_cli("twincar.train", *search, "hydra.sweeper.n_trials=4", cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    study = optuna.load_study(study_name="twincar", storage=storage)
    states = {t.params["optimizer.lr"]: t.state.name for t in study.trials}
    assert states == {0.001: "COMPLETE", 0.002: "COMPLETE", 0.003: "COMPLETE", 1e6: "PRUNED"}, states
    (diverged,) = [t for t in study.trials if t.state.name == "PRUNED"]
    assert list(diverged.intermediate_values) == [0]  # pruned after its first epoch of two
    assert "pruned after epoch 0" in proc.stdout + proc.stderr
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert all(len(t.intermediate_values) == 2 for t in complete)  # val/acc of each epoch, not of the final validate
    best = study.best_value

    (sweep,) = (tmp_path / "outputs" / "multiruns").iterdir()
    returned = [json.loads((sweep / str(t.number) / "metrics.json").read_text())["val/acc_best"] for t in complete]
    assert best == pytest.approx(max(returned))  # what train() returned: val/acc_best

    # The same command again: the study is loaded by name, the enqueued trials are not run twice.
    proc = run_cli("twincar.train", *search, "hydra.sweeper.n_trials=1", cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    study = optuna.load_study(study_name="twincar", storage=storage)
    assert len(study.trials) == 5 and study.best_value >= best
    assert f"study twincar in {storage}: 4 trials so far, 1 more" in proc.stdout + proc.stderr
    results = sorted((tmp_path / "outputs" / "multiruns").glob("*/optimization_results.yaml"))[-1].read_text()
    assert "n_trials: 5" in results and f"best_value: {study.best_value}" in results
