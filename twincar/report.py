"""Redraw a training run's curves: ``python -m twincar.report RUN_DIR [--out DIR]``.

From ``RUN_DIR/csv/metrics.csv`` (the CSV logger's per-epoch history) it writes ``loss_curve.png``,
``accuracy_curve.png`` and ``fine_grained_curve.png`` (make / family / year-in-family accuracy per epoch)
into ``RUN_DIR`` (or ``--out``), e.g. after a run was resumed, or for a run of an older version.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from twincar.errors import TwinCarError
from twincar.evaluation.figures import plot_curves

log = logging.getLogger(__name__)


class ReportError(TwinCarError, FileNotFoundError):
    """The run directory has no metrics history; the message says what to pass."""


def report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw the curves of ``run_dir`` into ``out_dir`` (default: the run directory); return the PNG paths."""
    run_dir = Path(run_dir)
    metrics_csv = run_dir / "csv" / "metrics.csv"
    if not metrics_csv.is_file():
        raise ReportError(
            f"{metrics_csv} not found: pass a training run directory (outputs/runs/<date_time>, or a sweep job "
            "outputs/multiruns/<date_time>/<n>) that was logged with the CSV logger"
        )
    out = Path(out_dir) if out_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)
    return plot_curves(metrics_csv, out)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; a user error is printed as one sentence and exits with 1."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m twincar.report",
                                     description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("run_dir", help="a training run directory (holding csv/metrics.csv)")
    parser.add_argument("--out", help="where to write the PNGs (default: the run directory)")
    args = parser.parse_args(argv)
    try:
        paths = report(args.run_dir, args.out)
    except TwinCarError as e:
        log.error("%s", e)
        return 1
    for p in paths:
        log.info("wrote %s", p)
    metrics = Path(args.run_dir) / "metrics.json"
    if metrics.is_file():
        values = json.loads(metrics.read_text())
        shown = {k: v for k, v in values.items() if k.split("/")[-1] in ("acc", "acc_best", "acc_make", "acc_family",
                                                                         "acc_year_in_family", "ece")}
        log.info("final metrics: %s", ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
