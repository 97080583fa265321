"""Class-name table: parse "Make Model Body Year" names and read/write ``classes.txt`` / ``classes.csv``.

Stanford Cars names look like ``"BMW M3 Coupe 2012"``: the make is the first word (or one of
a few two-word makes), the year is the last word, and everything in between is the model. Names are
kept as a copy gives them (some copies lowercase them) and compared case-insensitively.

    python -m twincar.classes --from PATH --out DIR/classes.txt

reads the names from a dataset root of any layout (or one cars_meta.mat, cars_annos.mat, names.csv
or .parquet file) and writes ``classes.txt`` (one name a line, official order) and ``classes.csv``
(``label,name,make,model,year``) beside it.
"""

from __future__ import annotations

import csv
import io
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from twincar.errors import TwinCarError
from twincar.files import write_text

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
        bodies = {b.casefold(): b for b in BODY_TYPES}
        for word in reversed(words):
            if word.casefold() in bodies:
                return bodies[word.casefold()]
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
    folded = full.casefold()
    multi = next((m for m in MULTI_WORD_MAKES if folded == m.casefold() or folded.startswith(m.casefold() + " ")), None)
    make = full[: len(multi)] if multi else full.split()[0]  # as spelled in the name
    rest = full[len(make):].split()
    year = int(rest.pop()) if rest and _YEAR.match(rest[-1]) else None
    return CarName(full=full, make=make, model=" ".join(rest), year=year)


def stanford_cars_class_names() -> list[str]:
    """The 196 Stanford Cars class names in the official order (read once from cars_meta.mat)."""
    text = resources.files("twincar.data").joinpath("stanford_cars_classes.txt").read_text("utf-8")
    return [line for line in text.splitlines() if line.strip()]


class ClassListError(TwinCarError, ValueError):
    """A class list that cannot be used (empty, not text, a name twice); the message names the file."""


def _unique(names: list[str], lines: list[int], path: Path) -> list[str]:
    """``names`` when no two are the same class (:func:`name_key`); else a ClassListError naming the lines."""
    seen: dict[str, list[int]] = {}
    for name, line in zip(names, lines, strict=True):
        seen.setdefault(name_key(name), []).append(line)
    for name in names:
        if len(on := seen[name_key(name)]) > 1:
            listed = ", ".join(map(str, on[:-1])) + f" and {on[-1]}"
            raise ClassListError(f"{path}: {name!r} is on lines {listed}: every class needs its own name")
    return names


def _read_text(path: Path) -> str:
    """The text of a class list (a UTF-8 byte-order mark dropped)."""
    try:
        return path.read_text("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ClassListError(f"class list {path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from e
    except OSError as e:
        raise FileNotFoundError(f"cannot read class list {path}: {e.strerror or e}") from e


def read_classes_txt(path: str | Path) -> list[str]:
    """Read one class name per line (blank lines ignored, a UTF-8 BOM dropped); index = label. Two lines that
    name the same class (:func:`name_key`) are a :class:`ClassListError`."""
    path = Path(path)
    numbered = [(i, line.strip()) for i, line in enumerate(_read_text(path).splitlines(), 1) if line.strip()]
    if not numbered:
        raise ClassListError(f"class list {path} is empty")
    return _unique([n for _, n in numbered], [i for i, _ in numbered], path)


def read_class_names(path: str | Path) -> list[str]:
    """Class names from ``classes.txt`` (one a line) or ``classes.csv`` (a ``name`` column, rows in label order)."""
    path = Path(path)
    if path.suffix.lower() != ".csv":
        return read_classes_txt(path)
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    rows = [(row, reader.line_num) for row in reader]
    if not rows or "name" not in rows[0][0]:
        raise ClassListError(f"class list {path} needs a 'name' column (label,name,make,model,year)")
    if "label" in rows[0][0]:
        try:
            rows.sort(key=lambda r: int(r[0]["label"]))
        except (TypeError, ValueError) as e:
            raise ClassListError(f"class list {path}: every 'label' must be a whole number ({e})") from e
    return _unique([(r["name"] or "").strip() for r, _ in rows], [line for _, line in rows], path)


def write_classes_txt(names: list[str], path: str | Path) -> Path:
    """Write one class name per line, in label order."""
    return write_text(path, "".join(f"{n}\n" for n in names))


def name_key(name: str) -> str:
    """What two class names must share to be the same class: case and runs of whitespace are ignored.
    The one rule, used by resume, predict, eval, explain and export."""
    return " ".join(str(name).split()).casefold()


def class_names_difference(a: list[str], b: list[str]) -> str | None:
    """None when two class lists name the same classes in the same order (:func:`name_key`), else a short
    description of the first difference: the counts, or the first label whose names differ."""
    if len(a) != len(b):
        return f"{len(a)} classes against {len(b)}"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if name_key(x) != name_key(y):
            return f"label {i} is {x!r} against {y!r}"
    return None


def same_class_names(a: list[str], b: list[str]) -> bool:
    """True when two class lists name the same classes in the same order, ignoring case and spacing."""
    return class_names_difference(a, b) is None


def write_classes_csv(names: list[str], path: str | Path, cars: list[CarName] | None = None) -> Path:
    """Write ``label,name,make,model,year`` for each class, in label order. ``cars``: each class's make, model
    and year as its dataset gives them (DVM-CAR, VMMRdb, CompCars); None: parsed from the name."""
    if cars is not None and len(cars) != len(names):
        raise ValueError(f"{len(cars)} make/model/year rows for {len(names)} class names")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["label", "name", "make", "model", "year"])
    for i, name in enumerate(names):
        car = parse_car_name(name) if cars is None else cars[i]
        writer.writerow([i, " ".join(name.split()), car.make, car.model, car.year or ""])
    return write_text(path, buf.getvalue())


def read_classes_csv(path: str | Path, text: str | None = None) -> tuple[list[str], list[CarName]]:
    """Class names and each class's make, model and year from a ``classes.csv`` (:func:`write_classes_csv`), in
    label order; a row without a make is parsed from its name. ``text``: the file's text, already read (``path``
    then only names it in errors)."""
    reader = csv.DictReader(io.StringIO(_read_text(Path(path)) if text is None else text, newline=""))
    rows = [(row, reader.line_num) for row in reader]
    if not rows or "name" not in rows[0][0]:
        raise ClassListError(f"class list {path} needs a 'name' column (label,name,make,model,year)")
    try:
        if "label" in rows[0][0]:
            rows.sort(key=lambda r: int(r[0]["label"]))
        cars = [CarName(" ".join(r["name"].split()), r["make"].strip(), (r.get("model") or "").strip(),
                        int(r["year"]) if (r.get("year") or "").strip() else None)
                if (r.get("make") or "").strip() else parse_car_name(r["name"] or "") for r, _ in rows]
    except (TypeError, ValueError) as e:
        raise ClassListError(f"class list {path}: every 'label' and 'year' must be a whole number ({e})") from e
    names = _unique([(r["name"] or "").strip() for r, _ in rows], [line for _, line in rows], Path(path))
    return names, cars


def write_class_tables(names: list[str], out: str | Path, cars: list[CarName] | None = None) -> tuple[Path, Path]:
    """``classes.txt`` at ``out`` and ``classes.csv`` beside it (``cars``: see :func:`write_classes_csv`)."""
    out = Path(out)
    return write_classes_txt(names, out), write_classes_csv(names, out.with_suffix(".csv"), cars)


if __name__ == "__main__":
    sys.exit("python -m twincar.data.classes is now python -m twincar.classes")
