"""On-disk dataset layouts -> a list of :class:`Sample` plus class names.

The Stanford Cars devkit layout (as released, and as torchvision's ``StanfordCars`` expects)::

    ROOT/
      devkit/cars_meta.mat            class_names: 1 x 196 cell of strings, official order
      devkit/cars_train_annos.mat     annotations: bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname
      devkit/cars_test_annos.mat      annotations: the same without class
      cars_test_annos_withlabels.mat  (optional, in ROOT or devkit/) test annotations with class
      cars_train/00001.jpg ...
      cars_test/00001.jpg ...

Annotation fields are read by name, never by position; class ids in the files are 1-based and
become 0-based labels here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.io

from twincar.errors import TwinCarError

Split = Literal["train", "test"]
ANNOTATION_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
TEST_LABELS_FILE = "cars_test_annos_withlabels.mat"
UNLABELED = -1


class DatasetFormatError(TwinCarError, ValueError):
    """A dataset file is missing or not in the expected layout; the message names the file."""


@dataclass(frozen=True)
class Sample:
    """One image: its file, its 0-based label (``UNLABELED`` if unknown) and its box.

    ``bbox`` is (x1, y1, x2, y2) in pixels, as in the devkit (1-based, inclusive).
    """

    path: Path
    label: int
    bbox: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class DevkitPaths:
    """Where each part of a Stanford Cars copy lives."""

    root: Path
    meta: Path
    train_annos: Path
    test_annos: Path
    test_labels: Path | None
    train_dir: Path
    test_dir: Path

    @classmethod
    def locate(cls, root: str | Path) -> DevkitPaths:
        """Find the devkit files under ``root``; raise one clear error naming what is missing."""
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DatasetFormatError(
                f"dataset root {root} does not exist: pass data.root=PATH to a Stanford Cars copy "
                "(devkit/, cars_train/, cars_test/) or use data=synthetic"
            )
        devkit = root / "devkit"
        labels = [p for p in (root / TEST_LABELS_FILE, devkit / TEST_LABELS_FILE) if p.is_file()]
        paths = cls(
            root=root,
            meta=devkit / "cars_meta.mat",
            train_annos=devkit / "cars_train_annos.mat",
            test_annos=devkit / "cars_test_annos.mat",
            test_labels=labels[0] if labels else None,
            train_dir=root / "cars_train",
            test_dir=root / "cars_test",
        )
        for p in (paths.meta, paths.train_annos, paths.train_dir):
            if not p.exists():
                raise DatasetFormatError(f"{p} is missing: {root} is not in the Stanford Cars devkit layout")
        return paths


def _loadmat(path: Path, key: str) -> np.ndarray:
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


def _scalar(value: np.ndarray):
    """A MATLAB cell/struct field is a nested 1x1 array; return the Python value inside."""
    return np.asarray(value).reshape(-1)[0].item()


def read_meta(path: str | Path) -> list[str]:
    """Class names from ``cars_meta.mat`` in file order (index i = class id i + 1)."""
    cells = _loadmat(Path(path), "class_names").reshape(-1)
    return [str(_scalar(c)).strip() for c in cells]


def read_annotations(path: str | Path) -> list[dict]:
    """Annotation records from a devkit ``*_annos.mat`` as dicts keyed by field name."""
    path = Path(path)
    annos = _loadmat(path, "annotations").reshape(-1)
    fields = annos.dtype.names or ()
    missing = [f for f in ANNOTATION_FIELDS if f != "class" and f not in fields]
    if missing:
        raise DatasetFormatError(f"{path} annotations lack field(s) {', '.join(missing)}")
    return [{f: _scalar(a[f]) for f in fields} for a in annos]


def _to_samples(records: list[dict], image_dir: Path, num_classes: int, source: Path) -> list[Sample]:
    samples = []
    for i, r in enumerate(records):
        label = UNLABELED
        if "class" in r:
            cid = int(r["class"])
            if not 1 <= cid <= num_classes:
                raise DatasetFormatError(
                    f"{source}: annotation {i + 1} ({r['fname']}) has class {cid}, outside 1..{num_classes}"
                )
            label = cid - 1
        bbox = tuple(int(r[k]) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
        samples.append(Sample(path=image_dir / str(r["fname"]), label=label, bbox=bbox))
    return samples


def load_stanford_cars(root: str | Path, split: Split) -> tuple[list[Sample], list[str]]:
    """Samples of one official split and the class names.

    Test samples carry labels only when ``cars_test_annos_withlabels.mat`` is present;
    otherwise their label is ``UNLABELED``.
    """
    paths = DevkitPaths.locate(root)
    names = read_meta(paths.meta)
    if split == "train":
        annos, image_dir = paths.train_annos, paths.train_dir
    elif split == "test":
        annos, image_dir = paths.test_labels or paths.test_annos, paths.test_dir
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return _to_samples(read_annotations(annos), image_dir, len(names), annos), names


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
        values = dict(zip(("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"), s.bbox, strict=True))
        values["class"] = s.label + 1
        row = [np.array([[values[f]]], dtype=np.uint16) for f in fields if f != "fname"]
        annos[0, i] = (*row, np.array([s.path.name]))
    scipy.io.savemat(str(path), {"annotations": annos})
