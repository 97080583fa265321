"""Tabulate a sweep: ``python -m twincar.ablation outputs/multiruns/DATE [--json table.json]``.

For every run of a ``-m`` sweep, evaluates on its val and test splits the best checkpoint: its EMA
weights and, from the same checkpoint, the raw weights (when ``model.ema.decay`` was set), and prints
a Markdown table: top-1, family accuracy (make + model right, year ignored) and
year-given-family accuracy (the year chosen among the true family's classes only; chance = 1/years).
Run it from the directory the sweep was launched in (the runs' data paths are relative to it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import hydra
import timm
import torch
from omegaconf import OmegaConf

from twincar.data.transforms import Preprocess
from twincar.errors import TwinCarError
from twincar.inference import Predictor
from twincar.metrics import class_hierarchy
from twincar.models.io import safe_torch_load


def hierarchy_accuracy(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict[str, float]:
    """Top-1, family and year-given-family accuracy of ``logits`` (N, K) against ``labels`` (N,).

    Family accuracy: the predicted class has the true class's make and model (any year).
    Year given family: among images whose family has two or more years, the argmax over that family's
    classes only is the true class (a model that knows the family, asked for the year; chance 1/years).
    """
    family = class_hierarchy(class_names)["family"]  # per class: its family id (the one class-name parser)
    members = {f: (family == f).nonzero().flatten().tolist() for f in family.unique().tolist()}
    pred = logits.argmax(dim=1)
    fam_ok = family[pred] == family[labels]
    family = family.tolist()
    year_hits, year_n = 0, 0
    for row, t in zip(logits, labels.tolist(), strict=True):
        idx = members[family[t]]
        if len(idx) >= 2:
            year_n += 1
            year_hits += idx[int(row[idx].argmax())] == t
    return {
        "acc": float((pred == labels).float().mean()),
        "acc_family": float(fam_ok.float().mean()),
        "acc_year_given_family": year_hits / year_n if year_n else float("nan"),
    }


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


def _evaluate(state: dict[str, torch.Tensor], arch: str, names: list[str], pre: Preprocess, samples) -> dict:
    net = timm.create_model(arch, num_classes=len(names))
    net.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    predictor = Predictor(net, names, pre, device="cpu")
    logits = torch.cat([
        predictor.logits(torch.stack([predictor.prepare(s.path) for s in samples[i:i + 64]]))
        for i in range(0, len(samples), 64)
    ])
    return hierarchy_accuracy(logits, torch.tensor([s.label for s in samples]), names)


def tabulate_run(run_dir: Path) -> list[Row]:
    """Evaluate one finished run directory: the best checkpoint's weights (EMA and raw when EMA was on)."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = " ".join(OmegaConf.load(overrides_file)) if overrides_file.is_file() else run_dir.name
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    val, test = dm.val_set.samples, (dm.test_set.samples if dm.test_set else [])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    path = metrics.get("best_checkpoint") or str(run_dir / "checkpoints" / "last.ckpt")
    ckpt = safe_torch_load(Path(path))
    hp = ckpt["hyper_parameters"]
    names, pre, arch = list(hp["class_names"]), Preprocess.from_dict(hp["preprocess"]), hp["name"]
    which = "best" if metrics.get("best_checkpoint") else "last"
    if "current_model_state" in ckpt:  # saved with EMA: the average in state_dict, the raw weights beside it
        weights = {f"{which} (epoch {ckpt['epoch']}), EMA": ckpt["state_dict"],
                   f"{which} (epoch {ckpt['epoch']}), raw": ckpt["current_model_state"]}
    else:
        weights = {f"{which} (epoch {ckpt['epoch']})": ckpt["state_dict"]}
    minutes = _minutes(run_dir / "train.log") if (run_dir / "train.log").is_file() else float("nan")
    return [
        Row(overrides, label, int(metrics.get("epochs", 0)), minutes, _evaluate(state, arch, names, pre, val),
            _evaluate(state, arch, names, pre, test) if test else {})
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
    """Rows for every finished run under ``sweep_dir`` (job order) and the Markdown table."""
    runs = sorted((p.parent for p in sweep_dir.glob("*/metrics.json")), key=lambda p: (len(p.name), p.name))
    if not runs:
        raise TwinCarError(f"no finished run (metrics.json) under {sweep_dir}: pass a -m sweep's directory")
    rows = [row for run in runs for row in tabulate_run(run)]
    shared = set.intersection(*(set(r.run.split()) for r in rows))  # the sweep's common overrides
    for r in rows:
        r.run = " ".join(o for o in r.run.split() if o not in shared) or r.run
    cfg = OmegaConf.load(runs[0] / "config.yaml")
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    return rows, markdown(rows, len(dm.val_set), len(dm.test_set) if dm.test_set else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twincar.ablation", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a -m sweep's directory (outputs/multiruns/DATE)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    try:
        rows, table = tabulate(args.sweep_dir)
    except TwinCarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(table)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
