"""Compare runs: ``python -m twincar.compare DIR [--sort val/acc_best] [--out DIR]``.

Reads every training run below ``DIR`` (a ``-m`` sweep, several sweeps, single runs): its command-line
overrides (``.hydra/overrides.yaml``) and final metrics (``metrics.json``), into one table, best run first.
Prints it as Markdown and writes ``compare.csv`` (every metric) and ``compare.png`` (a bar chart of the sort
metric per run, labelled by the overrides that differ between runs). A job directory without
``metrics.json`` (crashed or still running) is listed last with its status.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from twincar.errors import TwinCarError
from twincar.evaluation.figures import metric_bars
from twincar.files import write_csv
from twincar.runs import Run, find_runs, label_runs

log = logging.getLogger(__name__)

DEFAULT_SORT = "val/acc_best"
# columns of the printed table (compare.csv has every metric)
SHOWN = ("val/acc_best", "val/acc", "test/acc", "val/acc_make", "val/acc_family", "val/acc_year_in_family",
         "val/ece", "epochs")
LOWER_IS_BETTER = ("loss", "nll", "ece", "err_")  # metric name parts for which smaller values sort first


class CompareError(TwinCarError, ValueError):
    """Nothing to compare, or a bad option; the message says what to pass."""


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


def write_table(runs: list[Run], root: Path, path: Path) -> Path:
    """``compare.csv``: every run with every metric any run has (blank where it has not)."""
    metrics = sorted({k for r in runs for k in r.metrics})
    fields = ["rank", "run", "label", "overrides", "status", *metrics]
    rows = [{"rank": i, "run": str(r.path.relative_to(root)) if r.path != root else ".", "label": r.label,
             "overrides": " ".join(r.overrides), "status": r.status, **{m: r.metrics.get(m, "") for m in metrics}}
            for i, r in enumerate(runs, 1)]
    return write_csv(path, rows, fields)


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
    write_table(runs, root, out / "compare.csv")
    shown = [r for r in runs if not math.isnan(r.metrics.get(sort, math.nan))]
    metric_bars([r.label for r in shown], [r.metrics[sort] for r in shown], sort, len(runs), out / "compare.png")
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
