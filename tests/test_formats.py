"""The devkit readers, on the real annotation files and on files we write."""

from pathlib import Path

import pytest

from twincar.data.formats import (
    UNLABELED,
    DatasetFormatError,
    Sample,
    load_stanford_cars,
    read_annotations,
    read_meta,
    write_annotations,
    write_meta,
)


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
    with pytest.raises(DatasetFormatError, match=r"cars_meta.mat is missing"):
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
