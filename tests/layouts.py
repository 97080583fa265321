"""Small Stanford Cars copies in each on-disk layout, built from one set of generated images.

Every layout holds the same images with the same classes, so a test can follow one image through
all of them. The set includes grayscale, CMYK, palette and RGBA images and an EXIF-rotated JPEG.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from twincar.data.formats import write_annotations, write_meta
from twincar.data.formats.common import Sample

# Official order (as in cars_meta.mat): alphabetical folder order differs (BMW before Ram).
NAMES = ["AM General Hummer SUV 2000", "Ram C/V Cargo Van Minivan 2012", "BMW M3 Coupe 2012"]
FOLDERS = ["AM General Hummer SUV 2000", "Ram C-V Cargo Van Minivan 2012", "BMW M3 Coupe 2012"]
TRAIN_PER_CLASS, TEST_PER_CLASS = 6, 2
LAYOUTS = ("devkit", "full", "kaggle_folders", "kaggle_devkit", "parquet")


@dataclass(frozen=True)
class Img:
    """One generated image: split, 0-based label, encoded bytes, 1-based inclusive box, size and PIL mode."""

    split: str
    label: int
    data: bytes
    bbox: tuple[int, int, int, int]
    size: tuple[int, int]
    mode: str


def _encode(arr: np.ndarray, mode: str) -> bytes:
    im = Image.fromarray(arr)
    buf = io.BytesIO()
    if mode == "exif":  # stored 48 wide x 40 high, shown rotated: EXIF orientation 6 (rotate 90 on display)
        exif = Image.Exif()
        exif[0x0112] = 6
        im.save(buf, "JPEG", exif=exif)
    elif mode in ("P", "RGBA"):
        im.convert(mode).save(buf, "PNG")
    else:
        im.convert(mode).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_images(seed: int = 0) -> list[Img]:
    """Train images first (classes interleaved, like the devkit numbering), then test images."""
    rng = np.random.default_rng(seed)
    special = {(0, 0): "L", (1, 0): "CMYK", (2, 0): "P", (0, 1): "RGBA", (1, 1): "exif"}
    images = []
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for i in range(per_class):
            for label in range(len(NAMES)):
                w, h = 48, 40
                arr = np.zeros((h, w, 3), np.uint8)
                arr[:] = rng.integers(0, 60, 3)
                x1, y1 = int(rng.integers(1, 10)), int(rng.integers(1, 8))
                x2, y2 = int(rng.integers(38, w + 1)), int(rng.integers(30, h + 1))
                colour = np.eye(3)[label] * 200 + rng.integers(0, 40, 3)
                arr[y1 - 1:y2, x1 - 1:x2] = colour.astype(np.uint8)
                mode = special.get((label, i), "RGB") if split == "train" else "RGB"
                images.append(Img(split, label, _encode(arr, mode), (x1, y1, x2, y2), (w, h), mode))
    return images


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _devkit_files(devkit: Path, train_dir: Path, test_dir: Path, images: list[Img], labels_in: Path) -> None:
    devkit.mkdir(parents=True, exist_ok=True)
    write_meta(devkit / "cars_meta.mat", NAMES)
    for split, image_dir in (("train", train_dir), ("test", test_dir)):
        part = [im for im in images if im.split == split]
        samples = [Sample(Path(f"{i + 1:05d}.jpg"), im.label, im.bbox) for i, im in enumerate(part)]
        for s, im in zip(samples, part, strict=True):
            _write(image_dir / s.path.name, im.data)
        if split == "train":
            write_annotations(devkit / "cars_train_annos.mat", samples, with_class=True)
        else:
            write_annotations(devkit / "cars_test_annos.mat", samples, with_class=False)
            write_annotations(labels_in / "cars_test_annos_withlabels.mat", samples, with_class=True)


def build_devkit(root: Path, images: list[Img], parent: bool = False) -> Path:
    """The released layout; ``parent``: inside ``root/stanford_cars`` (torchvision's convention).
    Test labels in ``devkit/`` (where mmcls puts them)."""
    base = root / "stanford_cars" if parent else root
    _devkit_files(base / "devkit", base / "cars_train", base / "cars_test", images, base / "devkit")
    return root


def build_kaggle_devkit(root: Path, images: list[Img]) -> Path:
    """Doubled image folders, ``.mat`` files in ``car_devkit/devkit/``, test labels in the root."""
    _devkit_files(root / "car_devkit" / "devkit", root / "cars_train" / "cars_train",
                  root / "cars_test" / "cars_test", images, root)
    return root


def write_cars_annos(path: Path, names: list[str], rows: list[dict]) -> None:
    """A full-archive ``cars_annos.mat``: fields in a shuffled order, uint8/uint16 scalars as in the release."""
    fields = ["class", "relative_im_path", "test", "bbox_y2", "bbox_x1", "bbox_x2", "bbox_y1"]
    annos = np.empty((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, r in enumerate(rows):
        annos[0, i] = tuple(np.array([r[f]]) if f == "relative_im_path"
                            else np.array([[r[f]]], dtype=np.uint8 if r[f] < 256 else np.uint16) for f in fields)
    cells = np.empty((1, len(names)), dtype=object)
    for i, n in enumerate(names):
        cells[0, i] = np.array([n])
    scipy.io.savemat(str(path), {"annotations": annos, "class_names": cells})


def build_full(root: Path, images: list[Img]) -> Path:
    """``car_ims/`` numbered in class order (train and test mixed) + ``cars_annos.mat``."""
    rows = []
    for n, im in enumerate(sorted(images, key=lambda im: im.label), 1):
        rel = f"car_ims/{n:06d}.jpg"
        _write(root / rel, im.data)
        x1, y1, x2, y2 = im.bbox
        rows.append({"relative_im_path": rel, "bbox_x1": x1, "bbox_y1": y1, "bbox_x2": x2, "bbox_y2": y2,
                     "class": im.label + 1, "test": int(im.split == "test")})
    write_cars_annos(root / "cars_annos.mat", NAMES, rows)
    return root


def build_kaggle_folders(root: Path, images: list[Img], boxes: bool = True) -> Path:
    """``car_data/car_data/{train,test}/<Class Name>/00001.jpg`` + ``names.csv`` (+ ``anno_*.csv``)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / "names.csv").open("w", newline="") as f:
        csv.writer(f).writerows([n] for n in NAMES)
    for split in ("train", "test"):
        part = [im for im in images if im.split == split]
        rows = []
        for i, im in enumerate(part):
            fname = f"{i + 1:05d}.jpg"
            _write(root / "car_data" / "car_data" / split / FOLDERS[im.label] / fname, im.data)
            rows.append([fname, *im.bbox, im.label + 1])
        if boxes:
            with (root / f"anno_{split}.csv").open("w", newline="") as f:
                csv.writer(f).writerows(rows)
    return root


