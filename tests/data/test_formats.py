"""The layout readers, on the real devkit annotation files and on the awkward files people have."""

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from tests.layouts import NAMES, build, make_images, write_cars_annos
from twincar.data.formats import (
    UNLABELED,
    DatasetFormatError,
    Sample,
    load_dataset,
    load_stanford_cars,
    read_annotations,
    read_meta,
    write_annotations,
    write_meta,
)
from twincar.data.transforms import crop_to_box


def test_real_meta_has_196_names_in_official_order(devkit):
    names = read_meta(devkit / "cars_meta.mat")
    assert len(names) == 196
    assert names[0] == "AM General Hummer SUV 2000"
    assert names[-1] == "smart fortwo Convertible 2012"
    assert len(set(names)) == 196


def test_real_train_annotations(devkit):
    annos = read_annotations(devkit / "cars_train_annos.mat")
    assert len(annos) == 8144
    assert annos[0] == {"bbox_x1": 39, "bbox_y1": 116, "bbox_x2": 569, "bbox_y2": 375, "class": 14,
                        "fname": "00001.jpg"}
    classes = {a["class"] for a in annos}
    assert classes == set(range(1, 197))
    for a in annos:
        assert 1 <= a["bbox_x1"] < a["bbox_x2"] <= 8000 and 1 <= a["bbox_y1"] < a["bbox_y2"] <= 6000


def test_real_test_annotations_have_no_class(devkit):
    annos = read_annotations(devkit / "cars_test_annos.mat")
    assert len(annos) == 8041
    assert "class" not in annos[0] and annos[-1]["fname"] == "08041.jpg"


def test_load_real_layout_labels_are_zero_based(devkit, tmp_path):
    # the real annotation files in a devkit tree (no images needed to read annotations)
    (tmp_path / "devkit").mkdir()
    for f in ("cars_meta.mat", "cars_train_annos.mat", "cars_test_annos.mat"):
        (tmp_path / "devkit" / f).symlink_to(devkit / f)
    (tmp_path / "cars_train").mkdir()
    train, names = load_stanford_cars(tmp_path, "train")
    assert len(train) == 8144 and len(names) == 196
    assert train[0] == Sample(tmp_path / "cars_train" / "00001.jpg", 13, (39, 116, 569, 375))
    assert names[train[0].label] == "Audi TTS Coupe 2012"
    test, _ = load_stanford_cars(tmp_path, "test")
    assert len(test) == 8041 and {s.label for s in test} == {UNLABELED}


def test_written_files_read_back_with_real_structure(tmp_path):
    samples = [Sample(Path("cars_train/00001.jpg"), 0, (1, 2, 30, 40)),
               Sample(Path("cars_train/00002.jpg"), 2, (5, 6, 70, 80))]
    write_annotations(tmp_path / "a.mat", samples, with_class=True)
    assert read_annotations(tmp_path / "a.mat") == [
        {"bbox_x1": 1, "bbox_y1": 2, "bbox_x2": 30, "bbox_y2": 40, "class": 1, "fname": "00001.jpg"},
        {"bbox_x1": 5, "bbox_y1": 6, "bbox_x2": 70, "bbox_y2": 80, "class": 3, "fname": "00002.jpg"},
    ]
    write_meta(tmp_path / "m.mat", ["A B Sedan 2012", "C D SUV 2000"])
    assert read_meta(tmp_path / "m.mat") == ["A B Sedan 2012", "C D SUV 2000"]


def test_missing_root_and_files_give_clear_errors(tmp_path):
    with pytest.raises(DatasetFormatError, match="does not exist: pass data.root=PATH"):
        load_stanford_cars(tmp_path / "nowhere", "train")
    with pytest.raises(DatasetFormatError, match=r"matches no known dataset layout; tried devkit: devkit/cars_meta"):
        load_stanford_cars(tmp_path, "train")


def test_class_id_out_of_range_names_file_and_image(tmp_path):
    (tmp_path / "devkit").mkdir()
    (tmp_path / "cars_train").mkdir()
    write_meta(tmp_path / "devkit" / "cars_meta.mat", ["A B Sedan 2012"])
    write_annotations(tmp_path / "devkit" / "cars_train_annos.mat",
                      [Sample(Path("00007.jpg"), 4, (1, 1, 9, 9))], with_class=True)
    with pytest.raises(DatasetFormatError, match=r"cars_train_annos.mat: annotation 1 \(00007.jpg\) has class 5"):
        load_stanford_cars(tmp_path, "train")


