"""Comparing runs in TensorBoard, MLflow and W&B: the tags, hparams columns and hints a sweep relies on."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
from timm.optim import create_optimizer_v2

from tests.conftest import SMALL_SPEC, run_cli
from twincar.models.classifier import param_groups
from twincar.models.finetune import layer_decay_groups
from twincar.training.tracking import GroupLearningRates, tensorboard_logdir


def compose_train(*overrides: str):
    from hydra import compose, initialize_config_module

    with initialize_config_module("twincar.conf", version_base="1.3"):
        return compose("train", overrides=["paths.output_dir=run", *overrides])


def test_adam_and_sgd_runs_log_the_same_hparams_columns():
    from twincar.training.steps import hyperparameters

    adam = hyperparameters(compose_train("optimizer=adam", "scheduler=cosine"))
    sgd = hyperparameters(compose_train("optimizer=sgd", "scheduler=step"))
    assert set(adam) == set(sgd)  # one column per key for every run of a sweep
    assert adam["optimizer/momentum"] == "n/a" and sgd["optimizer/momentum"] == pytest.approx(0.9)
    assert adam["scheduler/gamma"] == "n/a" and sgd["scheduler/gamma"] == pytest.approx(0.1)
    assert sgd["scheduler/warmup_epochs"] == "n/a" and adam["scheduler/warmup_epochs"] == 1
    assert adam["optimizer/lr"] == pytest.approx(1e-3) and adam["model/name"] == sgd["model/name"] == "resnet50"


def logged_rates(optimizer) -> dict[str, float]:
    logged: dict[str, float] = {}
    module = SimpleNamespace(log_dict=lambda values, **kw: logged.update(values))
    GroupLearningRates().on_train_epoch_start(SimpleNamespace(optimizers=[optimizer]), module)
    return logged


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_learning_rates_are_tagged_by_parameter_group_not_by_optimizer(opt):
    model = timm.create_model("test_resnet", num_classes=4)
    groups = param_groups(model, lr=0.01, weight_decay=1e-4, head_lr_mult=10.0)
    rates = logged_rates(create_optimizer_v2(groups, opt=opt, lr=0.01))
    assert rates == {"lr/backbone": pytest.approx(0.01), "lr/head": pytest.approx(0.1)}


def test_with_layer_decay_lr_backbone_is_the_top_layers_rate():
    model = timm.create_model("test_vit", num_classes=4)
    groups = layer_decay_groups(model, lr=1e-3, weight_decay=0.05, head_lr_mult=2.0, layer_decay=0.5)
    rates = logged_rates(create_optimizer_v2(groups, opt="adamw", lr=1e-3))
    assert rates == {"lr/backbone": pytest.approx(1e-3 * 0.5), "lr/head": pytest.approx(2e-3)}
    assert min(g["lr"] for g in groups if g["name"].startswith("backbone")) < 1e-4  # lower layers decay


def test_the_tensorboard_hint_names_the_folder_that_was_written(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    outputs, elsewhere = tmp_path / "outputs", tmp_path / "scratch" / "myrun"
    below = SimpleNamespace(loggers=[TensorBoardLogger(outputs / "runs" / "r1", name="tensorboard", version="")])
    assert tensorboard_logdir(below, outputs) == outputs.resolve()  # beside every other run of outputs/
    away = SimpleNamespace(loggers=[TensorBoardLogger(elsewhere, name="tensorboard", version="")])
    assert tensorboard_logdir(away, outputs) == (elsewhere / "tensorboard").resolve()  # hydra.run.dir=elsewhere
    assert tensorboard_logdir(SimpleNamespace(loggers=[CSVLogger(elsewhere)]), outputs) is None


# -- MLflow and W&B ------------------------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend, artifacts served by the server); yields its URL."""
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    pytest.importorskip("mlflow", minversion="3")
    port, root = free_port(), tmp_path / "server"
    root.mkdir()
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    proc = subprocess.Popen([exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", str(root / "artifacts")],
                            cwd=root, stdout=subprocess.DEVNULL, stderr=(root / "server.log").open("w"))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer on /health within 60 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


TINY_RUN = ["experiment=smoke", "model.name=test_resnet", "data.image_size=32", "~callbacks.rich_progress_bar",
            "test=false", "trainer.max_epochs=2", *[f"data.synthetic.{k}={v}" for k, v in SMALL_SPEC.items()]]


@pytest.mark.slow
def test_one_run_logs_to_an_mlflow_server_and_an_offline_wandb_folder_beside_tensorboard(
        tmp_path, data_dir, mlflow_server, monkeypatch):
    """logger=many: TensorBoard, CSV, MLflow (a real server) and W&B (offline: no API key) from one run."""
    from mlflow.tracking import MlflowClient

    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    proc = run_cli("twincar.train", "logger=many", f"logger.mlflow.tracking_uri={mlflow_server}", "optimizer=sgd",
                   f"paths.data_dir={data_dir}", *TINY_RUN, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    client = MlflowClient(tracking_uri=mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("twincar").experiment_id])
    params = run.data.params
    assert params["choice/optimizer"] == "sgd" and float(params["optimizer/momentum"]) == 0.9
    assert params["model/name"] == "test_resnet" and params["paths/data_dir"] == str(data_dir)  # the whole config
    assert "optimizer=sgd" in run.info.run_name  # named after the overrides
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) >= 2  # each epoch (and the final validate)
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 2  # one per epoch
    assert len(client.get_metric_history(run.info.run_id, "lr/head")) == 2
    best = json.loads(next(tmp_path.glob("outputs/runs/*/metrics.json")).read_text())["best_checkpoint"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts >= {"checkpoints", "model_card.json"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == [
        f"checkpoints/{Path(best).name}"]
    card = json.loads(Path(client.download_artifacts(run.info.run_id, "model_card.json", str(tmp_path))).read_text())
    assert card["architecture"] == "test_resnet"
    (run_dir,) = tmp_path.glob("outputs/runs/*/wandb/offline-run-*")  # W&B, offline, from the same run
    (records,) = run_dir.glob("run-*.wandb")
    data = records.read_bytes()
    for name in (b"val/acc", b"train/loss", b"lr/head", b"choice/optimizer"):
        assert name in data, name
    assert list(tmp_path.glob("outputs/runs/*/tensorboard/events.out.tfevents.*"))  # and TensorBoard beside them


@pytest.mark.slow  # 7 s of imports (MLflow, W&B, Optuna, SQLAlchemy); trains nothing
def test_outside_services_are_checked_before_training_in_one_sentence(tmp_path):
    """Issue 26's probes: an MLflow server that does not answer, a W&B save_dir or an Optuna storage under a file,
    a storage file that is not a database: each one sentence from the step that builds it, before training."""
    from twincar.errors import TwinCarError
    from twincar.training.search import open_storage
    from twincar.training.steps import instantiate_all

    (tmp_path / "file").write_text("x")
    (tmp_path / "bad.db").write_text("not a database")
    loggers = compose_train("logger=mlflow", "logger.mlflow.tracking_uri=http://127.0.0.1:9").logger
    with pytest.raises(TwinCarError, match=r"^logger.mlflow.tracking_uri=http://127.0.0.1:9: no MLflow server answers "
                                           r"there within 10 s .*training did not start"):
        instantiate_all({"mlflow": loggers.mlflow})
    wandb = compose_train("logger=wandb", f"logger.wandb.save_dir={tmp_path / 'file' / 'w'}").logger.wandb
    with pytest.raises(TwinCarError, match=rf"^logger.wandb.save_dir=.*: {tmp_path / 'file'} is a file, not a folder"):
        instantiate_all({"wandb": wandb})
    for url in (f"journal:{tmp_path / 'file' / 'j.log'}", f"sqlite:///{tmp_path / 'file' / 'x.db'}"):
        with pytest.raises(TwinCarError, match=rf"^hydra.sweeper.storage=.*{tmp_path / 'file'} is a file, not a"):
            open_storage(url)
    with pytest.raises(TwinCarError, match=r"bad.db cannot be opened as an Optuna storage \(.*file is not a database"):
        open_storage(f"sqlite:///{tmp_path / 'bad.db'}")
