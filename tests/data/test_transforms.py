import numpy as np
import pytest
import torch
from PIL import Image

from twincar.data.images import ImageReadError, load_rgb
from twincar.data.preprocess import Preprocess
from twincar.data.transforms import Augmentation, BatchTransform, EvalImageTransform, TrainImageTransform, to_tensor


def test_grayscale_jpeg_decodes_to_rgb(tmp_path):
    Image.fromarray(np.full((30, 40), 128, np.uint8), mode="L").save(tmp_path / "g.jpg")
    img = load_rgb(tmp_path / "g.jpg")
    assert img.shape == (30, 40, 3) and img.dtype == np.uint8
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])


def test_unreadable_image_error_names_the_file(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        load_rgb(tmp_path / "broken.jpg")
    with pytest.raises(ImageReadError, match="absent.jpg"):
        load_rgb(tmp_path / "absent.jpg")


@pytest.mark.parametrize("size", [64, 224, 448])
def test_per_image_transforms_give_uint8_squares(size):
    img = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    pre = Preprocess(image_size=size)
    aug = Augmentation(scale=(0.3, 1.0), hflip=0.5, rotation=10)
    for tf in (TrainImageTransform(pre, aug), EvalImageTransform(pre)):
        out = tf(img)
        assert out.shape == (3, size, size) and out.dtype == torch.uint8


def test_eval_transform_is_resize_then_center_crop():
    # a 200x100 image: short side -> 64 / 0.5 = 128, so 256x128, then the central 64x64
    img = torch.zeros((3, 100, 200), dtype=torch.uint8)
    img[:, 40:60, 90:110] = 255  # a bright square in the centre
    out = EvalImageTransform(Preprocess(image_size=64, eval_crop_pct=0.5))(img)
    assert out.shape == (3, 64, 64)
    assert out[:, 32, 32].min() > 200 and out[:, 0, 0].max() < 30


def test_batch_transform_normalises_with_imagenet_stats():
    x = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
    out = BatchTransform(Preprocess())(x)
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert out.dtype == torch.float32
    assert torch.allclose(out[0, :, 0, 0], expected, atol=1e-5)


def test_photometric_augmentation_is_per_sample():
    torch.manual_seed(0)
    x = torch.full((8, 3, 16, 16), 128, dtype=torch.uint8)
    aug = Augmentation(color_jitter=(0.4, 0.4, 0.4, 0.0), color_jitter_prob=1.0)
    out, labels = BatchTransform(Preprocess(), aug, num_classes=5)(x, torch.arange(8) % 5)
    means = out.mean(dim=(1, 2, 3))
    assert means.unique().numel() == 8  # each image jittered with its own parameters
    assert torch.equal(labels, torch.arange(8) % 5)


def test_mixup_cutmix_give_soft_targets_that_sum_to_one():
    torch.manual_seed(0)
    aug = Augmentation(mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=1.0)
    assert aug.mixes
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    out, targets = BatchTransform(Preprocess(), aug, num_classes=5)(x, labels)
    assert out.shape == (8, 3, 32, 32) and targets.shape == (8, 5)
    assert torch.allclose(targets.sum(1), torch.ones(8))
    assert (targets.max(1).values < 1).any()  # the images really were mixed
    # each image's own label keeps weight >= the partner's share only with lam >= 0.5; at least present
    assert (targets[torch.arange(8), labels] > 0).all()


def test_mixup_rejects_an_odd_batch():
    aug = Augmentation(mixup_alpha=0.8, mix_prob=1.0)
    with pytest.raises(ValueError, match="even batch"):
        BatchTransform(Preprocess(), aug, num_classes=5)(torch.zeros((3, 3, 8, 8), dtype=torch.uint8),
                                                        torch.tensor([0, 1, 2]))


def test_augmentation_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown augmentation option.*colour_jitter"):
        Augmentation.from_config({"colour_jitter": [0.1, 0.1, 0.1, 0.0]})
    assert Augmentation.from_config({"scale": [0.5, 1.0]}).scale == (0.5, 1.0)


def test_augmentation_benchmark_script_prints_the_ratio(capsys):
    import runpy
    from pathlib import Path

    main = runpy.run_path(str(Path(__file__).parents[2] / "scripts" / "bench_augment.py"))["main"]
    main(["--device", "cpu", "--batch-size", "4", "--size", "32", "--batches", "1"])
    out = capsys.readouterr().out
    assert "per image, CPU (reference)" in out and "ratio (per batch / per image):" in out


def test_load_rgb_refuses_bombs_from_the_header_and_names_empty_files(tmp_path, monkeypatch):
    from PIL import Image

    from twincar.data import images

    big = tmp_path / "big.png"
    Image.new("L", (400, 300)).save(big)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100_000)
    with pytest.raises(images.ImageReadError, match=r"big.png: 400x300 pixels is over the 100000 limit"):
        images.load_rgb(big)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(images.ImageReadError, match=r"empty.jpg: the file is empty"):
        images.load_rgb(tmp_path / "empty.jpg")
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(images.ImageReadError, match=r"text.jpg: not an image"):
        images.load_rgb(tmp_path / "text.jpg")


