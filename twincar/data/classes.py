"""Class-name table: parse "Make Model Body Year" names and read/write ``classes.txt``.

Stanford Cars names look like ``"BMW M3 Coupe 2012"``: the make is the first word (or one of
a few two-word makes), the year is the last word, and everything in between is the model.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

# Makes whose name has more than one word; every other make is the first word of the name.
MULTI_WORD_MAKES: tuple[str, ...] = ("AM General", "Aston Martin", "Land Rover")
# Body types as they appear in Stanford Cars names (the word before the year, mostly).
BODY_TYPES: tuple[str, ...] = (
    "Sedan", "SUV", "Convertible", "Coupe", "Cab", "SuperCab", "Hatchback", "Van", "Wagon", "Minivan"
)
_YEAR = re.compile(r"^(19|20)\d\d$")


@dataclass(frozen=True)
class CarName:
    """One class name split into its parts; ``year`` is None when the name has none."""

    full: str
    make: str
    model: str
    year: int | None

    @property
    def body(self) -> str | None:
        """Body type ("Sedan", "SUV", ...) when the name states one."""
        words = self.model.split()
        for word in reversed(words):
            if word in BODY_TYPES:
                return word
        return None

    @property
    def family(self) -> str:
        """Make and model without the year: classes of one family differ only by year."""
        return f"{self.make} {self.model}"


def parse_car_name(name: str) -> CarName:
    """Split a class name into make, model and year.

    >>> parse_car_name("Aston Martin V8 Vantage Coupe 2012")
    CarName(full='Aston Martin V8 Vantage Coupe 2012', make='Aston Martin', model='V8 Vantage Coupe', year=2012)
    """
    full = " ".join(name.split())
    if not full:
        raise ValueError("empty class name")
    make = next((m for m in MULTI_WORD_MAKES if full == m or full.startswith(m + " ")), full.split()[0])
    rest = full[len(make):].split()
    year = int(rest.pop()) if rest and _YEAR.match(rest[-1]) else None
    return CarName(full=full, make=make, model=" ".join(rest), year=year)


def stanford_cars_class_names() -> list[str]:
    """The 196 Stanford Cars class names in the official order (read once from cars_meta.mat)."""
    text = resources.files("twincar.data").joinpath("stanford_cars_classes.txt").read_text("utf-8")
    return [line for line in text.splitlines() if line.strip()]


def read_classes_txt(path: str | Path) -> list[str]:
    """Read one class name per line (blank lines ignored); index = label."""
    path = Path(path)
    try:
        names = [line.strip() for line in path.read_text("utf-8").splitlines() if line.strip()]
    except OSError as e:
        raise FileNotFoundError(f"cannot read class list {path}: {e.strerror or e}") from e
    if not names:
        raise ValueError(f"class list {path} is empty")
    return names


def read_class_names(path: str | Path) -> list[str]:
    """Class names from ``classes.txt`` (one a line) or ``classes.csv`` (a ``name`` column, rows in label order)."""
    path = Path(path)
    if path.suffix.lower() != ".csv":
        return read_classes_txt(path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise FileNotFoundError(f"cannot read class list {path}: {e.strerror or e}") from e
    if not rows or "name" not in rows[0]:
        raise ValueError(f"class list {path} needs a 'name' column (label,name,make,model,year)")
    if "label" in rows[0]:
        rows.sort(key=lambda r: int(r["label"]))
    return [r["name"].strip() for r in rows]


def write_classes_txt(names: list[str], path: str | Path) -> Path:
    """Write one class name per line, in label order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{n}\n" for n in names), "utf-8")
    return path
