"""Predictor: the one inference object (loading, preprocessing, results)."""

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from twincar import Predictor
from twincar.data.classes import stanford_cars_class_names, write_classes_txt
from twincar.data.transforms import TWINCARS_PREPROCESS
from twincar.models.io import WeightsError


@pytest.fixture(scope="module")
def original_pth(tmp_path_factory):
    """The original TwinCars format: a torchvision resnet50 state dict with a 196-way fc, plus classes.txt."""
    d = tmp_path_factory.mktemp("orig")
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(num_classes=196).eval()
    torch.save(tv.state_dict(), d / "resnet50_twin_cars.pth")
    write_classes_txt(stanford_cars_class_names(), d / "classes.txt")
    return d, tv


def test_original_state_dict_gives_the_same_top1_as_torchvision(original_pth, tmp_path):
    d, tv = original_pth
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        p = tmp_path / f"car{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (120 + 10 * i, 160, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    p = Predictor.load(d / "resnet50_twin_cars.pth", classes=d / "classes.txt", device="cpu")
    assert p.preprocess == TWINCARS_PREPROCESS
    results = p.predict(paths, batch_size=2)
    # the original pipeline: Resize((224, 224)), ToTensor, Normalize, eager fp32 forward
    ref = torchvision.transforms.Compose([
        torchvision.transforms.Resize((224, 224)), torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    with torch.no_grad():
        logits = tv(torch.stack([ref(Image.open(q).convert("RGB")) for q in paths]))
    names = stanford_cars_class_names()
    assert [r.name for r in results] == [names[i] for i in logits.argmax(1).tolist()]
    r = results[0]
    assert r.make and r.year and len(r.topk) == 5 and 0 < r.confidence <= 1


def test_unreadable_file_gets_an_error_and_the_rest_is_predicted(original_pth, tmp_path):
    d, _ = original_pth
    good, bad = tmp_path / "good.png", tmp_path / "bad.jpg"
    Image.new("RGB", (64, 48), "red").save(good)
    bad.write_bytes(b"not an image")
    p = Predictor.load(d / "resnet50_twin_cars.pth", classes=d / "classes.txt", device="cpu")
    r_bad, r_good = p.predict([bad, good])
    assert "bad.jpg" in r_bad.error and r_bad.name == ""
    assert r_good.ok and r_good.name in p.class_names
    assert p.predict(Image.new("L", (50, 40))).ok  # PIL grayscale
    assert p.predict(torch.zeros(3, 40, 50, dtype=torch.uint8)).ok  # a uint8 tensor


def test_class_count_mismatch_names_both_numbers(original_pth, tmp_path):
    d, _ = original_pth
    write_classes_txt(["A 2001", "B 2002"], tmp_path / "two.txt")
    with pytest.raises(WeightsError, match=r"2 names but .* 196 outputs"):
        Predictor.load(d / "resnet50_twin_cars.pth", classes=tmp_path / "two.txt")
    with pytest.raises(WeightsError, match="carries no class names: pass --classes"):
        Predictor.load(d / "resnet50_twin_cars.pth")