def _photo(path, width=800, height=600, **save):
    """A JPEG with smooth structure and fine detail, like a photo (not flat, not pure noise)."""
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 40, width // 40, 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
    pixels = pixels + rng.normal(0, 6, pixels.shape).astype(np.int16)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90, **save)
    return path


def test_reduced_size_decode_keeps_min_side_and_the_pixels(tmp_path):
    from twincar.data.images import reduced_decode_scale

    assert [reduced_decode_scale(800, 600, m) for m in (600, 300, 150, 120, 20)] == [1, 2, 4, 4, 8]
    path = _photo(tmp_path / "car.jpg")
    full = load_rgb(path)
    small = load_rgb(path, min_side=140)  # 600 // 4 = 150 >= 140: decoded at 1/4 scale
    assert small.shape == (150, 200, 3) and small.dtype == np.uint8 and small.flags.writeable  # torch.from_numpy
    # after the eval resize the two agree within a grey level on average
    pre = Preprocess(image_size=128, eval_crop_pct=1.0)
    a, b = EvalImageTransform(pre)(to_tensor(full)).float(), EvalImageTransform(pre)(to_tensor(small)).float()
    assert a.shape == b.shape == (3, 128, 128) and (a - b).abs().mean() < 1.5
    # PNG has no DCT scaling: decoded in full
    Image.open(path).save(tmp_path / "car.png")
    assert load_rgb(tmp_path / "car.png", min_side=140).shape == (600, 800, 3)


def test_reduced_size_decode_applies_exif_orientation_and_keeps_errors(tmp_path, monkeypatch):
    from twincar.data import images

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    path = _photo(tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert load_rgb(path).shape == (800, 600, 3)
    assert load_rgb(path, min_side=140).shape == (200, 150, 3)
    (tmp_path / "broken.jpg").write_bytes(open(path, "rb").read()[:2000])
    with pytest.raises(ImageReadError, match="broken.jpg"):
        load_rgb(tmp_path / "broken.jpg", min_side=100)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100_000)
    with pytest.raises(ImageReadError, match="rotated.jpg: 800x600 pixels is over"):
        load_rgb(path, min_side=100)


@pytest.mark.parametrize("shape", [(3, 64, 64), (3, 57, 80), (1, 40, 31)])
def test_rotation_is_torchvisions_pixel_for_pixel(shape):
    from torchvision.transforms.v2 import functional as F

    from twincar.data.transforms import RandomRotation, rotate_nearest

    img = torch.randint(1, 256, shape, dtype=torch.uint8)
    for angle in (-10.0, -3.7, 0.0, 4.2, 9.9):
        assert torch.equal(rotate_nearest(img, angle), F.rotate(img, angle))
    torch.manual_seed(0)
    outs = [RandomRotation(10)(img) for _ in range(5)]
    assert all(o.shape == img.shape and o.dtype == torch.uint8 for o in outs)
    assert any((o == 0).any() for o in outs)  # rotated: corners filled with 0 (the image has no 0 pixel)


def test_train_decode_size_keeps_every_random_crop_at_full_resolution():
    from torchvision.transforms import RandomResizedCrop

    from twincar.data.transforms import train_decode_min_side

    pre, aug = Preprocess(image_size=224), Augmentation(scale=(0.35, 1.0), ratio=(0.75, 1.3333))
    side = train_decode_min_side(pre, aug)
    assert side == 438  # 224 * sqrt(1.3333 / 0.35): a 480-px-high photo is decoded in full, a 1200-px one at 1/2
    assert train_decode_min_side(pre, Augmentation(random_resized_crop=False)) == pre.decode_min_side
    torch.manual_seed(0)
    for w in (side, 2 * side):  # the image as decoded at reduced size: short side == side
        img = torch.zeros((3, side, w), dtype=torch.uint8)
        crops = [RandomResizedCrop.get_params(img, list(aug.scale), list(aug.ratio)) for _ in range(300)]
        assert min(min(h, cw) for _, _, h, cw in crops) >= 224  # no crop is enlarged to reach 224
