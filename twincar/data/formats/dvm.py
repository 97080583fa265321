"""DVM-CAR (2021): ``resized_DVM/{Maker}/{Genmodel}/{Year}/{Color}/*.jpg`` with ``Basic_table.csv``.

A file is named ``{Maker}$${Genmodel}$${Year}$${Color}$${Genmodel_ID}$${n}$$image_{k}.jpg``. A class is make +
model + year: the make and model of its ``Genmodel_ID`` in ``Basic_table.csv`` (``Automaker, Automaker_ID,
Genmodel, Genmodel_ID``) when the table is there, else the ``{Maker}`` and ``{Genmodel}`` folder names; the
year is the ``{Year}`` folder. The CSVs have stray spaces after commas and in the headers: every field and
header is stripped. Some copies unpack as ``resized_DVM_clean/resized_DVM_clean/``: both levels are looked in.
DVM-CAR has no test split (``CarsData.official_test`` is False: the datamodule holds a seeded stratified share
of each class out as test). :func:`keep_views` keeps the images of some viewpoints only (``Image_table.csv``'s
``Predicted_viewpoint``, an angle in degrees: 0, 45, ..., 315; ``data.views``).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from twincar.data.discovery import IMAGE_EXTENSIONS
from twincar.data.formats.common import CarsData, DatasetFormatError, Sample, car_classes, first_existing

log = logging.getLogger(__name__)

FOLDERS = ("resized_DVM", "resized_DVM_clean/resized_DVM_clean", "resized_DVM_clean")
EXPECTS = "resized_DVM/<Maker>/<Genmodel>/<Year>/<Color>/*.jpg (or resized_DVM_clean/[resized_DVM_clean/]) " \
          "with Basic_table.csv"
BASIC_TABLE = "Basic_table.csv"
IMAGE_TABLE = "Image_table.csv"


def find_dvm(root: Path) -> Path | None:
    """The folder of the ``{Maker}`` folders: ``root/resized_DVM``, ``root/resized_DVM_clean/resized_DVM_clean``,
    ``root/resized_DVM_clean``, or ``root`` itself when it is one of them."""
    candidates = [root / f for f in FOLDERS]
    if root.name in ("resized_DVM", "resized_DVM_clean"):
        candidates += [root / root.name, root]
    for base in candidates:
        if base.is_dir() and any(p.is_dir() and p.name != base.name for p in base.iterdir()):
            return base
    return None


def read_table(path: Path) -> list[dict[str, str]]:
    """Rows of a DVM-CAR CSV as dicts, with the stray spaces of its headers and fields stripped."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            return [{k: v.strip() for k, v in zip(header, row, strict=False)} for row in reader if any(row)]
    except OSError as e:
        raise DatasetFormatError(f"cannot read {path}: {e.strerror or e}") from e


def read_models(path: Path | None) -> dict[str, tuple[str, str]]:
    """``Genmodel_ID`` -> (make, model) from ``Basic_table.csv``; empty without one."""
    if path is None:
        return {}
    rows = read_table(path)
    missing = [k for k in ("Automaker", "Genmodel", "Genmodel_ID") if rows and k not in rows[0]]
    if missing:
        raise DatasetFormatError(f"{path} has no {', '.join(missing)} column (expected Automaker, Automaker_ID, "
                                 "Genmodel, Genmodel_ID)")
    return {r["Genmodel_ID"]: (r["Automaker"], r["Genmodel"]) for r in rows if r.get("Genmodel_ID")}


def read_dvm(base: Path) -> CarsData:
    """Every image of the copy whose ``{Maker}`` folders are in ``base``, one class per make, model and year."""
    tops = [base, base.parent, base.parent.parent]
    models = read_models(first_existing(*(d / BASIC_TABLE for d in tops)))
    found: list[tuple[str, str, int, Path]] = []
    odd = 0
    for path in sorted(base.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        parts = path.relative_to(base).parts
        if len(parts) != 5 or not parts[2].strip().isdigit():
            odd += 1  # not Maker/Genmodel/Year/Color/file
            continue
        fields = path.stem.split("$$")
        make, model = models.get(fields[4].strip(), (parts[0], parts[1])) if len(fields) > 4 else parts[:2]
        found.append((make, model, int(parts[2]), path))
    if odd:
        log.warning("%s: %d image(s) not in <Maker>/<Genmodel>/<Year>/<Color>/ left out", base, odd)
    cars, members = car_classes(found)
    train = [Sample(p, label, name=p.relative_to(base).as_posix()) for label, ps in enumerate(members) for p in ps]
    return CarsData("dvm", base, [c.full for c in cars], train, [], cars, official_test=False)


def read_viewpoints(base: Path) -> dict[str, int]:
    """``Image_name`` -> ``Predicted_viewpoint`` (degrees) from ``Image_table.csv`` beside the copy at ``base``."""
    path = first_existing(*(d / IMAGE_TABLE for d in (base, base.parent, base.parent.parent)))
    if path is None:
        raise DatasetFormatError(f"no {IMAGE_TABLE} in {base} or the two folders above it: data.views needs "
                                 "DVM-CAR's image table (its Predicted_viewpoint column)")
    views = {}
    for n, row in enumerate(read_table(path), 2):
        try:
            views[row["Image_name"]] = int(float(row["Predicted_viewpoint"]))
        except (KeyError, ValueError) as e:
            raise DatasetFormatError(f"{path}, line {n}: expected Image_name and a numeric Predicted_viewpoint "
                                     f"({e})") from e
    return views


def keep_views(data: CarsData, views: list[int]) -> CarsData:
    """``data`` with only the images whose viewpoint (``Image_table.csv``) is one of ``views``; an image not in the
    table is left out too (both counted in the log). Classes left without an image are one error naming them."""
    table = read_viewpoints(data.root)
    wanted = {int(v) for v in views}
    kept = [s for s in data.train if table.get(s.path.name) in wanted]
    unlisted = sum(s.path.name not in table for s in data.train)
    log.info("%s: data.views=%s keeps %d of %d images (%d not in %s)", data.root, sorted(wanted), len(kept),
             len(data.train), unlisted, IMAGE_TABLE)
    return CarsData(data.format, data.root, data.class_names, kept, [], data.cars, data.official_test).validate()
