"""Tabulate a ``-m`` sweep (``python -m twincar.ablation``): every finished run's best checkpoint, its EMA and raw
weights, evaluated on the run's own val and test splits through eval's loop
(:func:`~twincar.evaluation.loop.collect_logits`), with top-1, family and year-given-family accuracy
(:func:`~twincar.models.metrics.hierarchy_accuracy`), as :class:`Row` objects and a Markdown table.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf

from twincar.data.preprocess import Preprocess
from twincar.errors import TwinCarError
from twincar.evaluation.loop import collect_logits
from twincar.inference.predictor import Predictor
from twincar.models.checkpoint import module_weights, safe_torch_load
from twincar.models.factory import build_model
from twincar.models.metrics import hierarchy_accuracy
from twincar.runs import Run, find_runs, label_runs


@dataclass
class Row:
    """One line of the table: a run's weights evaluated on val and test."""

    run: str  # the job's overrides
    weights: str  # which checkpoint, and EMA or raw
    epochs: int
    minutes: float  # wall-clock training + evaluation time of the run, from train.log
    val: dict[str, float]
    test: dict[str, float]


def _minutes(log_file: Path) -> float:
    stamps = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+\]", log_file.read_text("utf-8", "replace"), re.M)
    if len(stamps) < 2:
        return float("nan")
    first, last = (datetime.strptime(s, "%Y-%m-%d %H:%M:%S") for s in (stamps[0], stamps[-1]))
    return (last - first).total_seconds() / 60


def _evaluate(state: dict[str, torch.Tensor], arch: str, names: list[str], pre: Preprocess, dataset) -> dict:
    """Accuracies of ``state`` on a split of the run's own datamodule, through eval's loop."""
    model = build_model(arch, len(names), module_weights(state), arch)
    predictor = Predictor(model, names, pre, device="cpu")
    out = collect_logits(predictor, dataset.samples, bbox_margin=dataset.bbox_margin, progress=False)
    return hierarchy_accuracy(out.logits, out.labels, names)


def tabulate_run(run: Run) -> list[Row]:
    """Evaluate one finished run: the best checkpoint's weights (EMA and raw when EMA was on)."""
    cfg = OmegaConf.load(run.path / "config.yaml")
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    metrics = json.loads((run.path / "metrics.json").read_text())
    path = metrics.get("best_checkpoint") or str(run.path / "checkpoints" / "last.ckpt")
    ckpt = safe_torch_load(Path(path))
    hp = ckpt["hyper_parameters"]
    names, pre, arch = list(hp["class_names"]), Preprocess.from_dict(hp["preprocess"]), hp["name"]
    which = "best" if metrics.get("best_checkpoint") else "last"
    if "current_model_state" in ckpt:  # saved with EMA: the average in state_dict, the raw weights beside it
        weights = {f"{which} (epoch {ckpt['epoch']}), EMA": ckpt["state_dict"],
                   f"{which} (epoch {ckpt['epoch']}), raw": ckpt["current_model_state"]}
    else:
        weights = {f"{which} (epoch {ckpt['epoch']})": ckpt["state_dict"]}
    log_file = run.path / "train.log"
    minutes = _minutes(log_file) if log_file.is_file() else float("nan")
    return [
        Row(run.label, label, int(metrics.get("epochs", 0)), minutes, _evaluate(state, arch, names, pre, dm.val_set),
            _evaluate(state, arch, names, pre, dm.test_set) if dm.test_set else {})
        for label, state in weights.items()
    ]


def markdown(rows: list[Row], val_size: int | None = None, test_size: int | None = None) -> str:
    """The table as Markdown: one line per run and weights."""
    head = (f"| run | weights | min | val top-1{f' (n={val_size})' if val_size else ''} "
            f"| test top-1{f' (n={test_size})' if test_size else ''} | test family | test year given family |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = {k: (r.test or {}).get(k, float("nan")) for k in ("acc", "acc_family", "acc_year_given_family")}
        lines.append(f"| {r.run} | {r.weights} | {r.minutes:.1f} | {r.val['acc']:.3f} | {t['acc']:.3f} "
                     f"| {t['acc_family']:.3f} | {t['acc_year_given_family']:.3f} |")
    return "\n".join(lines)


def tabulate(sweep_dir: Path) -> tuple[list[Row], str]:
    """Rows for every finished run under ``sweep_dir`` (job order, labelled by the overrides that differ) and
    the Markdown table."""
    runs = [r for r in find_runs(sweep_dir) if r.status == "done"]
    if not runs:
        raise TwinCarError(f"no finished run (metrics.json) under {sweep_dir}: pass a -m sweep's directory")
    label_runs(runs)
    rows = [row for run in runs for row in tabulate_run(run)]
    cfg = OmegaConf.load(runs[0].path / "config.yaml")
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    return rows, markdown(rows, len(dm.val_set), len(dm.test_set) if dm.test_set else None)
