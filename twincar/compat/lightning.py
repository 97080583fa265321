"""Lightning's private parts TwinCar relies on: the DDP subprocess launcher's command, the averaged model of
``WeightAveraging``, and the CSV logger's writer state."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from twincar.compat import require

SUPPORTED = ">=2.6,<2.7"
require("lightning", SUPPORTED, "DDP relaunch, EMA and CSV resume code")


@contextlib.contextmanager
def subprocess_launch(command: Callable[[int], tuple[list[str], str]]) -> Iterator[list]:
    """Inside the block, Lightning's subprocess DDP launcher starts each child rank with ``command(local_rank)``
    (the argv and the working directory, as Lightning's ``_hydra_subprocess_cmd`` returns them) instead of the
    original ``sys.argv``; yields the list of launchers that started children (see :func:`child_processes`)."""
    from lightning.pytorch.strategies.launchers import subprocess_script

    launcher_cls = subprocess_script._SubprocessScriptLauncher
    original_cmd, original_call = subprocess_script._hydra_subprocess_cmd, launcher_cls._call_children_scripts
    launchers: list = []

    def call_children_scripts(launcher) -> None:
        original_call(launcher)
        launchers.append(launcher)

    subprocess_script._hydra_subprocess_cmd = command
    launcher_cls._call_children_scripts = call_children_scripts
    try:
        yield launchers
    finally:
        subprocess_script._hydra_subprocess_cmd = original_cmd
        launcher_cls._call_children_scripts = original_call


def child_processes(launcher) -> list:
    """The ``subprocess.Popen`` objects of the ranks a launcher started."""
    return list(launcher.procs)


def averaged_model(callback) -> object | None:
    """The averaged copy a ``WeightAveraging`` callback keeps during fit (None outside fit)."""
    return callback._average_model


def drop_averaged_model(callback) -> None:
    """Forget the averaged copy, so validate/test after fit evaluate their checkpoint untouched."""
    callback._average_model = None


def set_csv_columns(logger, columns: list[str]) -> None:
    """Tell a CSVLogger's writer which columns the metrics file already has (it rewrites them otherwise)."""
    logger.experiment.metrics_keys = sorted(columns)
