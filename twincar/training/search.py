"""Optuna search over the training config (``-m hparams_search=optuna``), on optuna's own API (optuna >= 5).

:class:`Search` is what the Hydra sweeper plugin (``hydra_plugins/twincar_optuna_sweeper``) runs: it creates or
loads the study by name in an RDB (``sqlite:///...``, ``postgresql://...``) or journal (``journal:PATH``) storage, so
rerunning the same command continues the study and parallel searches share it; it asks for a trial, launches it as
one Hydra job with ``optuna.trial=N`` and tells the study what the job returned (COMPLETE), that it was pruned
(PRUNED) or that it raised (FAIL). Inside the job, :class:`PruneTrial` reports ``val/acc`` to the study after every
validation and stops a trial the pruner gives up on. optuna is imported only when a search runs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig, OmegaConf

from twincar.errors import TwinCarError
from twincar.files import write_text

log = logging.getLogger(__name__)


def open_storage(url: str):
    """An optuna storage from a URL: ``journal:PATH`` is a journal file (safe on NFS, many processes); anything else
    an RDB URL (``sqlite:///PATH.db``, whose folder is created, ``postgresql://...``, ``mysql://...``)."""
    import optuna

    from twincar.files import check_writable_dir

    for prefix in ("journal:", "sqlite:///"):
        if url.startswith(prefix):  # a file under a file, or in a folder that cannot be written: one sentence
            check_writable_dir(Path(url.removeprefix(prefix)).parent, "hydra.sweeper.storage").mkdir(
                parents=True, exist_ok=True)
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
        if url.startswith("sqlite:///"):
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        return optuna.storages.RDBStorage(url)
    except Exception as e:  # sqlalchemy and optuna raise many types for a file that is not their database
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TwinCarError(f"hydra.sweeper.storage={url} cannot be opened as an Optuna storage ({first}): pass a "
                           "new file, or the study's own database") from e


def absolute_storage(url: str) -> str:
    """``url`` with a relative sqlite or journal file made absolute (from the launch directory), so that trials
    that run elsewhere (submitit, SLURM) open the same study."""
    for prefix in ("sqlite:///", "journal:"):
        if url.startswith(prefix) and not Path(url.removeprefix(prefix)).is_absolute():
            return prefix + str(Path(url.removeprefix(prefix)).absolute())
    return url


def distributions(arguments: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The search space from Hydra sweep overrides (``choice(...)``, ``interval(a, b)``, ``tag(log, interval(...))``,
    ``range(a, b, step)``) as optuna distributions, and the plain overrides that every trial gets as they are."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep, RangeSweep, Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        name = override.get_key_element()
        if not override.is_sweep_override():
            fixed[name] = override.get_value_element_as_str()
            continue
        value = override.value()
        if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
            space[name] = CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
        elif override.is_range_sweep():
            assert isinstance(value, RangeSweep)
            last = list(override.sweep_iterator())[-1]  # range(a, b, step) stops before b
            if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
                space[name] = FloatDistribution(float(value.start), float(last), step=float(value.step))
            else:
                space[name] = IntDistribution(int(value.start), int(last), step=int(value.step))
        else:
            assert isinstance(value, IntervalSweep)
            log_scale = "log" in value.tags
            if isinstance(value.start, int) and isinstance(value.end, int):
                space[name] = IntDistribution(value.start, value.end, log=log_scale)
            else:
                space[name] = FloatDistribution(float(value.start), float(value.end), log=log_scale)
    return space, fixed


def quoted(value: Any) -> str:
    """A value as a Hydra override sees it (strings quoted where the grammar needs it)."""
    if isinstance(value, str) and any(c in value for c in " ,()[]{}:='\""):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


class Search:
    """One invocation of a search: ``n_trials`` more trials of the study ``study_name`` in ``storage``."""

    def __init__(self, *, direction: str, study_name: str, storage: str, n_trials: int, n_jobs: int,
                 max_failure_rate: float, sampler: Any, enqueue: Sequence[Mapping] | None, params: Mapping | None,
                 launcher: Any, sweep_dir: str, parallel: bool):
        if not storage:
            raise TwinCarError("hydra.sweeper.storage is empty: pass sqlite:///PATH.db (or journal:PATH, or a "
                               "postgresql:// URL) so that the trials, and a rerun of the command, share the study")
        if not 0.0 <= max_failure_rate <= 1.0:
            raise TwinCarError(f"hydra.sweeper.max_failure_rate={max_failure_rate} must be within 0..1")
        self.direction, self.study_name, self.storage = direction, study_name, absolute_storage(storage)
        self.n_trials, self.max_failure_rate = int(n_trials), float(max_failure_rate)
        self.n_jobs = max(1, int(n_jobs)) if parallel else 1
        if int(n_jobs) > 1 and not parallel:
            log.warning("hydra.sweeper.n_jobs=%s needs a launcher that runs jobs elsewhere (hydra/launcher="
                        "submitit_local, slurm): running the trials one after another", n_jobs)
        self.sampler, self.enqueue = sampler, list(enqueue or [])
        self.params = dict(params or {})
        self.launcher, self.sweep_dir = launcher, Path(sweep_dir)
        self.job_idx = 0

    def run(self, arguments: Sequence[str]):
        """Run the trials; returns the study. A job that raised is a FAIL; more failures than
        ``max_failure_rate`` of the trials stop the search with the first error."""
        import optuna

        space, fixed = distributions([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        for name in fixed:
            space.pop(name, None)
        study = optuna.create_study(study_name=self.study_name, storage=open_storage(self.storage),
                                    sampler=self.sampler, direction=self.direction, load_if_exists=True)
        done = len(study.trials)
        for params in self.enqueue:  # known starting points, run first (once: a rerun skips those it has)
            study.enqueue_trial(OmegaConf.to_container(params) if isinstance(params, DictConfig) else dict(params),
                                skip_if_exists=True)
        log.info("study %s in %s: %d trials so far, %d more (%d at a time)", self.study_name, self.storage, done,
                 self.n_trials, self.n_jobs)
        base = [f"{k}={v}" for k, v in fixed.items()]
        base += [f"optuna.study_name={quoted(self.study_name)}", f"optuna.storage={quoted(self.storage)}"]

        def one(job_idx: int):
            trial = study.ask(fixed_distributions=space)
            overrides = [f"{k}={quoted(v)}" for k, v in trial.params.items()] + base + [f"optuna.trial={trial.number}"]
            (ret,) = self.launcher.launch([overrides], initial_job_idx=job_idx)
            return self.tell(study, trial, ret)

        if self.n_jobs == 1:
            outcomes = [one(i) for i in range(self.n_trials)]
        else:  # each worker launches its next trial as soon as its last one ends: no device waits for a batch
            with ThreadPoolExecutor(self.n_jobs) as pool:
                outcomes = list(pool.map(one, range(self.n_trials)))
        failures = [e for e in outcomes if isinstance(e, BaseException)]
        if failures and len(failures) / len(outcomes) > self.max_failure_rate:
            raise failures[0]
        self.write_results(study)
        return study

    def tell(self, study, trial, ret) -> BaseException | None:
        """Record a finished job in the study: its value, PRUNED or FAIL; returns the error of a failed job."""
        import optuna

        try:
            value = ret.return_value  # re-raises what the job raised
        except optuna.TrialPruned as pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            log.info("trial %d %s", trial.number, pruned)
            return None
        except Exception as error:  # the job failed; the search goes on (within max_failure_rate)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log.warning("Failed experiment: trial %d: %s", trial.number, error)
            return error
        if value is None or not math.isfinite(float(value)):
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log.warning("Failed experiment: trial %d returned %r, not a number", trial.number, value)
            return RuntimeError(f"trial {trial.number} returned {value!r}")
        study.tell(trial, float(value))
        return None

    def write_results(self, study) -> None:
        """``optimization_results.yaml`` in the sweep directory: the study, its size and its best trial so far."""
        import optuna

        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        results: dict[str, Any] = {"name": "optuna", "study_name": self.study_name, "storage": self.storage,
                                   "n_trials": len(study.trials)}
        if complete:
            best = study.best_trial
            results.update(best_trial=best.number, best_params=best.params, best_value=best.value)
            log.info("best trial %d of %d: %s = %s", best.number, len(study.trials), best.params, best.value)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        write_text(self.sweep_dir / "optimization_results.yaml", OmegaConf.to_yaml(OmegaConf.create(results)))


class PruneTrial(L.Callback):
    """Report ``monitor`` (``val/acc``) to the study's trial after every validation; stop the trial (raise
    ``optuna.TrialPruned``, which the sweeper records as PRUNED) when the pruner says so.

    A diverged run (non-finite ``val/loss``) reports NaN, which every optuna pruner prunes. The reports are made
    on rank 0 and its decision is broadcast, so that every DDP process stops together.
    """

    def __init__(self, *, study_name: str, storage: str, trial: int, pruner: Any, monitor: str = "val/acc"):
        import optuna

        self.monitor = monitor
        store = open_storage(storage)
        study = optuna.load_study(study_name=study_name, storage=store, pruner=pruner)
        trial_id = store.get_trial_id_from_study_id_trial_number(store.get_study_id_from_name(study_name), trial)
        self.trial = optuna.trial.Trial(study, trial_id)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import optuna

        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:  # not the final validate of the best
            return
        prune, value = False, float("nan")
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            loss = trainer.callback_metrics.get("val/loss")
            if value is None:
                raise TwinCarError(f"optuna.monitor={self.monitor} is not logged: use a metric such as val/acc")
            value = float(value) if loss is None or math.isfinite(float(loss)) else float("nan")
            self.trial.report(value, step=trainer.current_epoch)
            prune = self.trial.should_prune()
        if trainer.strategy.broadcast(prune, src=0):
            message = f"pruned after epoch {trainer.current_epoch} ({self.monitor}={value:.4f} on rank 0)"
            log.info("optuna trial %d %s", self.trial.number, message)
            raise optuna.TrialPruned(message)


def pruning_callback(cfg: DictConfig) -> PruneTrial | None:
    """The :class:`PruneTrial` of a job the search launched (``optuna.trial`` set), else None."""
    search = cfg.get("optuna")
    if not search or search.get("trial") is None or search.get("pruner") is None:
        return None
    import hydra

    pruner = hydra.utils.instantiate(search.pruner)
    return PruneTrial(study_name=search.study_name, storage=search.storage, trial=int(search.trial), pruner=pruner,
                      monitor=search.get("monitor", "val/acc"))
