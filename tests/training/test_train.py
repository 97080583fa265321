"""The training entry point as a user runs it: a subprocess, from another directory, offline."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from tests.conftest import SMALL_SPEC, run_cli
from twincar.evaluation.figures import read_epoch_history

SMALL_DATA = [f"data.synthetic.{k}={v}" for k, v in SMALL_SPEC.items()]
RUN_FILES = ["config.yaml", "metrics.json", "csv/metrics.csv", "split.json", "loss_curve.png", "accuracy_curve.png",
             "model.pth", "classes.txt", "checkpoints/last.ckpt", "train.log"]


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("metrics.json"))


def assert_counts(metrics: dict, stage: str, images: int) -> None:
    """``stage``'s accuracies are counts over the ``images`` it evaluated, and top-k can only add hits."""
    acc = metrics[f"{stage}/acc"]
    assert acc * images == pytest.approx(round(acc * images), abs=1e-4), (stage, acc, images)
    assert acc <= metrics[f"{stage}/acc_top3"] <= metrics[f"{stage}/acc_top5"], metrics


def smoke_images(run: Path) -> dict[str, int]:
    """How many images experiment=smoke validates and tests on: two batches of 8 at most."""
    split = json.loads((run / "split.json").read_text())
    return {"val": min(len(split["val"]), 16), "test": min(SMALL_SPEC["num_classes"] * SMALL_SPEC["test_per_class"],
                                                            16)}


def last_logged(run: Path, column: str) -> float:
    """The last value of ``column`` in the run's csv/metrics.csv."""
    with (run / "csv" / "metrics.csv").open(newline="") as f:
        return [float(r[column]) for r in csv.DictReader(f) if r.get(column)][-1]


def read_tensorboard(run_dir: Path) -> tuple[dict[str, str], dict[str, list[float]]]:
    """(hparams, scalars) from a run's TensorBoard event files."""
    hparams, scalars = {}, {}
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        try:
            content = acc.PluginTagToContent("hparams").get("_hparams_/session_start_info")
        except KeyError:  # this event file (e.g. of the final test) holds no hparams
            content = None
        if content:
            info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
            hparams.update({k: v.string_value or v.number_value or v.bool_value for k, v in info.hparams.items()})
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return hparams, scalars


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_dir) -> tuple[Path, object]:
    cwd = tmp_path_factory.mktemp("smoke")
    proc = run_cli("twincar.train", "experiment=smoke", f"paths.data_dir={data_dir}", *SMALL_DATA, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc


@pytest.mark.slow
def test_smoke_run_writes_every_artefact_in_its_run_directory(smoke_run):
    cwd, proc = smoke_run
    (run,) = run_dirs(cwd / "outputs")
    assert run.parent == cwd / "outputs" / "runs"
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    assert list((run / "checkpoints").glob("epoch_*.ckpt"))
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    metrics = json.loads((run / "metrics.json").read_text())
    for stage, images in smoke_images(run).items():
        assert_counts(metrics, stage, images)
        for name in ("acc", "acc_top3", "acc_top5", "precision_macro", "recall_macro", "f1_macro", "loss"):
            # metrics.json holds what the final validate/test logged, not another computation
            assert metrics[f"{stage}/{name}"] == pytest.approx(last_logged(run, f"{stage}/{name}"), abs=1e-6), name
        assert math.isfinite(metrics[f"{stage}/loss"])
    # one epoch: the best checkpoint is that epoch's, and validating it again gives the same accuracy
    assert metrics["epochs"] == 1 and metrics["val/acc_best"] == pytest.approx(metrics["val/acc"], abs=1e-6)
    assert Path(metrics["best_checkpoint"]).is_file()
    assert "TensorBoard:" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_smoke_run_exports_torchvision_weights_and_class_names(smoke_run):
    import torchvision

    cwd, _ = smoke_run
    (run,) = run_dirs(cwd / "outputs")
    names = (run / "classes.txt").read_text().splitlines()
    assert len(names) == SMALL_SPEC["num_classes"] and names[0] == "Audi S4 Sedan 2012"
    tv = torchvision.models.resnet50(num_classes=len(names))
    tv.load_state_dict(torch.load(run / "model.pth", weights_only=True), strict=True)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["hyper_parameters"]["class_names"] == names
    assert ckpt["hyper_parameters"]["preprocess"]["image_size"] == 64


@pytest.mark.slow
def test_smoke_run_logs_per_epoch_metrics_and_hparams(smoke_run):
    cwd, _ = smoke_run
    (run,) = run_dirs(cwd / "outputs")
    hparams, scalars = read_tensorboard(run)
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_top3", "val/acc_top5",
                "val/precision_macro", "val/recall_macro", "val/f1_macro", "val/acc_best", "test/acc"):
        assert tag in scalars, tag
    assert "hp_metric" not in scalars  # Lightning's placeholder of -1 is off
    assert scalars["lr/backbone"] and scalars["lr/head"]  # tags named by parameter group, not by optimizer
    assert hparams["optimizer/momentum"] == "n/a"  # an Adam run has SGD's column too, so a sweep's runs line up
    assert hparams["choice/optimizer"] == "adam" and hparams["optimizer/lr"] == pytest.approx(1e-3)
    assert "experiment=smoke" in hparams["overrides"]


