"""The embedded fine-grained dataset: procedural cars written in the Stanford Cars devkit layout.

The real Stanford Cars images cannot be downloaded everywhere, so TwinCar can generate a small
stand-in that the same loader (:func:`twincar.data.formats.load_stanford_cars`) reads::

    ROOT/devkit/cars_meta.mat  ROOT/devkit/cars_train_annos.mat  ROOT/devkit/cars_test_annos.mat
    ROOT/cars_test_annos_withlabels.mat  ROOT/cars_train/00001.jpg ...  ROOT/cars_test/00001.jpg ...

Classes are real Stanford Cars names (:func:`select_classes`); each image is drawn by
:func:`twincar.data.synthetic.render.render_car`, where the model sets the silhouette, the make shared
details and the year only a small "facelift" detail, under random pose, background, lighting and
noise scaled by one knob, ``SyntheticSpec.difficulty``.

Generation is deterministic (each image has its own ``numpy`` generator seeded with
``[seed, split_id, file_number]``), cached (a marker file written last) and atomic (written
into a temporary sibling directory, then renamed). Command line::

    python -m twincar.synthetic --out data/synthetic --num-classes 14
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from twincar.data.classes import parse_car_name, stanford_cars_class_names
from twincar.data.formats import TEST_LABELS_FILE, Sample, write_annotations, write_meta
from twincar.data.synthetic.render import render_car
from twincar.files import write_json

# Bump whenever the images or files written for a given spec change: it is part of
# SyntheticSpec.fingerprint(), so caches keyed on the fingerprint are invalidated.
GENERATOR_VERSION = "1"
# Written last into ROOT; its presence (with a matching fingerprint) means "complete".
MARKER_FILE = ".twincar_synthetic.json"
JPEG_QUALITY = 90
# Second word of each image's seed; the third is the 1-based file number (0 = label order).
SPLIT_IDS: dict[str, int] = {"train": 1, "test": 2, "unknown": 3}

_MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: posix, Created by: twincar.data.synthetic"


# --------------------------------------------------------------------------------------------
# The spec


def _integer(value, name: str) -> int:
    """``value`` as an int (ints and numpy ints; not bools, floats or strings), else a ValueError."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate; equal specs give byte-identical datasets.

    Attributes:
        num_classes: how many classes, 1..196, chosen by :func:`select_classes` (the default 14
            is the 7 real families that come in two years, i.e. 7 pairs of year-siblings).
        train_per_class: images per class in ``cars_train`` (>= 1).
        test_per_class: images per class in ``cars_test`` (>= 1).
        width: image width in pixels (32..4096); 128 x 96 keeps the 4:3 of the real photos.
        height: image height in pixels (32..4096).
        difficulty: nuisance strength in [0, 1]; every range grows linearly with it (the table
            is :meth:`twincar.data.synthetic.render.Nuisance.from_difficulty`): pose range (scale, 3/4 yaw, roll,
            how far the
            car may leave the frame), background (fewer plain studio backdrops, more outdoor
            scenes and abstract colour fields, more clutter, occluders), blur, lighting and
            colour-cast spread, sensor noise, and the size of the year detail (100% at 0, 75%
            at 1). 0 is clean and centred; the default 0.5 is moderate.
        seed: base random seed (>= 0); each image uses ``[seed, split_id, file_number]``.
        unknown_classes: how many more classes to render as an open-set split (:func:`generate_unknown`):
            ``test_per_class`` images each of classes never in the dataset (near out-of-distribution: other
            models and years of the same makes, from the same renderer). 0: none. Not part of the dataset's
            fingerprint: the known dataset is the same whatever this is.
    """

    num_classes: int = 14
    train_per_class: int = 40
    test_per_class: int = 10
    width: int = 128
    height: int = 96
    difficulty: float = 0.5
    seed: int = 0
    unknown_classes: int = 0

    def __post_init__(self) -> None:
        limits = {
            "num_classes": (1, len(stanford_cars_class_names())),
            "train_per_class": (1, 100_000),
            "test_per_class": (1, 100_000),
            "width": (32, 4096),
            "height": (32, 4096),
            "seed": (0, 2**63 - 1),
            "unknown_classes": (0, len(stanford_cars_class_names()) - 1),
        }
        for name, (lo, hi) in limits.items():
            value = _integer(getattr(self, name), f"SyntheticSpec.{name}")
            if not lo <= value <= hi:
                raise ValueError(f"SyntheticSpec.{name} must be in {lo}..{hi}, got {value}")
            object.__setattr__(self, name, value)
        try:
            difficulty = float(self.difficulty)
        except (TypeError, ValueError):
            raise ValueError(f"SyntheticSpec.difficulty must be a number, got {self.difficulty!r}") from None
        if not 0.0 <= difficulty <= 1.0:  # also rejects NaN
            raise ValueError(f"SyntheticSpec.difficulty must be in [0, 1], got {self.difficulty!r}")
        object.__setattr__(self, "difficulty", difficulty)
        if self.num_classes + self.unknown_classes > len(stanford_cars_class_names()):
            raise ValueError(f"SyntheticSpec.num_classes + unknown_classes must be at most "
                             f"{len(stanford_cars_class_names())}, got {self.num_classes} + {self.unknown_classes}")

    def dataset_fields(self) -> dict:
        """The fields that make the (known) dataset: every one but ``unknown_classes``."""
        fields = asdict(self)
        fields.pop("unknown_classes")
        return fields

    def fingerprint(self) -> str:
        """A short stable hash of every dataset field and ``GENERATOR_VERSION``, e.g. to name a cache dir."""
        text = json.dumps({"generator_version": GENERATOR_VERSION, **self.dataset_fields()}, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Which classes


def sibling_families(names: list[str] | None = None) -> list[list[str]]:
    """Families that occur with several years, each as its names in list order.

    Families are ordered by first appearance in ``names`` (default: the official list, where
    this gives the 7 two-year families, Audi S4 Sedan ... Volkswagen Golf Hatchback).
    """
    names = stanford_cars_class_names() if names is None else names
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(parse_car_name(name).family, []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def select_classes(num_classes: int) -> list[str]:
    """A deterministic choice of ``num_classes`` real Stanford Cars names, in label order.

    Whole year-sibling families come first (in official order: for 14 classes exactly the 7
    two-year pairs), so the set is fine-grained. The remaining slots (beyond 14, or one for an
    odd count) take other models of the sibling families' makes, one make at a time in
    turn, then the rest of the list in official order. The result keeps the official order,
    so label i is always the i-th chosen name as it appears in ``cars_meta.mat``.
    """
    official = stanford_cars_class_names()
    num_classes = _integer(num_classes, "num_classes")
    if not 1 <= num_classes <= len(official):
        raise ValueError(
            f"num_classes must be between 1 and {len(official)} (Stanford Cars has {len(official)} classes), "
            f"got {num_classes}"
        )
    families = sibling_families(official)
    chosen: list[str] = []
    for group in families:
        if len(chosen) + len(group) <= num_classes:
            chosen.extend(group)
    taken = set(chosen)
    makes = list(dict.fromkeys(parse_car_name(g[0]).make for g in families))
    queues = [[n for n in official if n not in taken and parse_car_name(n).make == m] for m in makes]
    fill: list[str] = []
    while any(queues):  # round robin over the makes
        fill.extend(q.pop(0) for q in queues if q)
    queued = set(fill)
    fill += [n for n in official if n not in taken and n not in queued]
    chosen += fill[: num_classes - len(chosen)]
    order = {n: i for i, n in enumerate(official)}
    return sorted(chosen, key=order.__getitem__)


# --------------------------------------------------------------------------------------------
# Writing a dataset


def split_labels(spec: SyntheticSpec, split: str) -> list[int]:
    """Label of each file of a split, in file order: ``per_class`` of each class, shuffled."""
    per_class = spec.train_per_class if split == "train" else spec.test_per_class
    labels = np.repeat(np.arange(spec.num_classes), per_class)
    return [int(v) for v in np.random.default_rng([spec.seed, SPLIT_IDS[split], 0]).permutation(labels)]


def render_sample(
    spec: SyntheticSpec, split: str, number: int, class_name: str
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Image ``number`` (1-based) of a split, independent of the order images are made in."""
    rng = np.random.default_rng([spec.seed, SPLIT_IDS[split], number])
    return render_car(parse_car_name(class_name), rng, spec.width, spec.height, spec.difficulty)


