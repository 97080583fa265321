"""Run directories: finding them, naming them by what differs, and what they recorded.

A run directory is what ``python -m twincar.train`` writes (``outputs/runs/<date_time>/`` or a sweep job
``outputs/multiruns/<date_time>/<n>/``): ``config.yaml``, ``.hydra/``, ``metrics.json``, ``checkpoints/``.
Compare, the ablation table, eval, export and the model card read runs through this module only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from twincar.errors import TwinCarError

log = logging.getLogger(__name__)


class RunsError(TwinCarError, ValueError):
    """No run where one was expected; the message says what to pass."""


@dataclass
class Run:
    """One run directory: where it is, how it was launched, what it reached."""

    path: Path
    overrides: list[str]  # as launched, e.g. ["optimizer=sgd", "experiment=smoke"]
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "done"  # done | no metrics.json
    label: str = ""  # the overrides that differ from the other runs'


def _is_run(d: Path) -> bool:
    return (d / ".hydra" / "overrides.yaml").is_file() or (d / "config.yaml").is_file()


def find_runs(root: str | Path) -> list[Run]:
    """Every run directory below ``root`` (itself included), in path order (sweep jobs by number)."""
    root = Path(root)
    if not root.is_dir():
        raise RunsError(f"{root} is not a directory: pass a sweep directory (outputs/multiruns/<date_time>) "
                           "or a folder of runs (outputs/)")
    dirs = {p.parent.parent for p in root.rglob(".hydra/overrides.yaml")}
    dirs |= {p.parent for p in root.rglob("config.yaml")}
    dirs = {d for d in dirs if _is_run(d) and any((d / n).exists() for n in ("metrics.json", "checkpoints", "csv"))}

    def order(d: Path):
        return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in d.relative_to(root).parts]

    runs = []
    for d in sorted(dirs, key=order):
        overrides_file = d / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) or [] if overrides_file.is_file() else []
        overrides = [str(o) for o in overrides]
        run = Run(d, overrides)
        try:
            values = json.loads((d / "metrics.json").read_text())
            run.metrics = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
        except FileNotFoundError:
            run.status = "no metrics.json"
        except ValueError as e:
            run.status = f"unreadable metrics.json ({e})"
        runs.append(run)
    if not runs:
        raise RunsError(f"no training runs below {root} (directories with .hydra/overrides.yaml and metrics.json): "
                           "pass the directory of a sweep or of several runs")
    return runs


def label_runs(runs: list[Run]) -> None:
    """Label each run by its overrides that not every run shares (all of them when only one run)."""
    common = set.intersection(*(set(r.overrides) for r in runs)) if len(runs) > 1 else set()
    for r in runs:
        r.label = " ".join(o for o in r.overrides if o not in common) or "(defaults)"


def run_dir_of(model_path: str | Path) -> Path:
    """The run a model file belongs to: ``RUN/checkpoints/x.ckpt`` -> ``RUN``, ``RUN/model.pth`` -> ``RUN``."""
    path = Path(model_path).expanduser()
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def find_run_config(model_path: str | Path) -> Path | None:
    """The training ``config.yaml`` of the run a model file belongs to, or None."""
    model_path = Path(model_path).expanduser()
    for d in (model_path.parent, model_path.parent.parent):
        if (d / "config.yaml").is_file():
            return d / "config.yaml"
    return None


def group_choices(choices: dict, overrides: list[str]) -> dict:
    """The record of how a run was configured: its config-group choices (Hydra's own left out) and overrides."""
    return {"choices": {k: v for k, v in choices.items() if not k.startswith("hydra") and v is not None},
            "overrides": [str(o) for o in overrides]}


def hydra_run_config() -> dict:
    """The running Hydra job's group choices and command-line overrides (``{}`` outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    return group_choices(dict(hc.runtime.choices), list(hc.overrides.task))


def run_record(model_path: str | Path) -> tuple[dict, dict]:
    """Metrics and config choices of the run a checkpoint came from (``{}`` for what it does not have)."""
    from omegaconf import OmegaConf

    run = run_dir_of(model_path)
    metrics: dict = {}
    config: dict = {}
    if (run / "metrics.json").is_file():
        try:
            metrics = json.loads((run / "metrics.json").read_text("utf-8"))
        except ValueError:
            log.warning("%s is not valid JSON: metrics left out of the model card", run / "metrics.json")
    hydra_yaml = run / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        hc = OmegaConf.load(hydra_yaml).hydra
        config = group_choices(OmegaConf.to_container(hc.runtime.choices), list(hc.overrides.task))
    return metrics, config


# Options that name a file or folder. A relative value on the command line or in a config is taken from the
# directory the command was launched in, whatever ``hydra.job.chdir`` is.
PATH_OPTIONS = ("paths.root_dir", "data.root", "data.split_dir", "data.cache_dir", "data.open_set.holdout",
                "model.weights", "ckpt_path", "ckpt", "classes", "run_config", "out", "calibration")


def resolve_launch_paths(cfg) -> None:
    """Make every relative path option of ``cfg`` (:data:`PATH_OPTIONS`) absolute from the launch directory
    (``${hydra:runtime.cwd}``), so ``data.root=data/x`` means the same with ``hydra.job.chdir=true``.
    Options that interpolate others (``${paths.data_dir}/...``) follow ``paths.root_dir``. Outside Hydra: no-op."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    if not HydraConfig.initialized():
        return
    cwd = Path(HydraConfig.get().runtime.cwd)

    def absolute(value):
        if isinstance(value, str) and value and "://" not in value and not Path(value).expanduser().is_absolute():
            return str(cwd / Path(value).expanduser())
        return value

    with open_dict(cfg):
        for key in PATH_OPTIONS:
            parent_key, _, leaf = key.rpartition(".")
            parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
            if parent is None or leaf not in parent:
                continue
            if OmegaConf.is_interpolation(parent, leaf) and key != "paths.root_dir":
                continue  # follows the options it interpolates (root_dir: TWINCAR_ROOT or '.', resolved here)
            value = parent[leaf]
            if OmegaConf.is_list(value):
                parent[leaf] = [absolute(v) for v in value]
            elif value is not None:
                parent[leaf] = absolute(value)

