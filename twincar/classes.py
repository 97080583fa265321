"""``python -m twincar.classes --from PATH --out DIR/classes.txt`` (``twincar-classes``): write ``classes.txt`` and
``classes.csv`` from a dataset root of any layout or one class-name file (:mod:`twincar.data.classes`)."""

from __future__ import annotations

import argparse
import sys

from twincar.data.classes import write_class_tables
from twincar.errors import TwinCarError


def main(argv: list[str] | None = None) -> int:
    from twincar.data.formats import read_classes_from

    parser = argparse.ArgumentParser(prog="python -m twincar.classes",
                                     description="Write classes.txt and classes.csv from a car dataset.")
    parser.add_argument("--from", dest="source", required=True,
                        help="a dataset root (any layout), or a cars_meta.mat, cars_annos.mat, names.csv or .parquet")
    parser.add_argument("--out", required=True, help="classes.txt to write; classes.csv is written beside it")
    args = parser.parse_args(argv)
    try:
        names, cars = read_classes_from(args.source)
    except TwinCarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    txt, table = write_class_tables(names, args.out, cars)
    years = sorted({c.year for c in cars if c.year})
    span = f", years {years[0]}-{years[-1]}" if years else ""
    print(f"{len(names)} classes, {len({c.make.casefold() for c in cars})} makes, {len(years)} years{span}")
    print(f"wrote {txt} and {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
