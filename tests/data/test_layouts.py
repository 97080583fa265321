"""Every on-disk layout: detected, read to the same images and class names, checked, and trained on."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.layouts import LAYOUTS, NAMES, build, build_devkit, make_images, write_cars_annos
from twincar import check as check_tool
from twincar.classes import main as classes_main
from twincar.data.classes import read_class_names, read_classes_txt
from twincar.data.formats import DatasetFormatError, detect, load_dataset
from twincar.data.formats.parquet import image_bytes
from twincar.data.images import load_sample


@pytest.fixture(scope="module")
def images():
    return make_images()


@pytest.fixture(scope="module")
def copies(tmp_path_factory, images) -> dict[str, Path]:
    """One copy of the same images per layout."""
    top = tmp_path_factory.mktemp("layouts")
    return {layout: build(layout, top / layout, images) for layout in LAYOUTS}


def content(sample) -> bytes:
    return sample.path.read_bytes() if sample.index is None else image_bytes(sample.path, sample.index)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_auto_detects_each_layout_and_reads_every_image(copies, images, layout):
    data = load_dataset(copies[layout])  # data.format=auto
    assert data.format == layout
    assert (len(data.train), len(data.test)) == (18, 6)
    assert data.has_test_labels and data.has_boxes == (layout != "parquet")
    # names as the copy gives them: the parquet copy is lowercased
    assert [n.casefold() for n in data.class_names] == [n.casefold() for n in NAMES]
    assert (data.class_names == NAMES) == (layout != "parquet")
    # each image keeps its class and box, whatever the numbering and order of the layout
    truth = {hashlib.sha1(im.data).digest(): im for im in images}
    for split in ("train", "test"):
        for s in getattr(data, split):
            im = truth[hashlib.sha1(content(s)).digest()]
            assert (im.split, im.label) == (split, s.label), s
            assert s.bbox == (im.bbox if layout != "parquet" else None)


def test_one_image_gets_the_same_class_name_in_every_layout(copies, images):
    ram = next(im for im in images if im.split == "test" and im.label == 1)
    found = {}
    for layout, root in copies.items():
        data = load_dataset(root)
        (s,) = [s for s in data.test if content(s) == ram.data]
        found[layout] = data.class_names[s.label]
    assert {n.casefold() for n in found.values()} == {"ram c/v cargo van minivan 2012"}, found
    # the Kaggle folder is spelled "C-V" and sorts after BMW, yet maps to the official id 2 (label 1)
    assert (copies["kaggle_folders"] / "car_data/car_data/test/Ram C-V Cargo Van Minivan 2012").is_dir()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decoded_images_are_rgb_whatever_the_file_mode(copies, images, layout):
    data = load_dataset(copies[layout])
    modes = {}
    for s in data.train:
        im = next(i for i in images if i.data == content(s))
        img = load_sample(s)
        assert img.shape[2] == 3
        modes[im.mode] = img.shape[:2]
    assert set(modes) == {"RGB", "L", "CMYK", "P", "RGBA", "exif"}
    assert modes["exif"] == (48, 40) and modes["RGB"] == (40, 48)  # EXIF orientation applied


def test_explicit_format_and_wrong_format(copies):
    layout, base = detect(copies["full"], "full")
    assert layout.name == "full" and base == copies["full"]
    with pytest.raises(DatasetFormatError, match=r"is not in the parquet layout: expected data/train-\*.parquet"):
        detect(copies["full"], "parquet")
    with pytest.raises(DatasetFormatError, match="data.format=kaggle is not one of auto, devkit"):
        detect(copies["full"], "kaggle")


def test_a_root_of_no_layout_lists_every_layout_tried(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(DatasetFormatError) as e:
        load_dataset(tmp_path)
    message = str(e.value)
    assert message.startswith(f"{tmp_path} matches no known dataset layout; tried devkit: devkit/cars_meta.mat")
    for name, expects in [("kaggle_devkit", "cars_train/cars_train"), ("full", "cars_annos.mat and car_ims"),
                          ("kaggle_folders", "names.csv"), ("parquet", "train-*.parquet")]:
        assert f"{name}: " in message and expects in message


def test_devkit_under_stanford_cars_and_test_labels_in_devkit(tmp_path, images):
    root = build_devkit(tmp_path, images, parent=True)  # torchvision: StanfordCars(root) reads root/stanford_cars
    data = load_dataset(root)
    assert data.format == "devkit" and data.root == tmp_path / "stanford_cars"
    assert data.has_test_labels and data.test[0].path == tmp_path / "stanford_cars/cars_test/00001.jpg"


def test_kaggle_devkit_with_only_the_mismatched_cars_annos(tmp_path, images):
    root = build("kaggle_devkit", tmp_path, images)
    shutil.rmtree(root / "car_devkit")
    write_cars_annos(root / "cars_annos.mat", NAMES, [dict(relative_im_path="car_ims/000001.jpg", bbox_x1=1,
                     bbox_y1=1, bbox_x2=9, bbox_y2=9, **{"class": 1}, test=0)])
    expected = (r"only .*cars_annos.mat found, whose paths \(car_ims/000001.jpg, 6 digits\) do not match the images "
                r"here \(cars_train/cars_train/00001.jpg, 5 digits\)")
    with pytest.raises(DatasetFormatError, match=expected):
        load_dataset(root)


def test_kaggle_folders_without_boxes_and_with_an_unknown_folder(tmp_path, images):
    root = build("kaggle_folders", tmp_path, images)
    for f in ("anno_train.csv", "anno_test.csv"):
        (root / f).unlink()
    data = load_dataset(root)
    assert not data.has_boxes and len(data.train) == 18
    (root / "car_data/car_data/train/Tesla Model S Sedan 2012").mkdir()
    with pytest.raises(DatasetFormatError, match="Tesla Model S Sedan 2012: folder name matches no class name in "):
        load_dataset(root)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_classes_cli_writes_txt_and_csv_from_each_layout(copies, tmp_path, layout, capsys):
    assert classes_main(["--from", str(copies[layout]), "--out", str(tmp_path / "out/classes.txt")]) == 0
    names = read_classes_txt(tmp_path / "out/classes.txt")
    assert [n.casefold() for n in names] == [n.casefold() for n in NAMES]
    assert read_class_names(tmp_path / "out/classes.csv") == names
    with open(tmp_path / "out/classes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["make"].casefold() == "am general" and rows[1]["year"] == "2012"
    assert "3 classes, 3 makes, 2 years" in capsys.readouterr().out


@pytest.mark.parametrize("file", ["devkit/devkit/cars_meta.mat", "full/cars_annos.mat", "kaggle_folders/names.csv",
                                  "parquet/data/test-00000-of-00001.parquet"])
def test_classes_cli_from_a_single_file(copies, tmp_path, file):
    layout, rel = file.split("/", 1)
    path = copies[layout] / rel
    assert classes_main(["--from", str(path), "--out", str(tmp_path / "classes.txt")]) == 0
    assert [n.casefold() for n in read_classes_txt(tmp_path / "classes.txt")] == [n.casefold() for n in NAMES]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_check_scans_each_layout(copies, layout, capsys):
    assert check_tool.main([str(copies[layout])]) == 0
    out = capsys.readouterr().out
    assert f"({layout} layout)" in out
    assert "train: 18 images, 0 errors, 0 warnings, 1 grayscale, 1 CMYK" in out
    assert "test: 6 images, 0 errors" in out


def test_crop_to_bbox_on_a_layout_without_boxes_is_one_sentence(copies, tmp_path):
    from twincar.data.datamodule import CarsDataModule

    dm = CarsDataModule(root=str(copies["parquet"]), crop_to_bbox=True, num_workers=0, split_dir=str(tmp_path))
    with pytest.raises(DatasetFormatError, match="data.crop_to_bbox=true needs a car box .* parquet copy"):
        dm.setup("fit")


def compose_smoke(tmp_path: Path, root: Path, *overrides: str):
    from hydra import compose, initialize_config_module

    with initialize_config_module("twincar.conf", version_base="1.3"):
        return compose("train", overrides=[
            "experiment=smoke", "data=stanford_cars", f"data.root={root}", "model.pretrained=false",
            f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run", *overrides])


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_smoke_run_trains_on_each_layout(copies, tmp_path, layout):
    """experiment=smoke data=stanford_cars data.root=ROOT model.pretrained=false, with resnet18 to keep it short;
    the layouts with boxes also crop to them."""
    from twincar.train import train

    crop = [] if layout == "parquet" else ["data.crop_to_bbox=true"]
    metrics = train(compose_smoke(tmp_path, copies[layout], "model.name=resnet18", *crop))
    # tested on the layout's 6 test images (fewer than experiment=smoke's 2 batches of 8): a count out of 6
    assert metrics["test/acc"] * 6 == pytest.approx(round(metrics["test/acc"] * 6), abs=1e-4)
    val_images = len(json.loads((tmp_path / "run/split.json").read_text())["val"])
    assert metrics["val/acc"] * val_images == pytest.approx(round(metrics["val/acc"] * val_images), abs=1e-4)
    names = read_classes_txt(tmp_path / "run/classes.txt")
    assert [n.casefold() for n in names] == [n.casefold() for n in NAMES]
    assert not (tmp_path / "run/skipped.txt").exists()


def test_parquet_in_split_folders_as_the_hub_converts_them(tmp_path, images):
    root = build("parquet", tmp_path / "hf", images)
    for split in ("train", "test"):
        (root / "default" / split).mkdir(parents=True)
        (root / "data" / f"{split}-00000-of-00001.parquet").rename(root / "default" / split / "0000.parquet")
    data = load_dataset(root)
    assert data.format == "parquet" and (len(data.train), len(data.test)) == (18, 6)
    assert data.train[0].name == "0000.parquet#0"