def _fix_mat_header(path: Path) -> None:
    """scipy stamps the creation time into a .mat header; a fixed text keeps files reproducible."""
    with open(path, "r+b") as f:
        f.write(_MAT_HEADER.ljust(116, b" "))


def _marker(spec: SyntheticSpec, names: list[str]) -> dict:
    return {"generator": "twincar.data.synthetic", "generator_version": GENERATOR_VERSION,
            "fingerprint": spec.fingerprint(), "spec": spec.dataset_fields(), "class_names": names}


def is_complete(root: str | Path, spec: SyntheticSpec) -> bool:
    """Whether ``root`` already holds the complete dataset for ``spec`` (its marker matches)."""
    try:
        marker = json.loads((Path(root) / MARKER_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict):
        return False
    return marker.get("fingerprint") == spec.fingerprint() and marker.get("spec") == spec.dataset_fields()


def _write(root: Path, spec: SyntheticSpec) -> None:
    names = select_classes(spec.num_classes)
    (root / "devkit").mkdir()
    samples: dict[str, list[Sample]] = {}
    for split in ("train", "test"):
        image_dir = root / f"cars_{split}"
        image_dir.mkdir()
        labels = split_labels(spec, split)
        digits = max(5, len(str(len(labels))))
        samples[split] = []
        for number, label in enumerate(labels, start=1):
            img, bbox = render_sample(spec, split, number, names[label])
            fname = f"{number:0{digits}d}.jpg"
            img.save(image_dir / fname, "JPEG", quality=JPEG_QUALITY)
            samples[split].append(Sample(path=Path(fname), label=label, bbox=bbox))
    mats = [root / "devkit" / "cars_meta.mat", root / "devkit" / "cars_train_annos.mat",
            root / "devkit" / "cars_test_annos.mat", root / TEST_LABELS_FILE]
    write_meta(mats[0], names)
    write_annotations(mats[1], samples["train"], with_class=True)
    write_annotations(mats[2], samples["test"], with_class=False)
    write_annotations(mats[3], samples["test"], with_class=True)
    for path in mats:
        _fix_mat_header(path)
    write_json(root / MARKER_FILE, _marker(spec, names))  # last: marks it complete


def generate(root: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write the dataset for ``spec`` to ``root`` (devkit layout) and return ``root``.

    Cached: if ``root`` already holds this spec's complete dataset, nothing is written. Otherwise
    everything goes into a temporary sibling directory that is renamed to ``root`` at the end, so
    ``root`` is never seen half-written; if another process finished first, its copy is kept.
    Raises FileExistsError if ``root`` holds anything else (it is never deleted).
    """
    root = Path(root).expanduser().absolute()
    if is_complete(root, spec):
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(
            f"{root} exists and is not the synthetic dataset for this spec (fingerprint {spec.fingerprint()}); "
            "generate into an empty or new directory (e.g. one named after SyntheticSpec.fingerprint()) or remove it"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset should be readable like any dir
        _write(tmp, spec)
        try:
            os.rename(tmp, root)  # atomic; also replaces an empty directory
        except OSError:
            if not is_complete(root, spec):
                raise FileExistsError(
                    f"{root} appeared while generating and is not the synthetic dataset for this spec"
                ) from None
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


# --------------------------------------------------------------------------------------------
# The open-set split: classes never in the dataset


def unknown_class_names(spec: SyntheticSpec) -> list[str]:
    """The ``unknown_classes`` names :func:`select_classes` would add next (other models of the same makes first),
    none of which is in the dataset."""
    known = set(select_classes(spec.num_classes))
    return [n for n in select_classes(spec.num_classes + spec.unknown_classes) if n not in known]


def unknown_root(root: str | Path) -> Path:
    """Where :func:`generate_unknown` writes the open-set images of the dataset at ``root``: a sibling folder."""
    root = Path(root).expanduser().absolute()
    return root.with_name(f"{root.name}.unknown")


def generate_unknown(root: str | Path, spec: SyntheticSpec) -> list[Sample]:
    """Render ``test_per_class`` images of each of the spec's unknown classes (:func:`unknown_class_names`) into
    ``unknown_root(root)/<N>/`` (atomically, cached like :func:`generate`) and return them as samples whose label
    is -1 (none of the dataset's classes), in file order."""
    if spec.unknown_classes < 1:
        raise ValueError("SyntheticSpec.unknown_classes is 0: there are no unknown classes to render")
    names = unknown_class_names(spec)
    folder = unknown_root(root) / str(spec.unknown_classes)
    marker = {"fingerprint": spec.fingerprint(), "unknown_classes": names, "per_class": spec.test_per_class}
    files = [f"{i + 1:05d}.jpg" for i in range(len(names) * spec.test_per_class)]
    try:
        complete = json.loads((folder / MARKER_FILE).read_text("utf-8")) == marker
    except (OSError, ValueError):
        complete = False
    if not complete:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            os.chmod(tmp, 0o755)
            for number, fname in enumerate(files, start=1):
                img, _ = render_sample(spec, "unknown", number, names[(number - 1) % len(names)])
                img.save(tmp / fname, "JPEG", quality=JPEG_QUALITY)
            write_json(tmp / MARKER_FILE, marker)
            if folder.exists():
                shutil.rmtree(folder)  # an older set of this count (another spec): ours replaces it
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return [Sample(path=folder / f, label=-1) for f in files]


# --------------------------------------------------------------------------------------------
# Command line


if __name__ == "__main__":
    sys.exit("python -m twincar.data.synthetic is now python -m twincar.synthetic")
