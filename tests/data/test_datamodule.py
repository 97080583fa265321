"""CarsDataModule on a generated devkit tree: sizes, split, labels, batches, bad images."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import SMALL_SPEC
from twincar.data.datamodule import CarsDataModule
from twincar.data.datasets import collate_readable
from twincar.data.formats import load_stanford_cars
from twincar.data.images import load_rgb
from twincar.data.sampling import stratified_split
from twincar.data.transforms import crop_to_box, to_tensor
from twincar.errors import TwinCarError

SEED_AUG = dict(scale=[0.35, 1.0], hflip=0.5, rotation=10.0, color_jitter=[0.3, 0.3, 0.3, 0.02], blur_prob=0.2)
STRONG_AUG = dict(SEED_AUG, mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=1.0)


def make_dm(root, tmp_path, **kw) -> CarsDataModule:
    args = dict(root=str(root), image_size=64, batch_size=8, num_workers=0, split_dir=str(tmp_path / "splits"),
                augmentation=SEED_AUG)
    dm = CarsDataModule(**{**args, **kw})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_sizes_and_stratified_split(small_root, tmp_path):
    dm = make_dm(small_root, tmp_path)
    n_cls, n_train, n_test = SMALL_SPEC["num_classes"], SMALL_SPEC["train_per_class"], SMALL_SPEC["test_per_class"]
    assert dm.num_classes == n_cls
    assert len(dm.train_set) + len(dm.val_set) == n_cls * n_train
    assert len(dm.test_set) == n_cls * n_test and dm.has_test_labels
    val_counts = Counter(s.label for s in dm.val_set.samples)
    assert set(val_counts) == set(range(n_cls))  # every class in val
    assert all(c == round(n_train * 0.1) for c in val_counts.values())
    train_names = {s.path.name for s in dm.train_set.samples}
    assert not train_names & {s.path.name for s in dm.val_set.samples}


def test_labels_match_the_annotation_files(small_root, tmp_path):
    dm = make_dm(small_root, tmp_path)
    samples, names = load_stanford_cars(small_root, "train")
    by_file = {s.path.name: s.label for s in samples}
    assert all(by_file[s.path.name] == s.label for s in dm.train_set.samples + dm.val_set.samples)
    assert dm.class_names == names
    image, label = dm.val_set[0]
    assert label == dm.val_set.samples[0].label


def test_split_is_cached_and_reused(small_root, tmp_path):
    dm = make_dm(small_root, tmp_path)
    cached = list((tmp_path / "splits").glob("split_*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["val"] == dm.split["val"]
    # a cached split wins over recomputation: edit it and the next datamodule follows the file
    split = json.loads(cached[0].read_text())
    split["train"], split["val"] = split["train"][1:], split["val"] + split["train"][:1]
    cached[0].write_text(json.dumps(split))
    assert make_dm(small_root, tmp_path).split["val"] == split["val"]
    # another seed is another split
    assert make_dm(small_root, tmp_path, split_seed=7).split["val"] != dm.split["val"]


def test_stratified_split_keeps_one_of_each_class_in_train():
    train, val = stratified_split([0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 0.1, seed=0)
    assert len(val) == 2 and sorted(train + val) == list(range(12))
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split([0, 1], 1.5, seed=0)


def test_train_batches_are_uint8_then_normalised_on_device(small_root, tmp_path):
    dm = make_dm(small_root, tmp_path)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 64, 64)
    dm.trainer = type("T", (), {"training": True})()
    x, y, targets = dm.on_after_batch_transfer((images, labels), 0)
    assert x.dtype == torch.float32 and x.shape == (8, 3, 64, 64)
    assert torch.equal(y, labels) and torch.equal(targets, labels)
    assert -3 < x.mean() < 3
    dm.trainer.training = False
    x_eval, y_eval = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert x_eval.dtype == torch.float32


def test_strong_augmentation_gives_soft_targets_and_full_batches(small_root, tmp_path):
    dm = make_dm(small_root, tmp_path, augmentation=STRONG_AUG, batch_size=10)
    loader = dm.train_dataloader()
    assert loader.drop_last and all(len(b[1]) == 10 for b in loader)
    dm.trainer = type("T", (), {"training": True})()
    x, y, targets = dm.on_after_batch_transfer(next(iter(loader)), 0)
    assert targets.shape == (10, dm.num_classes)
    assert torch.allclose(targets.sum(1), torch.ones(10))
    with pytest.raises(ValueError, match="even data.batch_size"):
        CarsDataModule(root=str(small_root), batch_size=9, augmentation=STRONG_AUG)


@pytest.mark.parametrize("size", [224, 448])
def test_large_image_sizes(small_root, tmp_path, size):
    dm = make_dm(small_root, tmp_path, image_size=size)
    assert dm.train_set[0][0].shape == (3, size, size) and dm.val_set[0][0].shape == (3, size, size)


def damaged_copy(small_root, tmp_path):
    """A copy with an empty train file, a non-image test file and a truncated train file (whose header is fine)."""
    root = tmp_path / "copy"
    shutil.copytree(small_root, root)
    (root / "cars_train" / "00002.jpg").write_bytes(b"")
    (root / "cars_test" / "00003.jpg").write_bytes(b"<html>not found</html>")
    data = (root / "cars_train" / "00005.jpg").read_bytes()
    (root / "cars_train" / "00005.jpg").write_bytes(data[: int(len(data) * 0.6)])
    return root


def test_on_corrupt_fail_stops_before_training_naming_the_files(small_root, tmp_path):
    root = damaged_copy(small_root, tmp_path)
    with pytest.raises(TwinCarError) as e:
        make_dm(root, tmp_path)  # on_corrupt=fail is the default
    message = str(e.value)
    assert message.startswith(f"2 unreadable image(s) in {root}: ")
    assert f"{root / 'cars_train' / '00002.jpg'}: the file is empty (0 bytes)" in message
    assert f"{root / 'cars_test' / '00003.jpg'}: not an image" in message
    assert f"python -m twincar.check {root} --format devkit" in message and "data.on_corrupt=skip" in message


def test_on_corrupt_skip_leaves_bad_files_out_once_and_never_replaces_them(small_root, tmp_path, caplog):
    root = damaged_copy(small_root, tmp_path)
    skipped = tmp_path / "run" / "skipped.txt"
    dm = make_dm(root, tmp_path, on_corrupt="skip", skipped_file=str(skipped))
    n_train = SMALL_SPEC["num_classes"] * SMALL_SPEC["train_per_class"]
    n_test = SMALL_SPEC["num_classes"] * SMALL_SPEC["test_per_class"]
    assert len(dm.train_set) + len(dm.val_set) == n_train - 1 and len(dm.test_set) == n_test - 1
    names = {s.path for s in dm.train_set.samples + dm.val_set.samples + dm.test_set.samples}
    assert root / "cars_train" / "00002.jpg" not in names and root / "cars_test" / "00003.jpg" not in names
    assert dm.split["skipped"] == [str(root / "cars_test" / "00003.jpg"), str(root / "cars_train" / "00002.jpg")]
    assert len(skipped.read_text().splitlines()) == 2
    # the truncated file passes the header check and fails in the worker: left out of its batch, not replaced
    truncated = root / "cars_train" / "00005.jpg"
    dataset = dm.train_set if truncated in {s.path for s in dm.train_set.samples} else dm.val_set
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_readable)
    dm.trainer = type("T", (), {"training": False, "is_global_zero": True})()
    for _ in range(2):  # two epochs: still named once
        seen = 0
        for batch in loader:
            x, y = dm.on_after_batch_transfer(batch, 0)
            seen += len(y)
        assert seen == len(dataset) - 1
    lines = skipped.read_text().splitlines()
    assert len(lines) == 3 and str(truncated) in lines[-1]
    assert caplog.text.count(f"{truncated}:") == 1


def test_a_file_that_fails_to_decode_mid_epoch_is_an_error_not_a_worker_traceback(small_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(small_root, root)
    dm = make_dm(root, tmp_path)
    bad = dm.val_set.samples[1].path
    bad.write_bytes(bad.read_bytes()[:-300])  # truncated after the header check
    dm.trainer = type("T", (), {"training": False, "is_global_zero": True})()
    loader = DataLoader(dm.val_set, batch_size=4, collate_fn=collate_readable, num_workers=1)
    with pytest.raises(TwinCarError, match=f"{bad}: .*run `python -m twincar.check {root}`"):
        for batch in loader:
            dm.on_after_batch_transfer(batch, 0)


def test_crop_to_bbox_crops_every_split_before_the_transforms(small_root, tmp_path):
    dm = make_dm(small_root, tmp_path, crop_to_bbox=True, bbox_margin=0.0)
    sample = dm.val_set.samples[0]
    expected = dm.val_set.transform(crop_to_box(to_tensor(load_rgb(sample.path)), sample.bbox))
    assert torch.equal(dm.val_set[0][0], expected)
    assert not torch.equal(dm.val_set[0][0], dm.val_set.transform(to_tensor(load_rgb(sample.path))))
    assert dm.test_set.bbox_margin == 0.0 and dm.train_set.bbox_margin == 0.0
    with pytest.raises(TwinCarError, match="data.on_corrupt=ignore is not one of fail, skip"):
        CarsDataModule(root=str(small_root), on_corrupt="ignore")


def test_grayscale_files_come_out_rgb(small_root, tmp_path):
    from PIL import Image

    dm = make_dm(small_root, tmp_path)
    gray = [s for s in dm.train_set.samples if Image.open(s.path).mode == "L"]
    assert gray, "the generated set should contain grayscale JPEGs like the real one"
    assert load_rgb(gray[0].path).shape[2] == 3


def test_synthetic_option_generates_under_a_spec_folder(tmp_path):
    dm = CarsDataModule(root=str(tmp_path / "syn"), image_size=32, num_workers=0,
                        synthetic=dict(num_classes=2, train_per_class=4, test_per_class=2))
    dm.prepare_data()
    assert dm.root.parent == tmp_path / "syn" and (dm.root / "devkit" / "cars_meta.mat").is_file()
    assert dm.num_classes == 2
