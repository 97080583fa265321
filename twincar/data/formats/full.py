"""The full archive: ``car_ims/000001.jpg ... 016185.jpg`` with one ``cars_annos.mat``.

``cars_annos.mat`` holds ``annotations`` (fields ``relative_im_path``, ``bbox_x1..bbox_y2``, ``class``,
``test``) and ``class_names``. Its numbering and order differ from the devkit's (it is sorted by class);
train and test come from the ``test`` flag (1 = test).
"""

from __future__ import annotations

from pathlib import Path

from twincar.data.formats.common import BOX_FIELDS, CarsData, Sample, box, check_label, read_names_mat, read_struct

EXPECTS = "cars_annos.mat and car_ims/*.jpg (in ROOT or ROOT/stanford_cars)"


def find_full(root: Path) -> Path | None:
    """The folder holding ``cars_annos.mat`` and ``car_ims/``."""
    for base in (root, root / "stanford_cars"):
        if (base / "cars_annos.mat").is_file() and (base / "car_ims").is_dir():
            return base
    return None


def read_full(base: Path) -> CarsData:
    """Both splits of the full archive at ``base``; labels and names from ``cars_annos.mat``."""
    annos = base / "cars_annos.mat"
    names = read_names_mat(annos)
    train, test = [], []
    for i, r in enumerate(read_struct(annos, ("relative_im_path", *BOX_FIELDS, "class", "test"))):
        rel = str(r["relative_im_path"]).strip()
        label = check_label(r["class"], len(names), annos, f"annotation {i + 1} ({rel})")
        (test if int(r["test"]) else train).append(Sample(base / rel, label, box(r)))
    return CarsData("full", base, names, train, test)
