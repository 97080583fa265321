"""``python -m twincar.check ROOT`` (``twincar-check``): decode every image of a Stanford Cars copy, in any layout,
and report each problem on screen and as a CSV or JSON file (:mod:`twincar.data.check`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from twincar.data.check import __doc__ as LIBRARY_DOC
from twincar.data.check import check, format_table, write_report
from twincar.data.formats import FORMATS
from twincar.errors import TwinCarError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twincar.check", description=LIBRARY_DOC.splitlines()[0])
    parser.add_argument("root", help="dataset root, in any layout twincar reads (see --format)")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="layout of ROOT (default: detect it)")
    parser.add_argument("--splits", nargs="+", default=["train", "test"], choices=["train", "test"],
                        help="official splits to scan (default: both)")
    parser.add_argument("--workers", type=int, default=8, help="decoding threads (default 8)")
    parser.add_argument("--report", type=Path, help="also write one CSV row per problem to this file (.json: JSON)")
    args = parser.parse_args(argv)
    try:
        report = check(args.root, args.format, tuple(args.splits), args.workers)
    except TwinCarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{report['root']} ({report['format']} layout)")
    print(format_table(report))
    if args.report:
        write_report(report, args.report)
        print(f"report written to {args.report}")
    return 1 if any(s["errors"] for s in report["splits"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