@pytest.mark.slow
def test_sweep_writes_one_directory_per_job_with_its_hparams(smoke_sweep):
    tmp_path, proc = smoke_sweep  # -m optimizer=adam,sgd experiment=smoke test=false
    runs = run_dirs(tmp_path / "outputs")
    assert [r.name for r in runs] == ["0", "1"] and runs[0].parent == runs[1].parent
    assert runs[0].parent.parent == tmp_path / "outputs" / "multiruns"
    assert f"tensorboard --logdir {runs[0].parent.resolve()}" in proc.stdout + proc.stderr  # the sweep's folder
    chosen, columns = [], []
    for run in runs:
        hparams, scalars = read_tensorboard(run)
        chosen.append(hparams["choice/optimizer"])
        columns.append(set(hparams))
        assert "lr/head" in scalars and not [t for t in scalars if t.startswith("lr-")]  # they overlay
        saved = json.loads((run / "metrics.json").read_text())
        assert scalars["val/acc_best"][-1] == pytest.approx(saved["val/acc_best"], abs=1e-6)
        assert saved["val/acc_best"] == pytest.approx(scalars["val/acc"][0], abs=1e-6)  # one epoch: its val/acc
        assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "accuracy_curve.png").is_file()
        assert "test/acc" not in saved  # test=false
    assert chosen == ["adam", "sgd"]
    assert columns[0] == columns[1] and "optimizer/momentum" in columns[0]  # every hparam a column of both runs


@pytest.mark.slow  # a subprocess importing torch, Lightning and Hydra: about 9 s on 2 cores
def test_offline_without_weights_says_what_to_pass(tmp_path, data_dir):
    proc = run_cli("twincar.train", "experiment=smoke", "model.pretrained=resnet50.a1_in1k",
                   f"paths.data_dir={data_dir}", *SMALL_DATA, cwd=tmp_path)
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert "pass model.weights=/path/to/weights.pth (or .safetensors) or model.pretrained=false" in out
    assert "Traceback" not in out


@pytest.mark.slow  # a subprocess importing torch, Lightning and Hydra: about 8 s on 2 cores
def test_missing_dataset_root_says_what_to_pass(tmp_path):
    proc = run_cli("twincar.train", "experiment=smoke", "data=stanford_cars", f"data.root={tmp_path}/nowhere",
                   "model.pretrained=false", cwd=tmp_path)
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert f"dataset root {tmp_path}/nowhere does not exist: pass data.root=PATH" in out
    assert "Traceback" not in out


