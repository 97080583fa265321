"""Relative paths are taken from the launch directory, whatever hydra.job.chdir is."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig


def _composed(overrides: list[str], cwd: Path):
    with initialize_config_module("twincar.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    cfg.hydra.runtime.cwd = str(cwd)
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_relative_options_resolve_from_the_launch_directory(tmp_path):
    from twincar.runs import resolve_launch_paths

    launch = tmp_path / "launch"
    cfg = _composed(["data=stanford_cars", "data.root=cars/copy", "model.weights=w/resnet50.pth",
                     "hydra.job.chdir=true", "paths.output_dir=/runs/x"], launch)
    try:
        resolve_launch_paths(cfg)
        assert cfg.data.root == str(launch / "cars" / "copy")
        assert cfg.model.weights == str(launch / "w" / "resnet50.pth")
        assert cfg.paths.data_dir == f"{launch}/data"  # interpolated from root_dir, which is '.'
        assert cfg.data.split_dir == f"{launch}/data/splits"
        assert cfg.data.skipped_file == "/runs/x/skipped.txt"  # already absolute: unchanged
    finally:
        HydraConfig.instance().cfg = None
