#!/usr/bin/env python
"""Write classes.txt (one name per line, label order) from a devkit cars_meta.mat.

    python scripts/make_classes_txt.py path/to/devkit/cars_meta.mat classes.txt [--csv classes.csv]

With --csv it also writes label,name,make,model,year for each class.
"""

from __future__ import annotations

import argparse
import csv

from twincar.data.classes import parse_car_name, write_classes_txt
from twincar.data.formats import read_meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("meta", help="cars_meta.mat of a Stanford Cars devkit")
    parser.add_argument("out", help="classes.txt to write")
    parser.add_argument("--csv", help="also write label,name,make,model,year to this CSV file")
    args = parser.parse_args(argv)
    names = read_meta(args.meta)
    print(f"wrote {len(names)} classes to {write_classes_txt(names, args.out)}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["label", "name", "make", "model", "year"])
            for i, name in enumerate(names):
                car = parse_car_name(name)
                writer.writerow([i, car.full, car.make, car.model, car.year or ""])
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
