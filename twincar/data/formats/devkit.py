"""The Stanford Cars devkit layout, as released and as Kaggle re-packed it.

``devkit`` (as released; torchvision's ``StanfordCars(root)`` reads it from ``root/stanford_cars/``)::

    ROOT/devkit/cars_meta.mat            class_names: 1 x 196 cell of strings, official order
    ROOT/devkit/cars_train_annos.mat     annotations: bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname
    ROOT/devkit/cars_test_annos.mat      annotations: the same without class
    ROOT/cars_test_annos_withlabels.mat  (optional, in ROOT or devkit/) test annotations with class
    ROOT/cars_train/00001.jpg ...   ROOT/cars_test/00001.jpg ...

``kaggle_devkit``: the same files with doubled image folders (``cars_train/cars_train/*.jpg``,
``cars_test/cars_test/*.jpg``) and the ``.mat`` files in ``devkit/`` or ``car_devkit/devkit/``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from twincar.data.formats.common import (
    BOX_FIELDS,
    UNLABELED,
    CarsData,
    DatasetFormatError,
    Sample,
    box,
    check_label,
    first_existing,
    read_names_mat,
    read_struct,
)

ANNOTATION_FIELDS = (*BOX_FIELDS, "class", "fname")
TEST_LABELS_FILE = "cars_test_annos_withlabels.mat"
DEVKIT_EXPECTS = (
    "devkit/cars_meta.mat, devkit/cars_train_annos.mat and cars_train/*.jpg (in ROOT or ROOT/stanford_cars)"
)
KAGGLE_DEVKIT_EXPECTS = "cars_train/cars_train/*.jpg with the devkit .mat files in devkit/ or car_devkit/devkit/"


def read_meta(path: str | Path) -> list[str]:
    """Class names from ``cars_meta.mat`` in file order (index i = class id i + 1)."""
    return read_names_mat(Path(path))


def read_annotations(path: str | Path) -> list[dict]:
    """Annotation records from a devkit ``*_annos.mat`` as dicts keyed by field name."""
    return read_struct(Path(path), (*BOX_FIELDS, "fname"))


def _to_samples(records: list[dict], image_dir: Path, num_classes: int, source: Path) -> list[Sample]:
    samples = []
    for i, r in enumerate(records):
        label = UNLABELED
        if "class" in r:
            label = check_label(r["class"], num_classes, source, f"annotation {i + 1} ({r['fname']})")
        samples.append(Sample(path=image_dir / str(r["fname"]), label=label, bbox=box(r)))
    return samples


def _read(fmt: str, base: Path, devkit: Path, train_dir: Path, test_dir: Path) -> CarsData:
    """Read a devkit tree whose ``.mat`` files are in ``devkit`` and images in ``train_dir`` / ``test_dir``."""
    meta = devkit / "cars_meta.mat"
    names = read_meta(meta)
    train_annos = devkit / "cars_train_annos.mat"
    train = _to_samples(read_annotations(train_annos), train_dir, len(names), train_annos)
    test_annos = first_existing(base / TEST_LABELS_FILE, devkit / TEST_LABELS_FILE, devkit / "cars_test_annos.mat")
    test = _to_samples(read_annotations(test_annos), test_dir, len(names), test_annos) if test_annos else []
    return CarsData(fmt, base, names, train, test)


def _bases(root: Path) -> list[Path]:
    return [root, root / "stanford_cars"]


def find_devkit(root: Path) -> Path | None:
    """The folder holding the released devkit layout: ``root`` or ``root/stanford_cars``."""
    for base in _bases(root):
        if ((base / "devkit" / "cars_meta.mat").is_file() and (base / "devkit" / "cars_train_annos.mat").is_file()
                and (base / "cars_train").is_dir() and not (base / "cars_train" / "cars_train").is_dir()):
            return base
    return None


def read_devkit(base: Path) -> CarsData:
    """The released devkit layout at ``base`` (see :func:`find_devkit`)."""
    return _read("devkit", base, base / "devkit", base / "cars_train", base / "cars_test")


def find_kaggle_devkit(root: Path) -> Path | None:
    """The folder holding ``cars_train/cars_train/``: ``root`` or ``root/stanford_cars``."""
    return next((b for b in _bases(root) if (b / "cars_train" / "cars_train").is_dir()), None)


def read_kaggle_devkit(base: Path) -> CarsData:
    """Kaggle's copy: doubled image folders, ``.mat`` files in ``devkit/`` or ``car_devkit/devkit/``."""
    devkit = first_existing(*(d for d in (base / "devkit", base / "car_devkit" / "devkit")
                              if (d / "cars_train_annos.mat").is_file()))
    if devkit is None:
        annos = first_existing(base / "cars_annos.mat", base / "car_devkit" / "cars_annos.mat")
        if annos is not None:
            raise DatasetFormatError(
                f"{base}: only {annos} found, whose paths (car_ims/000001.jpg, 6 digits) do not match the images "
                "here (cars_train/cars_train/00001.jpg, 5 digits): put the devkit's cars_meta.mat and "
                "cars_train_annos.mat (and cars_test_annos_withlabels.mat) in devkit/"
            )
        raise DatasetFormatError(
            f"{base}: no cars_train_annos.mat in devkit/ or car_devkit/devkit/: the Kaggle devkit copy needs "
            "the devkit .mat files next to cars_train/cars_train/"
        )
    test_dir = base / "cars_test" / "cars_test"
    return _read("kaggle_devkit", base, devkit, base / "cars_train" / "cars_train", test_dir)


def write_meta(path: str | Path, class_names: list[str]) -> None:
    """Write ``cars_meta.mat`` with the same structure as the released file."""
    cells = np.empty((1, len(class_names)), dtype=object)
    for i, n in enumerate(class_names):
        cells[0, i] = np.array([n])
    scipy.io.savemat(str(path), {"class_names": cells})


def write_annotations(path: str | Path, samples: list[Sample], with_class: bool) -> None:
    """Write a devkit ``*_annos.mat`` (1 x N struct) for ``samples``; class ids become 1-based."""
    fields = [f for f in ANNOTATION_FIELDS if with_class or f != "class"]
    annos = np.empty((1, len(samples)), dtype=[(f, object) for f in fields])
    for i, s in enumerate(samples):
        if s.bbox is None:
            raise ValueError(f"sample {s.path.name} has no bbox; the devkit format requires one")
        values = dict(zip(BOX_FIELDS, s.bbox, strict=True))
        values["class"] = s.label + 1
        row = [np.array([[values[f]]], dtype=np.uint16) for f in fields if f != "fname"]
        annos[0, i] = (*row, np.array([s.path.name]))
    scipy.io.savemat(str(path), {"annotations": annos})
