"""Tabulate a sweep: ``python -m twincar.ablation outputs/multiruns/DATE [--json table.json]``.

For every run of a ``-m`` sweep, evaluates on its val and test splits the best checkpoint: its EMA
weights and, from the same checkpoint, the raw weights (when ``model.ema.decay`` was set), and prints
a Markdown table: top-1, family accuracy (make + model right, year ignored) and
year-given-family accuracy (the year chosen among the true family's classes only; chance = 1/years).
Run it from the directory the sweep was launched in (the runs' data paths are relative to it).
The work is :func:`twincar.evaluation.ablation.tabulate`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from twincar.errors import TwinCarError
from twincar.evaluation.ablation import tabulate
from twincar.files import write_json


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
        write_json(args.json, [asdict(r) for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