def build_parquet(root: Path, images: list[Img], lowercase: bool = True) -> Path:
    """A Hugging Face snapshot: ``data/{train,test}-00000-of-00001.parquet``, names (lowercased) in the schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = [n.lower() for n in NAMES] if lowercase else NAMES
    meta = {"info": {"features": {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}}}
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        part = [im for im in images if im.split == split]
        image = pa.array([{"bytes": im.data, "path": None} for im in part],
                         type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        table = pa.table({"image": image, "label": pa.array([im.label for im in part], pa.int64())})
        table = table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()})
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet", row_group_size=4)
    return root


BUILDERS = {"devkit": build_devkit, "full": build_full, "kaggle_folders": build_kaggle_folders,
            "kaggle_devkit": build_kaggle_devkit, "parquet": build_parquet}


def build(layout: str, root: Path, images: list[Img] | None = None) -> Path:
    """A copy of ``images`` (default :func:`make_images`) in ``layout`` under ``root``; returns the root to pass."""
    return BUILDERS[layout](root, images if images is not None else make_images())


# -- the other car datasets: DVM-CAR, VMMRdb, CompCars, with the quirks of the real copies -----------------------
CAR_LAYOUTS = ("dvm", "vmmrdb", "compcars")
PER_CLASS = 6  # images per class (CompCars: train; 2 more per class in test)


def _car_jpeg(rng: np.random.Generator, label: int) -> bytes:
    arr = np.zeros((40, 48, 3), np.uint8)
    arr[:] = rng.integers(0, 60, 3)
    arr[5:35, 4:44] = (np.array([(label * 70) % 256, (label * 150) % 256, 200 - 40 * label]) + rng.integers(0, 30, 3))
    return _encode(arr.astype(np.uint8), "RGB")


# (Maker folder, Genmodel folder, Genmodel_ID, year) -> the class it is. Alfa Romeo is not in Basic_table.csv:
# its folder names name it.
DVM_FOLDERS = [("Land Rover", "Range Rover", "41_3", 2016), ("Land Rover", "Range Rover", "41_3", 2017),
               ("Mercedes-Benz", "C Class", "59_8", 2015), ("Alfa Romeo", "Giulia", "2_1", 2017)]
DVM_VIEWS = (0, 45, 90)  # Image_table.csv's Predicted_viewpoint of image k: DVM_VIEWS[k % 3]
DVM_CLASSES = [("Alfa Romeo", "Giulia", 2017), ("Land Rover", "Range Rover Sport", 2016),
               ("Land Rover", "Range Rover Sport", 2017), ("Mercedes-Benz", "C-Class", 2015)]


def build_dvm(root: Path, doubled: bool = True) -> Path:
    """DVM-CAR as some copies unpack (``resized_DVM_clean/resized_DVM_clean/``), CSVs with stray spaces; the
    table spells two models unlike their folders ("Range Rover Sport", "C-Class")."""
    rng = np.random.default_rng(1)
    base = root / ("resized_DVM_clean/resized_DVM_clean" if doubled else "resized_DVM")
    rows = []
    for maker, genmodel, gid, year in DVM_FOLDERS:
        label = [(m, y) for m, _, y in DVM_CLASSES].index((maker, year))
        for k in range(PER_CLASS):
            colour = ("Black", "White")[k % 2]
            name = f"{maker}$${genmodel}$${year}$${colour}$${gid}$${k}$$image_{k}.jpg"
            _write(base / maker / genmodel / str(year) / colour / name, _car_jpeg(rng, label))
            if k < PER_CLASS - 1:  # the last image of each class is not in the table
                rows.append(f"{gid}, {gid}$${k}, {name}, {DVM_VIEWS[k % len(DVM_VIEWS)]}, \n")
    (root / "Basic_table.csv").write_text(
        "Automaker, Automaker_ID, Genmodel, Genmodel_ID\nLand Rover, 41, Range Rover Sport, 41_3\n"
        "Mercedes-Benz, 59, C-Class , 59_8\n")
    (root / "Image_table.csv").write_text(" Genmodel_ID, Image_ID, Image_name, Predicted_viewpoint, Quality_check\n"
                                          + "".join(rows))
    return root


VMMRDB_FOLDERS = {"alfa_romeo_giulia_2017": 0, "honda_civic_2005": 1, "land rover_range rover_2016": 2,
                  "land_rover_range_rover_2016": 2, "mercedes_benz_c-class_2015": 3}
VMMRDB_CLASSES = [("Alfa Romeo", "Giulia", 2017), ("Honda", "Civic", 2005), ("Land Rover", "Range Rover", 2016),
                  ("Mercedes-Benz", "C-class", 2015)]


def build_vmmrdb(root: Path) -> Path:
    """VMMRdb's class folders: two-token makes, spaces in names, two spellings of one class, a stray folder."""
    rng = np.random.default_rng(2)
    for folder, label in VMMRDB_FOLDERS.items():
        n = PER_CLASS // 2 if label == 2 else PER_CLASS  # the two Land Rover folders make one class
        for k in range(n):
            _write(root / folder / f"{folder.replace(' ', '')}_{k}.jpg", _car_jpeg(rng, label))
    (root / "readme").mkdir(parents=True, exist_ok=True)
    return root


