"""Comparing runs in TensorBoard, MLflow and W&B: the tags, hparams columns and hints a sweep relies on."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import timm
from timm.optim import create_optimizer_v2

from twincar.models.classifier import param_groups
from twincar.models.finetune import layer_decay_groups
from twincar.training.tracking import GroupLearningRates, tensorboard_logdir


def compose_train(*overrides: str):
    from hydra import compose, initialize_config_module

    with initialize_config_module("twincar.conf", version_base="1.3"):
        return compose("train", overrides=["paths.output_dir=run", *overrides])


def test_adam_and_sgd_runs_log_the_same_hparams_columns():
    from twincar.training.run import hyperparameters

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
