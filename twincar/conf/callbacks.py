"""Hydra callbacks of the TwinCar configs (``hydra.callbacks`` in ``conf/hydra/default.yaml``)."""

from __future__ import annotations

import sys

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from twincar.files import WriteError, check_writable_dir


class RunDirCheck(Callback):
    """Before Hydra creates the run (or sweep) directory, check that it can, and stop with one sentence (exit
    code 1) instead of Hydra's traceback when it cannot."""

    @staticmethod
    def _check(directory: str, option: str) -> None:
        try:
            check_writable_dir(directory, option)
        except WriteError as e:
            print(f"error: {e}: pass a writable {option}=DIR", file=sys.stderr)
            sys.exit(1)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")
