"""Fine-tuning tools: weight EMA, backbone freezing, layer decay, compile, the LR finder, debug presets."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.nn.modules.batchnorm import _BatchNorm

from tests.training.test_train import compose_train
from twincar.data.datamodule import CarsDataModule
from twincar.models.classifier import CarClassifier
from twincar.models.finetune import (
    EMA,
    CompiledForward,
    FreezeBackbone,
    backbone_modules,
    ema_decay,
    layer_decay_groups,
)
from twincar.models.loading import load_model


def tiny_dm(root, tmp_path, **kw) -> CarsDataModule:
    return CarsDataModule(root=str(root), image_size=32, batch_size=8, eval_batch_size=16, num_workers=0,
                          pin_memory=False, split_dir=str(tmp_path / "splits"), **kw)


def tiny_model(dm: CarsDataModule, **kw) -> CarClassifier:
    dm.prepare_data()
    return CarClassifier(dm.class_names, name="resnet18", preprocess=dm.preprocess.to_dict(),
                         optimizer={"opt": "adam", "lr": 1e-2}, scheduler={"name": "none"}, **kw)


def tiny_trainer(tmp_path, *callbacks, **kw) -> L.Trainer:
    args = dict(max_epochs=1, limit_train_batches=4, limit_val_batches=1, logger=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, accelerator="cpu")
    return L.Trainer(callbacks=list(callbacks), **{**args, **kw})


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- EMA --------------------------------------------------------------------------------------------
def test_ema_decay_warms_up_to_the_configured_decay():
    assert ema_decay(1, decay=0.999) == pytest.approx(1 - 2 ** -0.75)  # 0.405: forgets the init quickly
    assert ema_decay(19, decay=0.999) == pytest.approx(0.894, abs=1e-3)
    assert ema_decay(10 ** 6, decay=0.999) == 0.999
    assert ema_decay(1, decay=0.9, warmup=False) == 0.9
    with pytest.raises(ValueError, match="model.ema.decay"):
        EMA(decay=1.5)


class WeightsSeenByValidation(L.Callback):
    """The head weights the validation loop ran with (callbacks given to the Trainer run before EMA's)."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.fc = pl_module.model.fc.weight.detach().clone()


@pytest.mark.slow
def test_ema_weights_are_validated_checkpointed_and_left_in_the_model(tmp_path, small_root):
    dm = tiny_dm(small_root, tmp_path)
    model = tiny_model(dm, ema={"decay": 0.9})
    probe = WeightsSeenByValidation()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max", save_last=True)
    trainer = tiny_trainer(tmp_path, probe, ckpt_cb)
    trainer.fit(model, datamodule=dm)
    assert any(isinstance(cb, EMA) for cb in trainer.callbacks)

    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    ema, raw = ckpt["state_dict"], ckpt["current_model_state"]
    # after a few steps the average is not the raw weights
    assert not torch.allclose(ema["model.fc.weight"], raw["model.fc.weight"])
    assert not torch.allclose(ema["model.layer4.1.bn2.running_mean"], raw["model.layer4.1.bn2.running_mean"])
    # validation ran on the averaged weights, and the model ends holding them
    torch.testing.assert_close(probe.fc, ema["model.fc.weight"])
    final = model.state_dict()
    for k in ("model.fc.weight", "model.conv1.weight", "model.layer4.1.bn2.running_var"):
        torch.testing.assert_close(final[k], ema[k])
    # what predict/eval load from the best checkpoint is the average
    loaded = load_model(ckpt_cb.best_model_path)
    best = torch.load(ckpt_cb.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
    torch.testing.assert_close(loaded.model.fc.weight, best["model.fc.weight"])


@pytest.mark.slow
def test_ema_off_by_default_and_validate_after_fit_uses_the_checkpoint_as_is(tmp_path, small_root):
    dm = tiny_dm(small_root, tmp_path)
    assert tiny_model(dm).configure_callbacks() == []
    model = tiny_model(dm, ema={"decay": 0.9})
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = tiny_trainer(tmp_path, ckpt_cb)
    trainer.fit(model, datamodule=dm)
    model.model.fc.weight.data.zero_()  # validate(ckpt_path=...) must bring back the checkpoint's EMA weights
    trainer.validate(model, datamodule=dm, ckpt_path=ckpt_cb.last_model_path, verbose=False)
    saved = torch.load(ckpt_cb.last_model_path, map_location="cpu", weights_only=True)["state_dict"]
    torch.testing.assert_close(model.model.fc.weight, saved["model.fc.weight"])


@pytest.mark.slow
def test_train_with_ema_exports_the_average_as_model_pth(tmp_path, data_dir):
    from twincar.train import train

    metrics = train(compose_train(tmp_path, data_dir, "model.ema.decay=0.9"))
    run = tmp_path / "run"
    best = torch.load(json.loads((run / "metrics.json").read_text())["best_checkpoint"], map_location="cpu",
                      weights_only=True)
    exported = torch.load(run / "model.pth", weights_only=True)
    torch.testing.assert_close(exported["fc.weight"], best["state_dict"]["model.fc.weight"])
    assert not torch.allclose(exported["fc.weight"], best["current_model_state"]["model.fc.weight"])
    # the logged val/acc is the average's: evaluating the exported model.pth reproduces it
    from tests.trained import compose
    from twincar.evaluation.recipes import evaluate

    again = evaluate(compose("eval", [f"ckpt={run / 'model.pth'}", f"paths.output_dir={tmp_path / 'eval'}",
                                      "progress=false", "data.split=val"]))
    assert again["val/acc"] == pytest.approx(metrics["val/acc"], abs=1e-6)
    assert again["val/loss"] == pytest.approx(metrics["val/loss"], abs=1e-4)


# -- freeze then unfreeze ---------------------------------------------------------------------------
class Snapshots(L.Callback):
    def __init__(self):
        self.at_epoch_end: list[dict[str, torch.Tensor]] = []

    def on_fit_start(self, trainer, pl_module):
        self.start = state(pl_module.model)

    def on_train_epoch_end(self, trainer, pl_module):
        self.at_epoch_end.append(state(pl_module.model))


@pytest.mark.slow
def test_frozen_backbone_keeps_weights_and_bn_statistics_then_trains(tmp_path, small_root):
    dm = tiny_dm(small_root, tmp_path)
    model = tiny_model(dm, freeze_backbone_epochs=1)
    snaps = Snapshots()
    tiny_trainer(tmp_path, snaps, max_epochs=2, limit_train_batches=3).fit(model, datamodule=dm)
    head = {"fc.weight", "fc.bias"}
    start, frozen, unfrozen = snaps.start, *snaps.at_epoch_end
    backbone = [k for k in start if k not in head and not k.endswith("num_batches_tracked")]
    assert any(k.endswith("running_mean") for k in backbone)
    for k in backbone:  # weights and BatchNorm statistics untouched during the frozen epoch
        torch.testing.assert_close(frozen[k], start[k], msg=k)
    assert not torch.allclose(frozen["fc.weight"], start["fc.weight"])  # the head learned
    changed = [k for k in backbone if not torch.allclose(unfrozen[k], frozen[k])]
    assert "conv1.weight" in changed and "layer1.0.bn1.running_mean" in changed  # then everything trains
    assert all(p.requires_grad for p in model.parameters())
    bns = [m for m in backbone_modules(model.model) if isinstance(m, _BatchNorm)]
    assert bns and all(m.training for m in bns)


def test_freeze_option_adds_the_callback_and_refuses_negative_epochs(tmp_path, small_root):
    model = tiny_model(tiny_dm(small_root, tmp_path), freeze_backbone_epochs=2)
    (cb,) = model.configure_callbacks()
    assert isinstance(cb, FreezeBackbone) and cb.epochs == 2
    with pytest.raises(ValueError, match="freeze_backbone_epochs"):
        FreezeBackbone(-1)


# -- layer-wise lr decay ----------------------------------------------------------------------------
def test_layer_decay_scales_learning_rates_from_head_to_stem():
    import timm

    net = timm.create_model("resnet18", num_classes=5)
    groups = layer_decay_groups(net, lr=1.0, weight_decay=0.01, head_lr_mult=10.0, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert len(lr_of) == sum(1 for _ in net.parameters())  # every parameter once
    head, stem, last_block = net.fc.weight, net.conv1.weight, net.layer4[1].conv2.weight
    assert lr_of[id(head)] == 10.0  # head: lr * head_lr_mult
    assert lr_of[id(stem)] < lr_of[id(last_block)] < 1.0
    assert lr_of[id(last_block)] / lr_of[id(stem)] >= 0.5 ** -4  # at least 4 layers apart, halved each
    assert decay_of[id(stem)] == 0.01 and decay_of[id(net.bn1.weight)] == 0.0
    with pytest.raises(ValueError, match="optimizer.layer_decay"):
        layer_decay_groups(net, lr=1.0, weight_decay=0.0, head_lr_mult=1.0, layer_decay=0.0)


def test_layer_decay_option_reaches_the_optimizer(tmp_path, small_root):
    dm = tiny_dm(small_root, tmp_path)
    model = CarClassifier(dm.class_names, name="resnet18", scheduler={"name": "none"},
                          optimizer={"opt": "adamw", "lr": 1e-3, "layer_decay": 0.7, "weight_decay": 0.05})
    lrs = sorted({g["lr"] for g in model.configure_optimizers().param_groups})
    assert len(lrs) >= 5 and lrs[-1] == pytest.approx(1e-3) and lrs[0] < 1e-3 * 0.7 ** 3


# -- compile ----------------------------------------------------------------------------------------
def test_compile_falls_back_to_eager_with_a_message(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("backend not available")

    monkeypatch.setattr(torch, "compile", broken)
    model = CarClassifier(["a", "b"], name="resnet18", compile=True).eval()
    x = torch.rand(2, 3, 32, 32)
    with caplog.at_level("WARNING"):
        out = model(x)
    assert "torch.compile is unavailable" in caplog.text and "backend not available" in caplog.text
    torch.testing.assert_close(out, model.model(x))
    assert set(model.state_dict()) == set(CarClassifier(["a", "b"], name="resnet18").state_dict())


@pytest.mark.slow
def test_compiled_network_matches_eager(tmp_path):
    model = CarClassifier(["a", "b", "c"], name="resnet18", compile=True).eval()
    x = torch.rand(2, 3, 32, 32)
    out = model(x)
    if model._compiled.failed:
        pytest.skip(f"torch.compile cannot run here: {model._compiled.failed}")
    assert model._compiled.compiled is not None
    torch.testing.assert_close(out, model.model(x), rtol=1e-3, atol=1e-3)
    assert not any(k.startswith("_orig_mod") or "._orig_mod" in k for k in model.state_dict())


def test_compiled_forward_is_not_copied_by_weight_averaging():
    import copy

    fwd = CompiledForward(torch.nn.Linear(2, 2))
    assert copy.deepcopy(fwd) is None


# -- LR finder --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lr_find_writes_its_plot_and_prints_a_suggestion_without_training(tmp_path, data_dir, capsys):
    from twincar.train import train

    result = train(compose_train(tmp_path, data_dir, "tune=lr_find", "tune.num_training=20", "tune.min_lr=1e-5",
                                 "tune.max_lr=1", "tune.early_stop_threshold=null"))
    run = tmp_path / "run"
    assert (run / "lr_find.png").stat().st_size > 5000
    curve = json.loads((run / "lr_find.json").read_text())
    assert len(curve["lr"]) == 20 and curve["lr"][0] < curve["lr"][-1]
    out = capsys.readouterr().out
    assert "Suggested learning rate" in out and f"optimizer.lr={result['lr_find/suggestion']:.3g}" in out
    assert result["lr_find/suggestion"] == curve["suggestion"] and curve["suggestion"] in curve["lr"]  # a tried lr
    for trained in ("metrics.json", "model.pth", "checkpoints"):
        assert not (run / trained).exists(), trained


# -- the ablation table -----------------------------------------------------------------------------
def test_hierarchy_accuracy_on_known_predictions():
    from twincar.models.metrics import hierarchy_accuracy

    names = ["Audi S4 Sedan 2007", "Audi S4 Sedan 2012", "BMW M3 Coupe 2012"]
    logits = torch.tensor([
        [0.0, 5.0, 1.0],  # true 0 (S4 2007): predicted S4 2012 -> family right, year wrong
        [0.0, 5.0, 1.0],  # true 1: right
        [9.0, 1.0, 3.0],  # true 1: predicted S4 2007 -> family right; within the family, 2007 > 2012 -> year wrong
        [5.0, 1.0, 3.0],  # true 2 (M3): predicted S4 -> family wrong; M3 has one year: not in the year score
    ])
    acc = hierarchy_accuracy(logits, torch.tensor([0, 1, 1, 2]), names)
    assert acc == {"acc": 0.25, "acc_family": 0.75, "acc_year_given_family": pytest.approx(1 / 3)}


def test_ablation_tool_names_a_directory_without_runs(tmp_path, capsys):
    from twincar.ablation import main

    assert main([str(tmp_path)]) == 1
    assert f"no training runs below {tmp_path}" in capsys.readouterr().err


# -- debug presets ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_debug_overfit_drives_the_training_loss_near_zero(tmp_path, data_dir):
    from twincar.evaluation.figures import read_epoch_history
    from twincar.train import train

    train(compose_train(tmp_path, data_dir, "debug=overfit", "trainer.overfit_batches=1", "trainer.max_epochs=20",
                        "trainer.detect_anomaly=false", "optimizer.lr=3e-3", "data.image_size=32", "test=false",
                        "export=false"))
    losses = read_epoch_history(tmp_path / "run" / "csv" / "metrics.csv")["train/loss"]
    assert losses[0] > 1.0  # about log(6) at the start
    assert losses[max(losses)] < 0.1  # memorised: below 0.1 after 20 steps on the same batch


@pytest.mark.slow
def test_debug_fdr_limit_and_profiler_presets(tmp_path, data_dir):
    from twincar.train import train

    metrics = train(compose_train(tmp_path / "fdr", data_dir, "debug=fdr"))
    val_images = min(len(json.loads((tmp_path / "fdr" / "run" / "split.json").read_text())["val"]), 8)  # 1 batch
    assert metrics["val/acc"] * val_images == pytest.approx(round(metrics["val/acc"] * val_images), abs=1e-4)
    # fast_dev_run: one batch per loop, no best checkpoint chosen, the weights as trained are evaluated
    assert json.loads((tmp_path / "fdr" / "run" / "metrics.json").read_text())["best_checkpoint"] == ""
    assert not list((tmp_path / "fdr" / "run").glob("checkpoints/epoch_*.ckpt"))

    limited = train(compose_train(tmp_path / "limit", data_dir, "debug=limit"))
    assert json.loads((tmp_path / "limit" / "run" / "metrics.json").read_text())["epochs"] == 3
    n_test = 6 * 4  # limit_test_batches=3 batches of 8: every test image of the small set, once
    assert limited["test/acc"] * n_test == pytest.approx(round(limited["test/acc"] * n_test), abs=1e-4)
    assert limited["test/acc"] == pytest.approx(json.loads((tmp_path / "limit" / "run" / "metrics.json").read_text())[
        "test/acc"])

    train(compose_train(tmp_path / "prof", data_dir, "debug=profiler", "trainer.limit_train_batches=2"))
    report = (tmp_path / "prof" / "run" / "fit-profiler.txt").read_text()
    assert "run_training_epoch" in report and "Total" in report
