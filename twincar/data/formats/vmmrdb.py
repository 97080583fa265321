"""VMMRdb (2017): one folder per class, ``make_model_year`` in lower case (``ROOT/`` or ``ROOT/VMMRdb/``).

The year is the last ``_`` token. The make is the first token, or the first two for the makes of
:data:`MULTI_TOKEN_MAKES` (``alfa_romeo``, ``aston_martin``, ``am_general``, ``mercedes_benz``, ``land_rover``,
...); some folder names have spaces where others have ``_`` ("land rover_range rover_2005"): both separate words.
Makes are spelled as usual (:data:`MAKE_SPELLING`: ``mercedes_benz`` is "Mercedes-Benz", ``bmw`` "BMW"; any other
make is capitalised), models have each word capitalised ("range rover" is "Range Rover"). Folders that name the
same make, model and year are one class. VMMRdb has no split file (``CarsData.official_test`` is False: the
datamodule holds a seeded stratified share of each class out as test).
"""

from __future__ import annotations

import re
from pathlib import Path

from twincar.data.discovery import IMAGE_EXTENSIONS
from twincar.data.formats.common import CarsData, DatasetFormatError, Sample, car_classes

EXPECTS = "one folder per class named make_model_year (e.g. honda_civic_2005) holding its images, in ROOT or " \
          "ROOT/VMMRdb"
_FOLDER = re.compile(r"^(?P<head>.+?)[ _]+(?P<year>(19|20)\d\d)$")
# makes of two tokens, as VMMRdb writes them (spaces and '_' alike), and how they are spelled
MULTI_TOKEN_MAKES: dict[str, str] = {
    "alfa_romeo": "Alfa Romeo", "aston_martin": "Aston Martin", "am_general": "AM General",
    "mercedes_benz": "Mercedes-Benz", "land_rover": "Land Rover", "rolls_royce": "Rolls-Royce",
    "great_wall": "Great Wall", "american_motors": "American Motors",
}
MAKE_SPELLING: dict[str, str] = {
    "bmw": "BMW", "gmc": "GMC", "mg": "MG", "amc": "AMC", "mini": "MINI", "smart": "smart", "ram": "Ram",
    "mercedes-benz": "Mercedes-Benz", "rolls-royce": "Rolls-Royce", "mclaren": "McLaren", "vw": "VW",
}


def parse_folder(name: str) -> tuple[str, str, int] | None:
    """(make, model, year) of a ``make_model_year`` folder name; None when it does not end in a year."""
    m = _FOLDER.match(name.strip().lower())
    if m is None:
        return None
    tokens = [t for t in re.split(r"[ _]+", m["head"]) if t]
    if not tokens:
        return None
    two = "_".join(tokens[:2])
    if len(tokens) > 1 and two in MULTI_TOKEN_MAKES:
        make, rest = MULTI_TOKEN_MAKES[two], tokens[2:]
    else:
        make, rest = MAKE_SPELLING.get(tokens[0], tokens[0][:1].upper() + tokens[0][1:]), tokens[1:]
    return make, " ".join(w[:1].upper() + w[1:] for w in rest), int(m["year"])


def _class_folders(base: Path) -> list[Path]:
    return [p for p in base.iterdir() if p.is_dir() and parse_folder(p.name) is not None] if base.is_dir() else []


def find_vmmrdb(root: Path) -> Path | None:
    """The folder whose subfolders are mostly ``make_model_year`` folders (``root`` or ``root/VMMRdb``)."""
    for base in (root, root / "VMMRdb"):
        if not base.is_dir():
            continue
        folders = [p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if folders and 2 * len(_class_folders(base)) > len(folders):
            return base
    return None


def read_vmmrdb(base: Path) -> CarsData:
    """Every image of the class folders in ``base``; one class per make, model and year."""
    found = []
    for folder in sorted(_class_folders(base)):
        make, model, year = parse_folder(folder.name)
        found += [(make, model, year, p) for p in sorted(folder.iterdir())
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    if not found:
        raise DatasetFormatError(f"{base}: no images in its make_model_year folders")
    cars, members = car_classes(found)
    train = [Sample(p, label, name=f"{p.parent.name}/{p.name}") for label, ps in enumerate(members) for p in ps]
    return CarsData("vmmrdb", base, [c.full for c in cars], train, [], cars, official_test=False)