@pytest.mark.slow
def test_a_short_run_on_the_embedded_data_learns_well_above_chance(tmp_path, data_dir):
    # The default embedded set: 14 classes (7 models x 2 years), chance accuracy 1/14 = 0.071.
    # The full pipeline (seed augmentation, Adam, cosine), with a ResNet-10-T for speed, 8 epochs (about 45 s on
    # 2 cores). Measured: val/acc_best 0.411, test/acc of that checkpoint 0.329, train/acc 0.065 -> 0.387.
    # Bar: more than three times chance on both splits.
    proc = run_cli("twincar.train", "model.name=resnet10t", "trainer.max_epochs=8", f"paths.data_dir={data_dir}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = run_dirs(tmp_path / "outputs")
    metrics = json.loads((run / "metrics.json").read_text())
    chance = 1 / 14
    assert metrics["val/acc_best"] >= 3.5 * chance, metrics
    assert metrics["test/acc"] >= 3 * chance, metrics
    # and it is learning, not luck: train accuracy rose over the run
    train_acc = read_epoch_history(run / "csv" / "metrics.csv")["train/acc"]
    assert train_acc[max(train_acc)] > train_acc[0] + 0.15


@pytest.mark.slow
def test_ddp_with_two_processes_writes_one_run(tmp_path, data_dir):
    # DDP on the CPU (gloo): the same code path as multi-GPU nodes, minus SyncBatchNorm (GPU only). A tiny network:
    # the run's layout and reduced metrics are checked, not what it learns.
    proc = run_cli("twincar.train", "experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                   "trainer.sync_batchnorm=false", "model.name=test_resnet", "data.image_size=32",
                   f"paths.data_dir={data_dir}", *SMALL_DATA, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = run_dirs(tmp_path / "outputs")  # rank 1 writes into rank 0's run directory, not its own
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 1
    for stage in ("val", "test"):  # rank 0 logged and wrote the metrics reduced over both processes
        assert metrics[f"{stage}/acc"] == pytest.approx(last_logged(run, f"{stage}/acc"), abs=1e-6)
        assert metrics[f"{stage}/acc"] <= metrics[f"{stage}/acc_top3"] <= metrics[f"{stage}/acc_top5"]
    assert (run / "model.pth").is_file() and (run / "checkpoints" / "last.ckpt").is_file()


def compose_train(tmp_path, data_dir, *overrides: str):
    from hydra import compose, initialize_config_module

    with initialize_config_module("twincar.conf", version_base="1.3"):
        return compose("train", overrides=[
            "experiment=smoke", "model.name=resnet18", "~callbacks.rich_progress_bar", f"paths.root_dir={tmp_path}",
            f"paths.data_dir={data_dir}", f"paths.output_dir={tmp_path}/run", *SMALL_DATA, *overrides,
        ])


@pytest.mark.slow
def test_train_function_runs_mixup_cutmix_with_label_smoothing(tmp_path, data_dir):
    """train(cfg) as a sweeper or notebook calls it: strong augmentation (soft targets) end to end."""
    from twincar.train import train

    metrics = train(compose_train(tmp_path, data_dir, "augmentation=strong", "model.label_smoothing=0.1",
                                  "export=false"))
    assert not (tmp_path / "run" / "model.pth").exists()  # export=false
    for stage, images in smoke_images(tmp_path / "run").items():
        assert_counts(metrics, stage, images)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["val/acc"] == pytest.approx(metrics["val/acc"])
    train_loss = read_epoch_history(tmp_path / "run" / "csv" / "metrics.csv")["train/loss"][0]
    assert 0 < train_loss < 10  # soft-target cross-entropy over 6 classes: finite, near log(6)


@pytest.mark.slow
def test_resume_from_a_checkpoint_and_refuse_one_of_other_classes(tmp_path, data_dir):
    from twincar.errors import TwinCarError
    from twincar.train import train

    train(compose_train(tmp_path / "a", data_dir))
    last = tmp_path / "a" / "run" / "checkpoints" / "last.ckpt"
    resumed = train(compose_train(tmp_path / "b", data_dir, f"ckpt_path={last}", "trainer.max_epochs=2"))
    saved = json.loads((tmp_path / "b" / "run" / "metrics.json").read_text())
    assert saved["epochs"] == 2 and saved["val/acc"] == pytest.approx(resumed["val/acc"])
    # one more epoch of 2 steps (experiment=smoke) on top of the checkpoint's 2, not 2 epochs from scratch
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2
    b_last = torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert b_last["global_step"] == 4
    with pytest.raises(TwinCarError, match=r"trained on other classes than the data has \(6 classes against 4, "):
        train(compose_train(tmp_path / "c", data_dir, f"ckpt_path={last}", "data.synthetic.num_classes=4"))
