"""Shared fixtures: the real devkit files, a small generated dataset, and a way to run the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
DEVKIT = REPO.parent / "shared" / "stanford_cars_devkit"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest workers on the cores: one compute thread each (torch, and the CLIs a test starts),
    # not two each fighting over two cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Small synthetic spec used by most tests: 6 classes = 3 models x 2 years.
SMALL_SPEC = dict(num_classes=6, train_per_class=12, test_per_class=4, seed=0)


# Fixtures that train a model when first used (session or module scope, so set up before the guard below).
TRAINING_FIXTURES = {"trained_run", "smoke_run", "smoke_sweep", "run", "val_eval"}


@pytest.fixture(autouse=True)
def _fast_tests_train_nothing(request, monkeypatch):
    """`make test-fast` (-m "not slow") trains nothing: a test that fits a model without the slow mark fails."""
    if request.node.get_closest_marker("slow") is None:
        from lightning.pytorch import Trainer

        trains = TRAINING_FIXTURES & set(request.fixturenames)
        assert not trains, f"{request.node.nodeid} uses {sorted(trains)}, which train: mark it @pytest.mark.slow"

        def refuse(*args, **kwargs):
            raise AssertionError(f"{request.node.nodeid} trains a model (Trainer.fit): mark it @pytest.mark.slow")

        monkeypatch.setattr(Trainer, "fit", refuse)


def session_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder ``name`` that ``build(folder)`` filled once for the whole test session.

    Under pytest-xdist (``make test`` runs two workers) every worker has its own session fixtures; the first worker to
    ask builds the folder beside the workers' temporary folders while the others wait for it, so a model is trained
    once per ``make test``, as it would be without workers."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            folder.mkdir(exist_ok=True)
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def devkit() -> Path:
    """The original Stanford Cars devkit annotation files (shared with every developer and CI)."""
    if not (DEVKIT / "cars_meta.mat").is_file():
        message = f"real devkit files not found at {DEVKIT}"
        if os.environ.get("CI"):  # CI always has shared/ beside the clone: a missing copy is a failure
            pytest.fail(message)
        pytest.skip(message)
    return DEVKIT


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data_dir shared by the tests of one session (and its xdist workers), so each synthetic spec is generated once
    (generation is atomic: two workers asking for one spec at once get one copy)."""
    return session_once(tmp_path_factory, "data", lambda folder: None)


@pytest.fixture(scope="session")
def small_root(data_dir) -> Path:
    """A small generated dataset in the Stanford Cars devkit layout."""
    from twincar.data.synthetic import SyntheticSpec, generate

    return generate(data_dir / "small", SyntheticSpec(**SMALL_SPEC))


def run_cli(module: str, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` offline, as a user would, and return the finished process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf_home"), "PYTHONUNBUFFERED": "1"}
    env.pop("TWINCAR_ROOT", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


# -- inference, export and demo (issue 6) -------------------------------------------------------------------
TINY_NAMES = ["Audi S4 Sedan 2012", "Audi S4 Sedan 2007", "BMW M3 Coupe 2012", "Aston Martin V8 Vantage Coupe 2012",
              "Ford F-150 Regular Cab 2007", "Ford F-150 Regular Cab 2012"]


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """An exported model as training writes it: ``model.pth`` (a random resnet18 over 6 classes, 64 px input)
    with its ``model_card.json`` and ``classes.txt`` beside it. Returns the ``model.pth`` path."""
    import timm
    import torch

    from twincar.data.classes import write_classes_txt
    from twincar.data.preprocess import Preprocess
    from twincar.models.card import build_model_card, write_model_card
    from twincar.models.checkpoint import export_state_dict

    d = tmp_path_factory.mktemp("tiny_export")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=len(TINY_NAMES))
    write_model_card(d, build_model_card(TINY_NAMES, Preprocess(image_size=64), "resnet18"))
    write_classes_txt(TINY_NAMES, d / "classes.txt")
    return export_state_dict(model, d / "model.pth")


@pytest.fixture(scope="session")
def car_images(tmp_path_factory) -> list[Path]:
    """Three small readable photos of various sizes and modes (JPEG, PNG, grayscale), one in a subfolder."""
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("car_images")
    rng = np.random.default_rng(0)
    (d / "sub").mkdir()
    paths = [d / "a.jpg", d / "b.png", d / "sub" / "c.png"]
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(paths[0])
    Image.fromarray(rng.integers(0, 255, (100, 70, 3), dtype=np.uint8)).save(paths[1])
    Image.fromarray(rng.integers(0, 255, (50, 50), dtype=np.uint8), mode="L").save(paths[2])
    return paths


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir) -> Path:
    """The run directory of the session's one trained model (see tests/trained.py): model.pth, classes.txt,
    model_card.json, checkpoints/last.ckpt, metrics.json (no .hydra/: train(cfg) is called directly)."""
    from tests import trained

    return trained.trained_run(tmp_path_factory, data_dir)


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory, data_dir) -> tuple[Path, subprocess.CompletedProcess]:
    """``python -m twincar.train -m optimizer=adam,sgd experiment=smoke test=false`` as a user runs it (a ResNet-18,
    one batch of training and one of validation per job, no export), once per session from a fresh directory:
    returns that directory and the finished process. The sweep tests of training and of compare read it."""
    def sweep(cwd: Path) -> None:
        proc = run_cli("twincar.train", "-m", "optimizer=adam,sgd", "experiment=smoke", "model.name=resnet18",
                       "test=false", "export=false", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                       f"paths.data_dir={data_dir}", *[f"data.synthetic.{k}={v}" for k, v in SMALL_SPEC.items()],
                       cwd=cwd)
        record = {"args": proc.args, "returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}
        (cwd.parent / "smoke_sweep.json").write_text(json.dumps(record))

    cwd = session_once(tmp_path_factory, "sweep", sweep)
    proc = subprocess.CompletedProcess(**json.loads((cwd.parent / "smoke_sweep.json").read_text()))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc
