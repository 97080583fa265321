"""What every layout reader shares: :class:`Sample`, :class:`CarsData`, the error type, ``.mat`` helpers, checks."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io

from twincar.data.classes import CarName, parse_car_name
from twincar.errors import TwinCarError

UNLABELED = -1
BOX_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")


class DatasetFormatError(TwinCarError, ValueError):
    """A dataset file is missing or not in the expected layout; the message names the file."""


@dataclass(frozen=True)
class Sample:
    """One image: its file, its 0-based label (``UNLABELED`` if unknown) and its box.

    ``bbox`` is (x1, y1, x2, y2) in pixels, as in the devkit (1-based, inclusive). When ``index`` is set,
    the image is row ``index`` of the container file ``path`` (a parquet file). ``name`` identifies the image
    within its split (split caches, ``skipped.txt``); it defaults to the file name (``file#row`` for a row).
    """

    path: Path
    label: int
    bbox: tuple[int, int, int, int] | None = None
    index: int | None = None
    name: str = field(default="", compare=False)

    def __post_init__(self):
        if not self.name:
            name = self.path.name if self.index is None else f"{self.path.name}#{self.index}"
            object.__setattr__(self, "name", name)


@dataclass
class CarsData:
    """A whole dataset copy as read by one layout reader: class names and both official splits.

    ``cars``: each class's make, model and year as the dataset's own metadata gives them (DVM-CAR's tables, the
    VMMRdb folder names, CompCars' ``.mat``); None for the Stanford Cars layouts, whose names are parsed
    (:func:`~twincar.data.classes.parse_car_name`). ``official_test``: False when the dataset has no test split
    (DVM-CAR, VMMRdb): every image is in ``train`` and the datamodule holds a seeded stratified test split out.
    """

    format: str  # the layout it was read as (one of twincar.data.formats.FORMATS)
    root: Path  # the folder the layout was found in
    class_names: list[str]  # index = label
    train: list[Sample]
    test: list[Sample]  # labels are UNLABELED when the copy has no test labels
    cars: list[CarName] | None = None  # index = label; None: parsed from the names
    official_test: bool = True  # False: no test split in the dataset (the datamodule makes one)

    @property
    def car_names(self) -> list[CarName]:
        """Make, model and year of each class (index = label): the dataset's own, else parsed from the name."""
        return list(self.cars) if self.cars is not None else [parse_car_name(n) for n in self.class_names]

    @property
    def has_boxes(self) -> bool:
        """True when every sample has a car box (``data.crop_to_bbox`` needs them)."""
        return all(s.bbox is not None for s in self.train + self.test)

    @property
    def has_test_labels(self) -> bool:
        return any(s.label != UNLABELED for s in self.test)

    def validate(self) -> CarsData:
        """Raise one clear error for an empty train split or a class without a training image."""
        where = f"{self.root} ({self.format} layout)"
        if not self.class_names:
            raise DatasetFormatError(f"{where}: no class names found")
        if not self.train:
            raise DatasetFormatError(f"{where}: the train split is empty")
        counts = Counter(s.label for s in self.train)
        empty = [n for i, n in enumerate(self.class_names) if not counts.get(i)]
        if empty:
            shown = ", ".join(f"'{n}'" for n in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
            raise DatasetFormatError(
                f"{where}: {len(self.class_names)} class names but only {len(counts)} classes have training "
                f"images; no training image for {shown}: fix the class list or add the images"
            )
        return self


def check_label(label: int, num_classes: int, source: Path | str, what: str) -> int:
    """A 1-based class id from a file -> 0-based label; outside 1..K is an error naming the file and the item."""
    label = int(label)
    if not 1 <= label <= num_classes:
        raise DatasetFormatError(f"{source}: {what} has class {label}, outside 1..{num_classes}")
    return label - 1


def box(record: dict) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) as Python ints from a record's ``bbox_*`` fields (no uint8/uint16 arithmetic later)."""
    return tuple(int(record[k]) for k in BOX_FIELDS)


def loadmat(path: Path, key: str) -> np.ndarray:
    """Variable ``key`` of a ``.mat`` file; a missing, damaged or different file is one clear error."""
    try:
        mat = scipy.io.loadmat(str(path))
    except FileNotFoundError as e:
        raise DatasetFormatError(f"{path} is missing") from e
    except Exception as e:  # scipy raises several types for a damaged file
        raise DatasetFormatError(f"{path} is not a readable .mat file: {e}") from e
    if key not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DatasetFormatError(f"{path} has no '{key}' variable (found: {', '.join(found) or 'none'})")
    return mat[key]


def scalar(value: np.ndarray):
    """A MATLAB cell/struct field is a nested 1x1 array (or 0-d); return the Python value inside."""
    return np.asarray(value).reshape(-1)[0].item()


def read_names_mat(path: Path) -> list[str]:
    """The ``class_names`` cell of a ``.mat`` file (cars_meta.mat or cars_annos.mat) in file order."""
    cells = loadmat(path, "class_names").reshape(-1)  # reshape: a single class is 0-d after squeezing
    return [str(scalar(c)).strip() for c in cells]


def read_struct(path: Path, required: tuple[str, ...], key: str = "annotations") -> list[dict]:
    """Records of a ``.mat`` struct array as dicts keyed by field name (never by position)."""
    annos = loadmat(path, key).reshape(-1)
    fields = annos.dtype.names or ()
    missing = [f for f in required if f not in fields]
    if missing:
        raise DatasetFormatError(f"{path} {key} lack field(s) {', '.join(missing)}")
    return [{f: scalar(a[f]) for f in fields} for a in annos]


def first_existing(*paths: Path) -> Path | None:
    """The first of ``paths`` that exists, or None."""
    return next((p for p in paths if p.exists()), None)


def car_classes(items: list[tuple[str, str, int, object]]) -> tuple[list[CarName], list[list]]:
    """Classes of ``(make, model, year, item)`` tuples: one per make, model and year (compared ignoring case and
    runs of spaces, the first spelling kept), sorted by make, model, year; returns the classes (named
    ``"Make Model Year"``) and each class's items in the order given."""
    groups: dict[tuple[str, str, int], tuple[CarName, list]] = {}
    for make, model, year, item in items:
        make, model = " ".join(make.split()), " ".join(model.split())
        key = (make.casefold(), model.casefold(), int(year))
        if key not in groups:
            groups[key] = (CarName(" ".join(f"{make} {model} {year}".split()), make, model, int(year)), [])
        groups[key][1].append(item)
    ordered = [groups[k] for k in sorted(groups)]
    return [car for car, _ in ordered], [members for _, members in ordered]
