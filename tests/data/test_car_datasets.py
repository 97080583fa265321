"""DVM-CAR, VMMRdb and CompCars: the readers on generated trees with the real copies' quirks, make/model/year
carried as data into classes.csv, the held-out test split, and training on each (and from packed LitData shards)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest

from tests.layouts import (
    CAR_BUILDERS,
    CAR_CLASSES,
    COMPCARS_MISSING,
    PER_CLASS,
    build_dvm,
)
from tests.trained import compose
from twincar.data.classes import read_classes_csv
from twincar.data.datamodule import CarsDataModule
from twincar.data.formats import detect, load_dataset


def _rows(cars) -> list[tuple[str, str, int]]:
    return [(c.make, c.model, c.year) for c in cars]


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("car_trees")
    return {name: build(base / name) for name, build in CAR_BUILDERS.items()}


@pytest.mark.parametrize("layout", sorted(CAR_BUILDERS))
def test_each_layout_is_detected_and_gives_make_model_year_as_data(trees, layout):
    data = load_dataset(trees[layout])
    assert data.format == layout and load_dataset(trees[layout], layout).class_names == data.class_names
    assert _rows(data.car_names) == CAR_CLASSES[layout]
    assert data.class_names == [f"{make} {model} {year}" for make, model, year in CAR_CLASSES[layout]]


def test_dvm_doubled_folder_stray_spaces_and_table_names(trees, tmp_path):
    layout, base = detect(trees["dvm"])
    assert layout.name == "dvm" and base == trees["dvm"] / "resized_DVM_clean" / "resized_DVM_clean"
    data = load_dataset(trees["dvm"])
    # Basic_table.csv (" Genmodel, Genmodel_ID", "C-Class ") names the models; its folders say "C Class"
    assert "Mercedes-Benz C-Class 2015" in data.class_names and "Land Rover Range Rover 2016" not in data.class_names
    assert len(data.train) == 4 * PER_CLASS and data.test == [] and not data.official_test
    single = load_dataset(build_dvm(tmp_path / "single", doubled=False))
    assert single.root.name == "resized_DVM" and single.class_names == data.class_names


def test_dvm_views_keep_the_images_of_those_viewpoints(trees, tmp_path):
    from twincar.data.formats.common import DatasetFormatError

    dm = _module(trees["dvm"], tmp_path, views=[0, 45])
    kept = dm.data.train + dm.data.test
    # per class: images 0..4 are in Image_table.csv at 0, 45, 90, 0, 45 degrees; image 5 is not in it
    assert len(kept) == 4 * 4 and {s.path.name.split("$$")[5] for s in kept} == {"0", "1", "3", "4"}
    with pytest.raises(DatasetFormatError, match="data.views keeps DVM-CAR images of some viewpoints; the vmmrdb copy"):
        _module(trees["vmmrdb"], tmp_path, views=[0]).setup()


def test_vmmrdb_merges_spellings_of_one_class_and_ignores_stray_folders(trees):
    data = load_dataset(trees["vmmrdb"], "vmmrdb")
    land_rover = data.class_names.index("Land Rover Range Rover 2016")
    names = {s.name.split("/")[0] for s in data.train if s.label == land_rover}
    assert names == {"land rover_range rover_2016", "land_rover_range_rover_2016"}
    assert [sum(s.label == i for s in data.train) for i in range(4)] == [PER_CLASS] * 4


def test_compcars_unknown_years_are_left_out_and_a_missing_file_is_kept_for_on_corrupt(trees, caplog):
    with caplog.at_level(logging.WARNING):
        data = load_dataset(trees["compcars"])
    assert "2 image(s) of unknown year left out" in caplog.text
    assert not any("unknown" in s.name for s in data.train + data.test)
    assert COMPCARS_MISSING in {s.name for s in data.train}  # counted and skipped by the image check
    assert len(data.test) == 4 * 2 and data.official_test and not data.has_boxes  # the missing image has no box
    assert data.train[0].bbox == (3, 4, 40, 36)


def test_classes_csv_is_the_make_model_year_table(trees, tmp_path, capsys):
    from twincar.classes import main

    for layout, expected in CAR_CLASSES.items():
        data = load_dataset(trees[layout])
        assert main(["--from", str(trees[layout]), "--out", str(tmp_path / f"{layout}.txt")]) == 0
        assert "4 classes" in capsys.readouterr().out
        with open(tmp_path / f"{layout}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert [(r["make"], r["model"], int(r["year"])) for r in rows] == expected
        assert [r["label"] for r in rows] == [str(i) for i in range(len(expected))]
        assert read_classes_csv(tmp_path / f"{layout}.csv") == (data.class_names, data.car_names)


def _module(root: Path, tmp_path: Path, **kwargs) -> CarsDataModule:
    return CarsDataModule(root=str(root), split_dir=str(tmp_path / "splits"), num_workers=0, image_size=32,
                          on_corrupt="skip", skipped_file=None, **kwargs)


def test_a_dataset_without_a_test_split_gets_a_seeded_stratified_one(trees, tmp_path):
    dm = _module(trees["vmmrdb"], tmp_path)
    dm.setup()
    test = sorted(s.name for s in dm.test_set.samples)
    assert len(test) == 4 and sorted(s.label for s in dm.test_set.samples) == [0, 1, 2, 3]  # 10% of 6, >= 1 a class
    assert dm.split["test"] == [s.name for s in dm.test_set.samples]
    assert not set(test) & {s.name for s in dm.train_set.samples + dm.val_set.samples}
    again = _module(trees["vmmrdb"], tmp_path / "other")  # not from the persisted file: the same seed, the same split
    again.setup()
    assert sorted(s.name for s in again.test_set.samples) == test
    other_seed = _module(trees["vmmrdb"], tmp_path / "seed", split_seed=7)
    other_seed.setup()
    assert sorted(s.name for s in other_seed.test_set.samples) != test


def test_stream_pipeline_needs_its_pack(tmp_path):
    from twincar.data.pipeline import PipelineError

    with pytest.raises(PipelineError, match="data.pipeline=stream reads packed shards: set data.stream=DIR_OR_URL"):
        _module(tmp_path, tmp_path, pipeline="stream")


# -- training: one smoke run per layout, and from packed shards ----------------------------------------------------
def _train(root: Path, tmp_path: Path, *extra: str) -> Path:
    from twincar.train import train

    cfg = compose("train", [
        "experiment=smoke", "data=cars", f"data.root={root}", "model.name=resnet10t", "model.pretrained=false",
        "~callbacks.rich_progress_bar", f"paths.root_dir={tmp_path}", f"paths.data_dir={tmp_path}/data",
        f"paths.output_dir={tmp_path}/run", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "data.batch_size=4", *extra])
    train(cfg)
    return tmp_path / "run"


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["dvm", "vmmrdb"])  # CompCars: trained from its packed shards below
def test_smoke_training_on_each_layout_writes_its_classes(trees, tmp_path, layout):
    run = _train(trees[layout], tmp_path, "test=false", "calibrate=false")  # the stream run below does both
    names, cars = read_classes_csv(run / "classes.csv")
    assert _rows(cars) == CAR_CLASSES[layout]
    assert (run / "classes.txt").read_text().splitlines() == names


@pytest.fixture(scope="module")
def packed(trees, tmp_path_factory) -> tuple[Path, CarsDataModule]:
    """The CompCars tree packed by ``python -m twincar.cache pack`` (in-process), and the module it packed."""
    pytest.importorskip("litdata")
    from twincar.cache import main

    out = tmp_path_factory.mktemp("pack")
    data_dir = tmp_path_factory.mktemp("pack_data")
    overrides = ["data=cars", f"data.root={trees['compcars']}", f"paths.data_dir={data_dir}", "data.num_workers=0"]
    assert main(["pack", f"out={out}", "workers=1", *overrides]) == 0
    dm = CarsDataModule(root=str(trees["compcars"]), split_dir=str(data_dir / "splits"), num_workers=0,
                        on_corrupt="skip", skipped_file=None)
    dm.setup()
    return out, dm


@pytest.mark.slow
def test_a_pack_rerun_keeps_the_splits_already_written(packed, trees, tmp_path, caplog):
    from twincar.cache import main

    out, _ = packed
    chunks = {p: p.stat().st_mtime_ns for p in out.rglob("*.bin")}
    overrides = ["data=cars", f"data.root={trees['compcars']}", f"paths.data_dir={tmp_path}", "data.num_workers=0"]
    with caplog.at_level(logging.INFO):
        assert main(["pack", f"out={out}", "workers=1", *overrides]) == 0
    assert f"pack: {out / 'train'} already written, kept" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.bin")} == chunks


def _names(item: dict) -> str:
    return item["name"]


@pytest.mark.slow
def test_packed_shards_hold_each_split_once_and_ranks_see_disjoint_parts(packed, monkeypatch):
    import litdata.streaming.dataset as litdata_dataset
    from litdata.utilities.env import _DistributedEnv

    from twincar.data.stream import Pack, open_split

    out, dm = packed
    pack = Pack.open(out)
    assert pack.class_names == dm.class_names and _rows(pack.cars) == CAR_CLASSES["compcars"]
    assert pack.meta["splits"] == {"train": 20, "val": 4, "test": 8} and pack.meta["boxes"]
    expected = sorted(s.name for s in dm.train_set.samples)
    assert COMPCARS_MISSING not in expected  # skipped when packing (data.on_corrupt=skip)
    epochs = []
    for epoch in (1, 2):  # one process: every training image once per epoch, in a new order
        train = open_split(str(out), "train", _names, shuffle=True, seed=0)
        train.set_epoch(epoch)
        epochs.append(list(train))
        assert sorted(epochs[-1]) == expected
    assert epochs[0] != epochs[1]
    val = open_split(str(out), "val", _names, shuffle=False, seed=0)
    assert sorted(val) == sorted(s.name for s in dm.val_set.samples)
    assert (out / "split.json").is_file() and (out / "classes.csv").read_text().startswith("label,name,make,model,year")
    parts = []
    for rank in (0, 1):  # two ranks (as DDP gives them): disjoint parts of one epoch
        monkeypatch.setattr(litdata_dataset._DistributedEnv, "detect",
                            staticmethod(lambda rank=rank: _DistributedEnv(2, rank, 1)))
        parts.append(list(open_split(str(out), "train", _names, shuffle=True, seed=0)))
    assert not set(parts[0]) & set(parts[1]) and len(parts[0]) == len(parts[1]) == 10
    assert sorted(parts[0] + parts[1]) == expected


@pytest.mark.slow
def test_training_from_packed_compcars_shards_has_its_classes(packed, tmp_path):
    out, dm = packed
    run = _train(Path("/nonexistent"), tmp_path, "data.pipeline=stream", f"data.stream={out}",
                 "data.crop_to_bbox=true")
    names, cars = read_classes_csv(run / "classes.csv")
    assert names == dm.class_names and _rows(cars) == CAR_CLASSES["compcars"]
    assert (run / "model.pth").is_file()


@pytest.mark.slow
def test_a_stream_loader_resumed_from_its_state_yields_the_rest_of_the_epoch(packed):
    out, dm = packed

    def loader():
        stream = CarsDataModule(root="/nonexistent", pipeline="stream", stream=str(out), num_workers=0, batch_size=4,
                                image_size=32)
        stream.setup()
        stream.train_set.transform = [_named]  # the image's name in place of its pixels: which images came
        return stream.train_dataloader()

    first = loader()
    batches = iter(first)
    seen = [name for _ in range(2) for name in next(batches)[0]]
    state = first.state_dict()  # what Lightning stores in a checkpoint
    assert state["num_samples_yielded"] == 8 and state["current_epoch"] == 1
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [name for batch in resumed for name in batch[0]]
    assert len(seen) == 8 and len(rest) == 12
    assert sorted(seen + rest) == sorted(s.name for s in dm.train_set.samples)  # the rest of the epoch, none twice


def _named(item: dict) -> tuple[str, int]:
    return item["name"], int(item["label"])
