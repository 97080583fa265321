"""Kaggle's class-folder copy: ``car_data/car_data/{train,test}/<Class Name>/*.jpg`` plus ``names.csv``.

``names.csv`` (no header) lists the 196 names in the official order; ``anno_train.csv`` /
``anno_test.csv`` (optional, no header) hold ``fname,x1,y1,x2,y2,class`` with 1-based classes.
Folders are mapped to labels through ``names.csv`` (never by alphabetical folder order, which differs
from the official ids for 143 of 196 classes), case-insensitively, with ``/`` in a name spelled ``-`` in
its folder ("Ram C-V Cargo Van Minivan 2012").
"""

from __future__ import annotations

import csv
from pathlib import Path

from twincar.data.classes import name_key
from twincar.data.formats.common import CarsData, DatasetFormatError, Sample, check_label, first_existing

EXPECTS = "car_data/car_data/{train,test}/<Class Name>/*.jpg with names.csv (or train/<Class Name>/ in ROOT)"


def folder_key(name: str) -> str:
    """How a class name and its folder are matched: the class-name rule (:func:`~twincar.data.classes.name_key`),
    with ``/`` (which no folder name can hold) as ``-``."""
    return name_key(name.replace("/", "-"))


def read_names_csv(path: Path) -> list[str]:
    """Class names from ``names.csv`` (no header, one name a line, official order)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r and r[0].strip()]
    except OSError as e:
        raise DatasetFormatError(f"cannot read {path}: {e.strerror or e}") from e
    if not rows:
        raise DatasetFormatError(f"{path} lists no class names")
    return [",".join(r).strip() for r in rows]  # a name with a comma was split by the csv reader


def _split_dirs(root: Path) -> Path | None:
    for base in (root / "car_data" / "car_data", root / "car_data", root):
        train = base / "train"
        if train.is_dir() and any(p.is_dir() for p in train.iterdir()):
            return base
    return None


def find_kaggle_folders(root: Path) -> Path | None:
    """The folder holding ``train/<Class Name>/`` (``root/car_data/car_data``, ``root/car_data`` or ``root``)."""
    return _split_dirs(root)


def _read_boxes(path: Path | None, num_classes: int) -> dict[str, tuple[tuple[int, int, int, int], int]]:
    if path is None:
        return {}
    boxes = {}
    with path.open(newline="", encoding="utf-8-sig") as f:
        for line, row in enumerate(csv.reader(f), 1):
            if not row:
                continue
            try:
                fname, *values = (v.strip() for v in row)
                x1, y1, x2, y2, cls = (int(float(v)) for v in values)
            except ValueError as e:
                raise DatasetFormatError(
                    f"{path}, line {line}: expected fname,x1,y1,x2,y2,class (no header), got {','.join(row)}"
                ) from e
            boxes[fname] = ((x1, y1, x2, y2), check_label(cls, num_classes, path, f"line {line} ({fname})"))
    return boxes


def read_kaggle_folders(base: Path) -> CarsData:
    """Both splits of the class-folder copy whose ``train/`` and ``test/`` are in ``base``."""
    from twincar.data.images import IMAGE_EXTENSIONS  # here: data.images imports this package

    top = [base, base.parent, base.parent.parent]
    names_csv = first_existing(*(d / "names.csv" for d in top))
    if names_csv is None:
        raise DatasetFormatError(
            f"no names.csv in {base} or the two folders above it: the Kaggle class-folder copy ships it "
            "(196 names, official order); folders cannot be mapped to the official class ids without it"
        )
    names = read_names_csv(names_csv)
    label_of = {folder_key(n): i for i, n in enumerate(names)}
    splits = {}
    for split in ("train", "test"):
        boxes = _read_boxes(first_existing(*(d / f"anno_{split}.csv" for d in top)), len(names))
        samples = []
        split_dir = base / split
        for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()) if split_dir.is_dir() else []:
            label = label_of.get(folder_key(folder.name))
            if label is None:
                raise DatasetFormatError(f"{folder}: folder name matches no class name in {names_csv}")
            for img in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
                bbox, anno_label = boxes.get(img.name, (None, label))
                if anno_label != label:
                    raise DatasetFormatError(
                        f"{img}: its folder says '{names[label]}' but the annotation CSV says '{names[anno_label]}'"
                    )
                samples.append(Sample(img, label, bbox, name=f"{folder.name}/{img.name}"))
        splits[split] = samples
    return CarsData("kaggle_folders", base, names, splits["train"], splits["test"])
