"""Shared fixtures: the real devkit files, a small generated dataset, and a way to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEVKIT = REPO.parent / "shared" / "stanford_cars_devkit"

# Small synthetic spec used by most tests: 6 classes = 3 models x 2 years.
SMALL_SPEC = dict(num_classes=6, train_per_class=12, test_per_class=4, seed=0)


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
    """A data_dir shared by the tests of one session, so each synthetic spec is generated once."""
    return tmp_path_factory.mktemp("data")


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
