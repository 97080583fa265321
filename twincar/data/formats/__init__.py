"""On-disk dataset layouts -> one :class:`CarsData` (samples of both splits + class names).

Five readers of Stanford Cars, one per way labs have the dataset, and one each for DVM-CAR, CompCars and VMMRdb
(see each module's docstring):

=================  ============================================================================
``devkit``         ``devkit/*.mat`` + ``cars_train/`` + ``cars_test/`` (in ROOT or ROOT/stanford_cars)
``full``           ``car_ims/`` + ``cars_annos.mat`` (train/test from its ``test`` flag)
``kaggle_folders`` ``car_data/car_data/{train,test}/<Class Name>/`` + ``names.csv`` (+ ``anno_*.csv``)
``kaggle_devkit``  ``cars_train/cars_train/``, ``cars_test/cars_test/`` + ``devkit/`` or ``car_devkit/devkit/``
``parquet``        Hugging Face ``data/{train,test}-*.parquet`` (image bytes + label, names in the schema)
``dvm``            DVM-CAR: ``resized_DVM/<Maker>/<Genmodel>/<Year>/<Color>/*.jpg`` + ``Basic_table.csv``
``compcars``       CompCars web-nature: ``data/image/<make>/<model>/<year>/*.jpg`` + its classification split
``vmmrdb``         VMMRdb: one ``make_model_year`` folder per class
=================  ============================================================================

The Stanford Cars readers give names only (make, model and year are parsed from them); the other three give each
class's make, model and year as their metadata has them (``CarsData.cars``). DVM-CAR and VMMRdb have no test
split (``CarsData.official_test`` False).

:func:`load_dataset` reads a root with one of them, or detects which (``format="auto"``). Every
reader reads fields by name, turns 1-based class ids into 0-based labels (checking 1..K) and keeps
1-based inclusive boxes as ``Sample.bbox``. :func:`load_sample` decodes any sample's image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from twincar.data.classes import CarName, parse_car_name
from twincar.data.formats import compcars, dvm, full, kaggle, parquet, vmmrdb
from twincar.data.formats.common import UNLABELED, CarsData, DatasetFormatError, Sample, read_names_mat
from twincar.data.formats.devkit import (
    DEVKIT_EXPECTS,
    KAGGLE_DEVKIT_EXPECTS,
    TEST_LABELS_FILE,
    find_devkit,
    find_kaggle_devkit,
    read_annotations,
    read_devkit,
    read_kaggle_devkit,
    read_meta,
    write_annotations,
    write_meta,
)


@dataclass(frozen=True)
class Layout:
    """One on-disk layout: what it expects, how to find it under a root, how to read it."""

    name: str
    expects: str  # what a root of this layout holds, for error messages
    find: Callable[[Path], Path | None]  # the folder the layout sits in under a root, or None
    read: Callable[[Path], CarsData]  # read it from that folder


# Detection order: the released devkit first (it is what the others were made from).
LAYOUTS: dict[str, Layout] = {
    lay.name: lay
    for lay in (
        Layout("devkit", DEVKIT_EXPECTS, find_devkit, read_devkit),
        Layout("kaggle_devkit", KAGGLE_DEVKIT_EXPECTS, find_kaggle_devkit, read_kaggle_devkit),
        Layout("full", full.EXPECTS, full.find_full, full.read_full),
        Layout("kaggle_folders", kaggle.EXPECTS, kaggle.find_kaggle_folders, kaggle.read_kaggle_folders),
        Layout("parquet", parquet.EXPECTS, parquet.find_parquet, parquet.read_parquet),
        Layout("dvm", dvm.EXPECTS, dvm.find_dvm, dvm.read_dvm),
        Layout("compcars", compcars.EXPECTS, compcars.find_compcars, compcars.read_compcars),
        Layout("vmmrdb", vmmrdb.EXPECTS, vmmrdb.find_vmmrdb, vmmrdb.read_vmmrdb),  # last: the loosest test
    )
}
FORMATS = ("auto", *LAYOUTS)


def detect(root: str | Path, format: str = "auto") -> tuple[Layout, Path]:
    """The layout of the copy at ``root`` and the folder it sits in; one error listing what was tried."""
    root = Path(root).expanduser()
    if format not in FORMATS:
        raise DatasetFormatError(f"data.format={format} is not one of {', '.join(FORMATS)}")
    if root.exists() and not root.is_dir():
        raise DatasetFormatError(f"dataset root {root} is a file, not a folder: pass data.root=PATH to the folder of "
                                 "a Stanford Cars copy (or use data=synthetic)")
    if not root.is_dir():
        raise DatasetFormatError(
            f"dataset root {root} does not exist: pass data.root=PATH to a Stanford Cars copy "
            "(devkit/, cars_train/, cars_test/, or another layout) or use data=synthetic"
        )
    tried = list(LAYOUTS.values()) if format == "auto" else [LAYOUTS[format]]
    for layout in tried:
        base = layout.find(root)
        if base is not None:
            return layout, base
    if format != "auto":
        raise DatasetFormatError(
            f"{root} is not in the {format} layout: expected {LAYOUTS[format].expects} (format auto detects the layout)"
        )
    listing = "; ".join(f"{lay.name}: {lay.expects}" for lay in tried)
    raise DatasetFormatError(f"{root} matches no known dataset layout; tried {listing}")


def load_dataset(root: str | Path, format: str = "auto") -> CarsData:
    """Read the copy at ``root`` in layout ``format`` (``auto``: detect it); checked with :meth:`CarsData.validate`."""
    layout, base = detect(root, format)
    return layout.read(base).validate()


def load_stanford_cars(root: str | Path, split: str, format: str = "auto") -> tuple[list[Sample], list[str]]:
    """Samples of one official split (``train`` or ``test``) and the class names.

    Test samples carry labels only when the copy has them; otherwise their label is ``UNLABELED``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    layout, base = detect(root, format)
    data = layout.read(base)
    return (data.train if split == "train" else data.test), data.class_names


def read_classes_from(path: str | Path) -> tuple[list[str], list[CarName]]:
    """Class names in label order and each class's make, model and year, from a dataset root of any layout (its
    metadata's make/model/year where it has them, :attr:`CarsData.car_names`), or from one ``cars_meta.mat``,
    ``cars_annos.mat``, ``names.csv`` or ``.parquet`` file (parsed from the names)."""
    path = Path(path).expanduser()
    if path.is_dir():
        layout, base = detect(path)
        data = layout.read(base)
        return data.class_names, data.car_names
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DatasetFormatError(f"{path} does not exist: pass a dataset root or a class-name file")
    if suffix == ".mat":
        names = read_names_mat(path)
    elif suffix == ".csv":
        names = kaggle.read_names_csv(path)
    elif suffix == ".parquet":
        names = parquet.read_class_names(path)
    else:
        raise DatasetFormatError(
            f"{path}: cannot read class names from a {suffix or 'suffix-less'} file "
            "(use a dataset root, cars_meta.mat, cars_annos.mat, names.csv or a .parquet file)"
        )
    return names, [parse_car_name(n) for n in names]


__all__ = [
    "FORMATS", "LAYOUTS", "TEST_LABELS_FILE", "UNLABELED", "CarsData", "DatasetFormatError", "Layout", "Sample",
    "detect", "load_dataset", "load_stanford_cars", "read_annotations", "read_classes_from",
    "read_meta", "write_annotations", "write_meta",
]
