"""Every option of every config group composes, and what it configures can be built."""

from __future__ import annotations

import inspect
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import hydra
import lightning as L
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from twincar.data.datamodule import CarsDataModule
from twincar.models.classifier import CarClassifier

CONF = resources.files("twincar") / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__"))
TRAIN_GROUPS = [g for g in GROUPS if g not in ("paths", "model_source")]  # model_source: eval, calibrate and index


def options(group: str) -> list[str]:
    return sorted(p.name[:-5] for p in (CONF / group).iterdir() if p.name.endswith(".yaml"))


def make_cfg(tmp_path, *overrides: str):
    with initialize_config_module("twincar.conf", version_base="1.3"):
        return compose("train", overrides=[
            f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run", *overrides
        ])


def test_every_group_has_options():
    expected = {"augmentation", "callbacks", "data", "debug", "experiment", "logger", "model", "optimizer",
                "paths", "precision", "scheduler", "trainer", "tune", "model_source"}
    assert expected <= set(GROUPS)
    assert options("optimizer") == ["adam", "adamw", "sgd"]
    assert options("scheduler") == ["cosine", "none", "step"]
    assert options("augmentation") == ["none", "seed", "strong"]
    assert options("precision") == ["16-mixed", "32-true", "bf16-mixed"]
    assert options("trainer") == ["cpu", "ddp", "default", "gpu"]
    assert options("data") == ["cars", "stanford_cars", "synthetic"]
    assert {"recipe448", "seed_twincars", "smoke", "abl_base", "abl_96"} <= set(options("experiment"))
    assert options("debug") == ["default", "fdr", "limit", "overfit", "profiler"]
    assert options("tune") == ["lr_find"]


def test_default_config_trains_offline_on_the_embedded_data(tmp_path):
    cfg = make_cfg(tmp_path)
    assert cfg.data.synthetic.num_classes == 14
    assert cfg.model.pretrained is False  # nothing to download
    assert cfg.model.name == "resnet50"
    assert cfg.data.root == f"{tmp_path}/data/synthetic"


@pytest.mark.parametrize("group", TRAIN_GROUPS)
def test_every_option_composes_and_resolves(tmp_path, group):
    for option in options(group):
        extra = ["data=stanford_cars"] if group == "experiment" else []
        cfg = make_cfg(tmp_path, f"{group}={option}", *extra)
        OmegaConf.resolve(cfg)  # no dangling interpolation


@pytest.mark.parametrize("option", options("augmentation"))
def test_augmentation_options_build_a_datamodule(tmp_path, option):
    cfg = make_cfg(tmp_path, f"augmentation={option}")
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    assert isinstance(dm, CarsDataModule)
    assert dm.aug.mixes == (option == "strong")
    assert dm.preprocess.image_size == cfg.data.image_size


@pytest.mark.parametrize("optimizer", options("optimizer"))
@pytest.mark.parametrize("scheduler", options("scheduler"))
def test_optimizer_and_scheduler_options_build(tmp_path, optimizer, scheduler):
    cfg = make_cfg(tmp_path, f"optimizer={optimizer}", f"scheduler={scheduler}", "model.name=resnet18")
    model = CarClassifier(
        ["a", "b", "c"], **OmegaConf.to_container(cfg.model),
        optimizer=OmegaConf.to_container(cfg.optimizer), scheduler=OmegaConf.to_container(cfg.scheduler),
    )
    model._trainer = SimpleNamespace(estimated_stepping_batches=100, max_epochs=10)
    out = model.configure_optimizers()
    opt = out["optimizer"] if isinstance(out, dict) else out
    expected = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}[optimizer]
    assert type(opt).__name__ == expected
    lrs = {g["name"]: g.get("initial_lr", g["lr"]) for g in opt.param_groups}  # before any warmup
    assert lrs["head"] == pytest.approx(cfg.optimizer.lr * cfg.optimizer.head_lr_mult)
    assert lrs["backbone"] == pytest.approx(cfg.optimizer.lr)
    assert (scheduler == "none") == (not isinstance(out, dict))


@pytest.mark.parametrize("trainer", options("trainer"))
@pytest.mark.parametrize("precision", options("precision"))
def test_trainer_and_precision_options_are_valid_trainer_arguments(tmp_path, trainer, precision):
    cfg = make_cfg(tmp_path, f"trainer={trainer}", f"precision={precision}")
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert hydra.utils.get_class(kwargs.pop("_target_")) is L.Trainer
    inspect.signature(L.Trainer).bind(**kwargs)  # every key is a Trainer argument
    assert cfg.trainer.precision == precision
    if trainer in ("cpu", "default") and precision != "16-mixed":  # this machine has no GPU
        hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)


def test_ddp_devices_override(tmp_path):
    cfg = make_cfg(tmp_path, "trainer=ddp", "trainer.devices=4")
    assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.sync_batchnorm) == ("ddp", 4, True)


def test_callbacks_and_loggers_instantiate(tmp_path):
    cfg = make_cfg(tmp_path)
    built = {}
    for section in (cfg.callbacks, cfg.logger):
        for name, conf in section.items():
            built[name] = hydra.utils.instantiate(conf)
            assert isinstance(built[name], hydra.utils.get_class(conf._target_)), name
    assert set(built) == {"model_checkpoint", "step_checkpoint", "rich_progress_bar", "lr_monitor", "tensorboard",
                          "csv"}
    best, step = built["model_checkpoint"], built["step_checkpoint"]
    assert (best.dirpath, best.monitor, best.mode, best.save_top_k, best.save_last) == (
        f"{tmp_path}/run/checkpoints", "val/acc", "max", 1, True)
    assert (step.dirpath, step.save_top_k, step.save_last) == (f"{tmp_path}/run/checkpoints", 0, True)
    assert step._every_n_train_steps == 200
    # one run, one directory: no version_N subfolders
    assert Path(built["tensorboard"].log_dir) == tmp_path / "run" / "tensorboard"
    assert Path(built["csv"].log_dir) == tmp_path / "run" / "csv"


