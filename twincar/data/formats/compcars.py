"""CompCars web-nature (2015): ``data/image/<make_id>/<model_id>/<year>/<hash>.jpg`` and its classification split.

``data/train_test_split/classification/{train,test}.txt`` list images as ``78/1/2014/3ac218c0c6c378.jpg``
(the official split, used as train and test). A class is make + model + year. Names come from
``data/misc/make_model_name.mat`` (``make_names`` and ``model_names``, indexed by the 1-based ids), many of them
empty: an empty (or missing) name reads "Make 78" / "Model 1". Two model ids with the same names get the id
in brackets. Images whose year is ``unknown`` are left out (counted in the log), and so are test images of a
class with no training image. A listed image that is missing stays in the list: the datamodule's image check
counts it and applies ``data.on_corrupt`` (``skip`` leaves it out and names it). The car box is read from
``data/label/<same path>.txt`` (viewpoint, box count, ``x1 y1 x2 y2``) when there (``data.crop_to_bbox``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from twincar.data.formats.common import CarsData, DatasetFormatError, Sample, car_classes, loadmat

log = logging.getLogger(__name__)

SPLIT = Path("train_test_split") / "classification"
NAMES_MAT = Path("misc") / "make_model_name.mat"
EXPECTS = "data/image/<make_id>/<model_id>/<year>/*.jpg with data/train_test_split/classification/{train,test}.txt " \
          "(and data/misc/make_model_name.mat)"


def find_compcars(root: Path) -> Path | None:
    """The ``data`` folder holding ``image/`` and the classification split (``root/data``, ``root`` or
    ``root/CompCars/data``)."""
    for base in (root / "data", root, root / "CompCars" / "data"):
        if (base / "image").is_dir() and (base / SPLIT / "train.txt").is_file():
            return base
    return None


def _cell_strings(path: Path, key: str) -> list[str]:
    """A cell array of strings; an empty cell is ''."""
    return [" ".join(str(a.reshape(-1)[0]).split()) if a.size else "" for a in
            (np.asarray(c) for c in loadmat(path, key).reshape(-1))]


def read_names(path: Path) -> tuple[list[str], list[str]]:
    """``make_names`` and ``model_names`` of ``make_model_name.mat`` (index = id - 1); none without the file."""
    if not path.is_file():
        log.warning("%s is missing: makes and models are named by their ids", path)
        return [], []
    return _cell_strings(path, "make_names"), _cell_strings(path, "model_names")


def _name(names: list[str], id_: int, what: str) -> str:
    return names[id_ - 1] if 0 < id_ <= len(names) and names[id_ - 1] else f"{what} {id_}"


def _box(label_file: Path) -> tuple[int, int, int, int] | None:
    """The car box of a label file (viewpoint, count, ``x1 y1 x2 y2``); None when absent or unreadable."""
    try:
        lines = label_file.read_text().split("\n")
        x1, y1, x2, y2 = (int(float(v)) for v in lines[2].split()[:4])
    except (OSError, IndexError, ValueError):
        return None
    return (max(1, x1), max(1, y1), x2, y2) if x2 > x1 and y2 > y1 else None


def read_compcars(base: Path) -> CarsData:
    """The official classification split of the copy in ``base``."""
    makes, models = read_names(base / NAMES_MAT)
    entries: dict[str, list[tuple[str, int, int, int]]] = {}
    unknown = 0
    for split in ("train", "test"):
        path = base / SPLIT / f"{split}.txt"
        if not path.is_file():
            raise DatasetFormatError(f"{path} is missing (the CompCars classification split)")
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            rel = line.strip()
            if not rel:
                continue
            parts = rel.split("/")
            if len(parts) != 4 or not parts[0].isdigit() or not parts[1].isdigit():
                raise DatasetFormatError(f"{path}, line {n}: expected make_id/model_id/year/file.jpg, got {rel!r}")
            if not parts[2].isdigit():
                unknown += 1  # 'unknown' year
                continue
            rows.append((rel, int(parts[0]), int(parts[1]), int(parts[2])))
        entries[split] = rows
    if unknown:
        log.warning("%s: %d image(s) of unknown year left out", base / SPLIT, unknown)
    names: dict[tuple[int, int], tuple[str, str]] = {}
    for _, make_id, model_id, _ in entries["train"] + entries["test"]:
        names.setdefault((make_id, model_id), (_name(makes, make_id, "Make"), _name(models, model_id, "Model")))
    spelled: dict[tuple[str, str], set[int]] = {}
    for (_, model_id), (make, model) in names.items():
        spelled.setdefault((make.casefold(), model.casefold()), set()).add(model_id)
    for key, (make, model) in names.items():
        if len(spelled[(make.casefold(), model.casefold())]) > 1:  # two models named alike: keep them apart
            names[key] = (make, f"{model} ({key[1]})")

    def sample(rel: str, label: int) -> Sample:
        return Sample(base / "image" / rel, label, _box((base / "label" / rel).with_suffix(".txt")), name=rel)

    cars, members = car_classes([(*names[(mk, md)], year, rel) for rel, mk, md, year in entries["train"]])
    label_of = {(c.make.casefold(), c.model.casefold(), c.year): i for i, c in enumerate(cars)}
    train = [sample(rel, label) for label, rels in enumerate(members) for rel in rels]
    test, unseen = [], 0
    for rel, mk, md, year in entries["test"]:
        make, model = names[(mk, md)]
        label = label_of.get((make.casefold(), model.casefold(), year))
        if label is None:
            unseen += 1
        else:
            test.append(sample(rel, label))
    if unseen:
        log.warning("%s: %d test image(s) of a make, model and year with no training image left out",
                    base / SPLIT, unseen)
    return CarsData("compcars", base, [c.full for c in cars], train, test, cars)
