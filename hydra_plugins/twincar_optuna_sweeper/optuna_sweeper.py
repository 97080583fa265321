"""The Hydra Sweeper plugin: Hydra only instantiates plugins defined below ``hydra_plugins``. The search itself is
:class:`twincar.training.search.Search` (imported when a sweep starts, so Hydra's plugin scan stays light)."""

from __future__ import annotations

from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class TwinCarOptunaSweeper(Sweeper):
    """Optuna >= 5 search with pruning, shared RDB/journal storage and resumable studies (see the config
    ``hydra/sweeper/twincar_optuna.yaml`` for the options)."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)

    def sweep(self, arguments: list[str]) -> Any:
        from twincar.training.search import Search

        parallel = type(self.launcher).__name__ != "BasicLauncher"  # the basic launcher runs jobs in this process
        search = Search(**self.options, launcher=self.launcher, sweep_dir=self.config.hydra.sweep.dir,
                        parallel=parallel)
        return search.run(arguments)