def test_recipe448_is_the_published_recipe(tmp_path):
    cfg = make_cfg(tmp_path, "experiment=recipe448", "data=stanford_cars")
    assert cfg.data.image_size == 448 and 48 <= cfg.data.batch_size <= 64
    assert cfg.optimizer.opt == "sgd" and cfg.optimizer.momentum == 0.9
    assert cfg.optimizer.head_lr_mult == 10 and cfg.optimizer.weight_decay == 5e-4
    assert cfg.scheduler.name == "cosine" and cfg.scheduler.warmup_epochs == 5
    assert cfg.trainer.max_epochs == 80 and cfg.model.label_smoothing == 0.1


def test_seed_twincars_is_the_original_recipe(tmp_path):
    cfg = make_cfg(tmp_path, "experiment=seed_twincars", "data=stanford_cars")
    assert cfg.optimizer.opt == "adam" and cfg.trainer.max_epochs == 20 and cfg.data.image_size == 224
    assert cfg.augmentation.rotation == 10 and list(cfg.augmentation.color_jitter) == [0.3, 0.3, 0.3, 0.02]


def test_smoke_only_shrinks_and_keeps_the_data_choice(tmp_path):
    cfg = make_cfg(tmp_path, "experiment=smoke", "data=stanford_cars", "data.root=/some/copy",
                   "model.pretrained=false")
    assert cfg.data.root == "/some/copy" and cfg.data.synthetic is None
    assert cfg.trainer.max_epochs == 1 and cfg.trainer.limit_train_batches == 2
    assert cfg.optimizer.opt == "adam"  # the defaults are untouched


def compose_tool(name: str, *overrides: str):
    with initialize_config_module("twincar.conf", version_base="1.3"):
        return compose(name, overrides=list(overrides))


def test_synthetic_data_is_stanford_cars_but_for_what_it_generates(tmp_path):
    real, synthetic = (OmegaConf.to_container(make_cfg(tmp_path, f"data={d}").data) for d in ("stanford_cars",
                                                                                              "synthetic"))
    assert list(synthetic) == list(real)  # every option, in the same order
    differ = {k for k in real if real[k] != synthetic[k]}
    assert differ == {"root", "format", "image_size", "eval_batch_size", "num_workers", "synthetic"}
    assert synthetic["format"] == "devkit" and synthetic["synthetic"]["num_classes"] == 14
    assert make_cfg(tmp_path, "data=synthetic").model.pretrained is False  # offline
    assert make_cfg(tmp_path, "data=stanford_cars").model.pretrained == "resnet50.a1_in1k"


@pytest.mark.parametrize("tool, split", [("eval", "test"), ("calibrate", "val"), ("index", "train")])
def test_eval_calibrate_and_index_take_the_model_and_its_data_alike(tool, split):
    shared = ("ckpt", "classes", "run_config", "augmentation", "device")
    cfg = compose_tool(tool, "ckpt=runs/r/model.pth", "data.root=/copy")
    base = compose_tool("eval", "ckpt=runs/r/model.pth", "data.root=/copy")
    assert [cfg[k] for k in shared] == [base[k] for k in shared] == ["runs/r/model.pth", None, None, None, "auto"]
    assert dict(cfg.data) == {"root": "/copy", "eval_batch_size": None, "num_workers": None, "split": split}
    assert compose_tool(tool, "ckpt=m.ckpt", "data.split=val").data.split == "val"  # the documented command lines
    chosen = compose_tool(tool, "ckpt=m.ckpt", "data=synthetic", "data.split=val", "paths.output_dir=out")
    assert chosen.data.split == "val" and chosen.data.root.endswith("/data/synthetic") and chosen.data.num_workers == 2
    assert OmegaConf.is_missing(compose_tool(tool), "ckpt")  # the one required option


@pytest.mark.parametrize("name", ["train", "eval", "calibrate", "index", "export"])
def test_no_config_sets_a_key_nothing_reads(name):
    overrides = ["ckpt=m.ckpt"] if name != "train" else ["data=stanford_cars", "tune=lr_find", "debug=limit"]
    cfg = OmegaConf.to_container(compose_tool(name, *overrides))
    assert "task_name" not in cfg and "name" not in cfg.get("tune", {})
    assert not {"cache", "decode_device", "cache_on_device"} & set(cfg.get("data", {}))


@pytest.mark.parametrize("tool", ["train", "eval", "calibrate", "index"])
def test_every_tool_that_reads_data_refuses_a_removed_flag_before_composing(tool, monkeypatch, caplog):
    import importlib

    monkeypatch.setattr("sys.argv", [f"twincar.{tool}", "ckpt=m.ckpt", "data=synthetic", "data.decode_device=cuda"])
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(f"twincar.{tool}").main()
    assert stop.value.code == 1
    assert caplog.messages == ["data.decode_device=cuda was removed: use data.pipeline=gpu_decode "
                               "(one of files, cache, gpu_decode, gpu_cache, stream)"]