def test_damaged_mat_file_is_named(tmp_path):
    (tmp_path / "bad.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetFormatError, match="bad.mat"):
        read_meta(tmp_path / "bad.mat")


def test_a_single_annotation_and_a_single_class_read_as_lists(tmp_path):
    # a struct and a cell of one element come back 1x1 (0-d when squeezed): still a list of one
    scipy.io.savemat(tmp_path / "annos.mat", {"annotations": {
        "fname": "00001.jpg", "class": np.uint8(1), "bbox_y2": np.uint16(300), "bbox_x1": np.uint8(3),
        "bbox_x2": np.uint16(400), "bbox_y1": np.uint8(4)}})
    scipy.io.savemat(tmp_path / "meta.mat", {"class_names": np.array(["Tesla Model S Sedan 2012"], dtype=object)})
    assert read_annotations(tmp_path / "annos.mat") == [
        {"fname": "00001.jpg", "class": 1, "bbox_y2": 300, "bbox_x1": 3, "bbox_x2": 400, "bbox_y1": 4}]
    assert read_meta(tmp_path / "meta.mat") == ["Tesla Model S Sedan 2012"]


def test_uint8_boxes_do_not_overflow_and_boxes_are_one_based_inclusive():
    annos = {"bbox_x1": np.uint8(201), "bbox_y1": np.uint8(10), "bbox_x2": np.uint8(250), "bbox_y2": np.uint8(59)}
    from twincar.data.formats.common import box

    bbox = box(annos)
    assert all(type(v) is int for v in bbox)
    img = torch.arange(300 * 300).reshape(1, 300, 300)
    crop = crop_to_box(img, bbox)
    assert crop.shape == (1, 50, 50)  # columns 201..250 and rows 10..59, 1-based inclusive
    assert crop[0, 0, 0] == img[0, 9, 200] and crop[0, -1, -1] == img[0, 58, 249]
    grown = crop_to_box(img, bbox, margin=0.5)  # +25 px per side: columns 176..275 (past 255, no wrap-around)
    assert grown.shape == (1, 84, 100) and grown[0, 0, 0] == img[0, 0, 175]  # top clamped to the image
    assert crop_to_box(img, (1, 1, 300, 300), margin=0.2).shape == (1, 300, 300)  # clamped to the image


def test_fields_are_read_by_name_in_the_full_archive(tmp_path):
    # write_cars_annos puts the fields in another order than the release, with uint8 scalars
    data = load_dataset(build("full", tmp_path / "full", make_images()))
    assert data.class_names == NAMES and len(data.train) == 18 and data.train[0].bbox[2] > data.train[0].bbox[0]


def test_a_label_outside_the_names_is_named(tmp_path):
    root = tmp_path / "full"
    (root / "car_ims").mkdir(parents=True)
    write_cars_annos(root / "cars_annos.mat", NAMES, [dict(relative_im_path="car_ims/000001.jpg", bbox_x1=1,
                     bbox_y1=1, bbox_x2=9, bbox_y2=9, test=0, **{"class": 4})])
    with pytest.raises(DatasetFormatError, match=r"cars_annos.mat: annotation 1 \(car_ims/000001.jpg\) has class 4, "
                                                 r"outside 1..3"):
        load_dataset(root)


def test_class_names_without_training_images_and_an_empty_split(tmp_path):
    images = make_images()
    root = build("kaggle_folders", tmp_path / "k", [im for im in images if im.label != 2])
    with pytest.raises(DatasetFormatError, match="3 class names but only 2 classes have training images; "
                                                 "no training image for 'BMW M3 Coupe 2012'"):
        load_dataset(root)
    root = build("parquet", tmp_path / "p", [im for im in images if im.split == "test"])
    (root / "data" / "train-00000-of-00001.parquet").rename(root / "data" / "train-00000-of-00002.parquet")
    with pytest.raises(DatasetFormatError, match="the train split is empty"):
        load_dataset(root)


def test_kaggle_annotation_disagreeing_with_its_folder_is_named(tmp_path):
    root = build("kaggle_folders", tmp_path, make_images())
    lines = (root / "anno_train.csv").read_text().splitlines()
    lines[0] = lines[0].rsplit(",", 1)[0] + ",3"
    (root / "anno_train.csv").write_text("\n".join(lines))
    with pytest.raises(DatasetFormatError, match="its folder says 'AM General Hummer SUV 2000' but the annotation "
                                                 "CSV says 'BMW M3 Coupe 2012'"):
        load_dataset(root)


def test_parquet_without_class_names_says_where_they_belong(tmp_path):
    import pyarrow.parquet as pq

    root = build("parquet", tmp_path, make_images())
    f = root / "data" / "train-00000-of-00001.parquet"
    pq.write_table(pq.read_table(f).replace_schema_metadata({}), f)
    with pytest.raises(DatasetFormatError, match="no class names in its 'huggingface' schema metadata"):
        load_dataset(root)