# (make_id, model_id, year); make 2 and model 2 have empty names in make_model_name.mat
COMPCARS_IDS = [(1, 1, 2014), (1, 1, 2015), (1, 2, 2014), (2, 3, 2012)]
COMPCARS_CLASSES = [("Audi", "A4", 2014), ("Audi", "A4", 2015), ("Audi", "Model 2", 2014), ("Make 2", "Q5", 2012)]
COMPCARS_MISSING = "1/1/2014/missing0.jpg"


def build_compcars(root: Path) -> Path:
    """CompCars web-nature: empty make and model names, ``unknown`` years, a listed image that is missing, boxes."""
    rng = np.random.default_rng(3)
    data = root / "data"
    lines: dict[str, list[str]] = {"train": [], "test": []}
    for label, (make, model, year) in enumerate(COMPCARS_IDS):
        for split, n in (("train", PER_CLASS), ("test", 2)):
            for k in range(n):
                rel = f"{make}/{model}/{year}/{split}{label}{k:02d}.jpg"
                _write(data / "image" / rel, _car_jpeg(rng, label))
                _write((data / "label" / rel).with_suffix(".txt"), b"2\n1\n3 4 40 36\n")
                lines[split].append(rel)
    for split in ("train", "test"):  # an unknown year in each split
        rel = f"1/1/unknown/{split}x.jpg"
        _write(data / "image" / rel, _car_jpeg(rng, 0))
        lines[split].append(rel)
    lines["train"].append(COMPCARS_MISSING)
    (data / "train_test_split" / "classification").mkdir(parents=True)
    for split, rels in lines.items():
        (data / "train_test_split" / "classification" / f"{split}.txt").write_text("\n".join(rels) + "\n")
    (data / "misc").mkdir()

    def cells(names: list[str]) -> np.ndarray:
        out = np.empty((len(names), 1), dtype=object)
        for i, n in enumerate(names):
            out[i, 0] = np.array([n]) if n else np.zeros((0, 0))
        return out

    scipy.io.savemat(str(data / "misc" / "make_model_name.mat"),
                     {"make_names": cells(["Audi", ""]), "model_names": cells(["A4", "", "Q5"])})
    return root


CAR_BUILDERS = {"dvm": build_dvm, "vmmrdb": build_vmmrdb, "compcars": build_compcars}
CAR_CLASSES = {"dvm": DVM_CLASSES, "vmmrdb": VMMRDB_CLASSES, "compcars": COMPCARS_CLASSES}
