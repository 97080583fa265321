"""The image cache (data.pipeline=cache): what it stores, that training and eval read it like the files, when it is
rebuilt."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.data.test_datamodule import make_dm
from twincar.cache import main
from twincar.data.cache import ImageCache, cache_short_side, open_cache
from twincar.data.datasets import CarsDataset
from twincar.data.formats import Sample, load_stanford_cars
from twincar.data.images import ImageReadError, load_rgb
from twincar.data.preprocess import Preprocess
from twincar.data.transforms import EvalImageTransform, to_tensor


def _samples(root):
    return [s for split in ("train", "test") for s in load_stanford_cars(root, split)[0]]


def _copy(root, tmp_path):
    """A private copy of the small dataset that a test may damage."""
    return shutil.copytree(root, tmp_path / "copy")


def test_short_side_leaves_room_for_crops_and_eval():
    assert cache_short_side(Preprocess(image_size=224)) == 256  # eval's resize: 224 / 0.875
    assert cache_short_side(Preprocess(image_size=448)) == 512
    assert cache_short_side(Preprocess(image_size=64, eval_crop_pct=0.5)) == 128  # eval resizes to 128
    squash = Preprocess(image_size=224, eval_crop_pct=1.0, resize_mode="squash")
    assert cache_short_side(squash) == 258  # eval needs only 224: 1.15 x 224 leaves random crops room


@pytest.mark.parametrize("fmt, tolerance", [("raw", 0.0), ("jpeg", 3.0)])
def test_cached_images_are_the_files_resized(small_root, tmp_path, fmt, tolerance):
    samples = _samples(small_root)
    pre = Preprocess(image_size=64)
    cache = open_cache(samples, tmp_path / "cache", pre, fmt=fmt, workers=2)
    assert len(cache) == len(samples) and not cache.errors
    for s in samples[:5]:
        img = cache(s)
        original = to_tensor(load_rgb(s.path))  # 128 x 96 synthetic images: short side 96 -> 73
        assert img.dtype == torch.uint8 and img.shape == (3, 73, 97)
        reference = torch.nn.functional.interpolate(original[None].float(), size=(73, 97), mode="bilinear",
                                                    antialias=True, align_corners=False)[0]
        assert (img.float() - reference).abs().mean() <= tolerance + 1.0  # antialiased resize, +- rounding


def test_cache_is_reused_and_rebuilt_when_data_or_size_change(small_root, tmp_path, caplog):
    root = _copy(small_root, tmp_path)
    samples = _samples(root)
    first = open_cache(samples, tmp_path / "cache", Preprocess(image_size=64))
    with caplog.at_level(logging.INFO, logger="twincar.data.cache"):
        again = open_cache(samples, tmp_path / "cache", Preprocess(image_size=64))
    assert again.directory == first.directory and "reusing image cache" in caplog.text
    # another image size: another cache, at the new short side
    bigger = open_cache(samples, tmp_path / "cache", Preprocess(image_size=80))
    assert bigger.directory != first.directory and min(bigger(samples[0]).shape[1:]) == 91
    # one file changed on disk: a new cache that holds the new pixels
    Image.new("RGB", (128, 96), (255, 0, 0)).save(samples[0].path)
    changed = open_cache(samples, tmp_path / "cache", Preprocess(image_size=64))
    assert changed.directory not in (first.directory, bigger.directory)
    red = changed(samples[0]).float().mean(dim=(1, 2))
    assert red[0] > 240 and red[1] < 15 and red[2] < 15
    assert not torch.equal(first(samples[0]), changed(samples[0]))


def test_unreadable_file_is_recorded_and_named_when_read(small_root, tmp_path, caplog):
    root = _copy(small_root, tmp_path)
    samples = _samples(root)
    samples[3].path.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    cache = open_cache(samples, tmp_path / "cache", Preprocess(image_size=64))
    assert len(cache) == len(samples) - 1 and list(cache.errors) == [str(samples[3].path.resolve())]
    with pytest.raises(ImageReadError, match=samples[3].path.name):
        cache(samples[3])
    # a dataset over the cache reports it by name and never replaces it, like one over the files
    dataset = CarsDataset(samples[:5], EvalImageTransform(Preprocess(image_size=64)), reader=cache)
    items = [dataset[i] for i in range(5)]
    assert items[3][0] is None and samples[3].path.name in items[3][1]
    assert all(items[i][0].shape == (3, 64, 64) and items[i][1] == samples[i].label for i in (0, 1, 2, 4))
    with pytest.raises(ImageReadError, match="not in the cache"):
        cache(Sample(tmp_path / "elsewhere.jpg", 0))


def _nearest_centroid(train_x, train_y, x):
    """A real classifier over flattened pixels (predictions vary image by image, unlike a random network)."""
    classes = sorted(set(train_y.tolist()))
    centroids = torch.stack([train_x[train_y == c].mean(0) for c in classes])
    return torch.tensor(classes)[torch.cdist(x, centroids).argmin(1)]


@pytest.mark.parametrize("fmt, max_mean_levels", [("raw", 0.0), ("jpeg", 2.0)])
def test_datamodule_reads_the_cache_with_the_same_split_labels_and_predictions(small_root, tmp_path, fmt,
                                                                              max_mean_levels):
    plain = make_dm(small_root, tmp_path)
    cached = make_dm(small_root, tmp_path, pipeline="cache", cache_dir=str(tmp_path / "cache"), cache_format=fmt)
    assert isinstance(cached.image_cache, ImageCache) and (cached.image_cache.directory / "images.bin").is_file()
    assert [s.path.name for s in cached.train_set.samples] == [s.path.name for s in plain.train_set.samples]
    assert [s.label for s in cached.test_set.samples] == [s.label for s in plain.test_set.samples]

    images, labels = next(iter(cached.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 64, 64) and labels.dtype == torch.int64

    def eval_inputs(dm, dataset):
        x, y = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
        return dm.eval_batch_transform(torch.stack(x)).flatten(1), torch.tensor(y)

    # eval preprocessing, cached vs from the files: the same pixels (raw: the cache holds eval's own resize;
    # jpeg: within 2 grey levels on average), the same predictions
    train_x, train_y = eval_inputs(plain, plain.train_set)
    test_plain, test_y = eval_inputs(plain, plain.test_set)
    test_cached, test_y2 = eval_inputs(cached, cached.test_set)
    assert torch.equal(test_y, test_y2)
    uint8_step = 1 / 255 / min(plain.preprocess.std)
    assert (test_plain - test_cached).abs().mean() <= max_mean_levels * uint8_step + 1e-6
    predicted_plain = _nearest_centroid(train_x, train_y, test_plain)
    predicted_cached = _nearest_centroid(train_x, train_y, test_cached)
    assert len(set(predicted_plain.tolist())) > 1  # a classifier that discriminates
    assert (predicted_plain == predicted_cached).float().mean() >= 0.95


def test_cache_command_builds_once_then_reuses(tmp_path, capsys):
    overrides = [f"paths.data_dir={tmp_path}", "data.synthetic.num_classes=4", "data.synthetic.train_per_class=3",
                 "data.synthetic.test_per_class=1"]
    assert main(overrides) == 0
    first = capsys.readouterr().out
    assert f"image cache: {tmp_path}/cache/raw73_" in first and "16 images, 0 unreadable" in first
    assert main([*overrides, "data.cache_format=jpeg"]) == 0
    assert "/cache/jpeg73_" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").iterdir())) == 2
    assert main(overrides) == 0 and capsys.readouterr().out == first  # reused, not rebuilt
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_cache_command_error_is_one_sentence(tmp_path, capsys):
    assert main([f"paths.data_dir={tmp_path}", "data=stanford_cars", f"data.root={tmp_path}/absent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset root") and "absent" in err and "Traceback" not in err
    assert main([f"paths.data_dir={tmp_path}", "data.cache=true"]) == 2  # a removed flag: its replacement
    assert capsys.readouterr().err == ("error: data.cache=true was removed: use data.pipeline=cache "
                                       "(one of files, cache, gpu_decode, gpu_cache, stream)\n")
    assert not (tmp_path / "cache").exists()


def test_np_memmap_is_not_pickled(small_root, tmp_path):
    import pickle

    cache = open_cache(_samples(small_root)[:2], tmp_path / "cache", Preprocess(image_size=64))
    cache(_samples(small_root)[0])  # opens the memory map
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._data is None and torch.equal(clone(_samples(small_root)[0]), cache(_samples(small_root)[0]))
    assert isinstance(cache._data, np.memmap)


def test_car_box_crop_reads_the_same_car_from_the_cache(small_root, tmp_path):
    # boxes are in the files' pixels: from the smaller cached copy the crop must still frame the same car
    plain = make_dm(small_root, tmp_path, crop_to_bbox=True)
    cached = make_dm(small_root, tmp_path, crop_to_bbox=True, pipeline="cache", cache_dir=str(tmp_path / "cache"))
    diffs = []
    for i in range(len(plain.test_set)):
        a, b = plain.test_set[i][0].float(), cached.test_set[i][0].float()
        assert a.shape == b.shape == (3, 64, 64)
        diffs.append((a - b).abs().mean())
    # the same crop resampled from the 73-px copy: ~12 grey levels on these sharp-edged drawings; a box left in
    # the files' pixels frames another part of the image (~60)
    assert sum(diffs) / len(diffs) < 25
