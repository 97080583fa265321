"""Compare runs: ``python -m twincar.compare DIR [--sort val/acc_best] [--out DIR]``.

Reads every training run below ``DIR`` (a ``-m`` sweep, several sweeps, single runs): its command-line
overrides (``.hydra/overrides.yaml``) and final metrics (``metrics.json``), into one table, best run first.
Prints it as Markdown and writes ``compare.csv`` (every metric) and ``compare.png`` (a bar chart of the sort
metric per run, labelled by the overrides that differ between runs). A job directory without
``metrics.json`` (crashed or still running) is listed last with its status.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from twincar.errors import TwinCarError

log = logging.getLogger(__name__)

DEFAULT_SORT = "val/acc_best"
# columns of the printed table (compare.csv has every metric)
SHOWN = ("val/acc_best", "val/acc", "test/acc", "val/acc_make", "val/acc_family", "val/acc_year_in_family",
         "val/ece", "epochs")
LOWER_IS_BETTER = ("loss", "nll", "ece", "err_")  # metric name parts for which smaller values sort first


class CompareError(TwinCarError, ValueError):
    """Nothing to compare, or a bad option; the message says what to pass."""


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
        raise CompareError(f"{root} is not a directory: pass a sweep directory (outputs/multiruns/<date_time>) "
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
        raise CompareError(f"no training runs below {root} (directories with .hydra/overrides.yaml and metrics.json): "
                           "pass the directory of a sweep or of several runs")
    return runs


def label_runs(runs: list[Run]) -> None:
    """Label each run by its overrides that not every run shares (all of them when only one run)."""
    common = set.intersection(*(set(r.overrides) for r in runs)) if len(runs) > 1 else set()
    for r in runs:
        r.label = " ".join(o for o in r.overrides if o not in common) or "(defaults)"


def sort_runs(runs: list[Run], metric: str) -> list[Run]:
    """Best first by ``metric`` (smaller first for losses, ECE, NLL, error shares); runs without it last."""
    lower = any(part in metric.split("/")[-1] for part in LOWER_IS_BETTER)

    def key(r: Run):
        v = r.metrics.get(metric, math.nan)
        missing = math.isnan(v)
        return missing, 0.0 if missing else v if lower else -v

    return sorted(runs, key=key)  # stable: ties keep path (job) order


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{int(v)}" if float(v).is_integer() and abs(v) > 1 else f"{v:.4f}"


def markdown_table(runs: list[Run], root: Path, sort: str) -> str:
    """The runs as a Markdown table: run, overrides that differ, the sort metric, then :data:`SHOWN`."""
    cols = [sort] + [c for c in SHOWN if c != sort and any(c in r.metrics for r in runs)]
    lines = ["| # | run | overrides | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for i, r in enumerate(runs, 1):
        name = str(r.path.relative_to(root)) if r.path != root else "."
        cells = [_fmt(r.metrics.get(c)) for c in cols] if r.status == "done" else [r.status] + [""] * (len(cols) - 1)
        lines.append(f"| {i} | {name} | {r.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(runs: list[Run], root: Path, path: Path) -> Path:
    """Every run with every metric any run has (blank where it has not)."""
    metrics = sorted({k for r in runs for k in r.metrics})
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "run", "label", "overrides", "status", *metrics])
        for i, r in enumerate(runs, 1):
            writer.writerow([i, str(r.path.relative_to(root)) if r.path != root else ".", r.label,
                             " ".join(r.overrides), r.status, *(r.metrics.get(m, "") for m in metrics)])
    return path


def bar_chart(runs: list[Run], sort: str, path: Path) -> Path:
    """A horizontal bar of ``sort`` per run (best on top), labelled by its overrides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in runs if not math.isnan(r.metrics.get(sort, math.nan))]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * max(1, len(shown))))
    values = [r.metrics[sort] for r in shown]
    ax.barh(range(len(shown)), values, color="tab:blue")
    ax.set_yticks(range(len(shown)), [r.label[:60] for r in shown], fontsize=8)
    ax.invert_yaxis()
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.4f}", va="center", fontsize=8)
    ax.set(xlabel=sort, title=f"{sort} per run ({len(shown)} of {len(runs)} runs)")
    ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare(root: str | Path, sort: str = DEFAULT_SORT, out_dir: str | Path | None = None) -> tuple[list[Run], str]:
    """Find, label and sort the runs below ``root``; write ``compare.csv`` and ``compare.png`` into ``out_dir``
    (default ``root``); return the sorted runs and the Markdown table."""
    root = Path(root)
    runs = find_runs(root)
    if not any(sort in r.metrics for r in runs):
        known = sorted({k for r in runs for k in r.metrics})
        raise CompareError(f"no run below {root} has metric {sort!r}: pass --sort one of {', '.join(known) or '-'}")
    label_runs(runs)
    runs = sort_runs(runs, sort)
    out = Path(out_dir) if out_dir else root
    out.mkdir(parents=True, exist_ok=True)
    write_csv(runs, root, out / "compare.csv")
    bar_chart(runs, sort, out / "compare.png")
    return runs, markdown_table(runs, root, sort)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; a user error is printed as one sentence and exits with 1."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m twincar.compare",
                                     description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("dir", help="a sweep directory (outputs/multiruns/<date_time>) or any folder of runs")
    parser.add_argument("--sort", default=DEFAULT_SORT, help=f"metric to rank by (default {DEFAULT_SORT})")
    parser.add_argument("--out", help="where to write compare.csv and compare.png (default: DIR)")
    args = parser.parse_args(argv)
    try:
        runs, table = compare(args.dir, args.sort, args.out)
    except TwinCarError as e:
        log.error("%s", e)
        return 1
    print(table)
    out = Path(args.out or args.dir)
    log.info("%d runs; wrote %s and %s", len(runs), out / "compare.csv", out / "compare.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
