"""One small trained run per test session, shared by the eval, explain and compare tests.

``trained_run(tmp_path_factory, data_dir)`` trains a ResNet-18 on the small synthetic set (6 classes, 64 px,
2 epochs, every val/test image) through ``twincar.train.train(cfg)`` once, and returns its run directory.
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import SMALL_SPEC, session_once

SMALL_DATA = [f"data.synthetic.{k}={v}" for k, v in SMALL_SPEC.items()]


def compose(config: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("twincar.conf", version_base="1.3"):
        return hydra_compose(config, overrides=overrides)


def trained_run(tmp_path_factory, data_dir: Path) -> Path:
    """The run directory of the session's trained model (trained on first use, once for all xdist workers)."""
    def train_once(root: Path) -> None:
        from twincar.train import train

        train(compose("train", [
            "experiment=smoke", "model.name=resnet18", "~callbacks.rich_progress_bar", f"paths.root_dir={root}",
            f"paths.data_dir={data_dir}", f"paths.output_dir={root}/run", *SMALL_DATA, "trainer.max_epochs=2",
            "trainer.limit_train_batches=null", "trainer.limit_val_batches=null", "trainer.limit_test_batches=null",
            "optimizer.lr=0.003",
        ]))

    return session_once(tmp_path_factory, "trained", train_once) / "run"
