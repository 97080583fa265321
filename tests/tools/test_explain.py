"""Grad-CAM through the Predictor: the map points at the evidence, targets, modes and hooks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from twincar import Predictor
from twincar.data.preprocess import Preprocess
from twincar.gradcam.explainer import Explainer, ExplainError

SIZE = 32
CLASSES = ["Redcar Sedan 2001", "Greencar Sedan 2002"]


class ColourNet(nn.Module):
    """Class 0 is "how much red", class 1 "how much green": a constructed case where a region drives a class.

    ``layer4`` is a 1x1 conv + ReLU at full resolution whose channel 0 lights up on red pixels and channel 1 on
    green ones (zero on black), so the right CAM of class c is the region of colour c.
    """

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(3, 2, 1)
        black = -torch.tensor([0.485, 0.456]) / torch.tensor([0.229, 0.224])  # normalised black, R and G
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[0, 0] = 1.0
            conv.weight[1, 1] = 1.0
            conv.bias.copy_(-black)
        self.layer4 = nn.Sequential(conv, nn.ReLU())
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(2) * 4)
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.layer4(x).mean((2, 3)))


def two_squares(red_size: int = 10, green_size: int = 6) -> np.ndarray:
    """Black image, a red square top-left and a (smaller) green square bottom-right."""
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[2:2 + red_size, 2:2 + red_size, 0] = 255
    img[SIZE - 2 - green_size:SIZE - 2, SIZE - 2 - green_size:SIZE - 2, 1] = 255
    return img


@pytest.fixture
def predictor() -> Predictor:
    pre = Preprocess(image_size=SIZE, eval_crop_pct=1.0, resize_mode="squash")
    return Predictor(ColourNet(), CLASSES, pre, device="cpu")


def peak(cam: np.ndarray) -> tuple[int, int]:
    return np.unravel_index(int(cam.argmax()), cam.shape)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "finercam"])
def test_cam_peak_lies_in_the_region_that_drives_the_target(predictor, method, tmp_path):
    path = tmp_path / "car.png"
    Image.fromarray(two_squares()).save(path)
    explainer = Explainer(predictor, method=method)
    e = explainer.explain(path)  # red square is larger: predicted class 0
    assert e.prediction.name == CLASSES[0] and e.target == 0 and e.method == method
    assert e.cam.shape == (SIZE, SIZE) and e.cam.dtype == np.float32
    assert e.cam.min() == pytest.approx(0.0, abs=1e-6) and e.cam.max() == pytest.approx(1.0)  # scaled to 0..1
    y, x = peak(e.cam)
    assert 2 <= y < 12 and 2 <= x < 12  # inside the red square
    assert e.image.shape == e.overlay.shape == (SIZE, SIZE, 3) and e.overlay.dtype == np.uint8
    assert (e.image[5, 5] == [255, 0, 0]).all()  # the prepared input itself
    # the same explainer, another target (by name): the map moves to the green square
    g = explainer.explain(path, target="Greencar Sedan 2002")
    assert g.target == 1 and g.prediction.name == CLASSES[0]
    y, x = peak(g.cam)
    assert SIZE - 8 <= y < SIZE - 2 and SIZE - 8 <= x < SIZE - 2


def test_faithfulness_is_the_confidence_drop_when_the_evidence_is_removed(predictor):
    img = torch.from_numpy(two_squares()).permute(2, 0, 1).contiguous()
    e = Explainer(predictor).explain(img)
    # removing the top 20% of the CAM (all of the red square) must cost class 0 confidence
    assert e.faithfulness is not None and e.faithfulness > 0.1
    # by hand: red pixels set to the mean colour. The removed pixels' channel-0 activation falls from 4.37 to
    # 2.12 (normalised red 2.25 -> 0, plus the bias); the model's confidence is recomputed on that input.
    x = predictor.engine.input(predictor.prepare(img)[None])  # the network input the explainer saw
    keep = torch.from_numpy(e.cam < np.percentile(e.cam, 80)).float()
    with torch.no_grad():
        after = predictor.model(x * keep).softmax(1)[0, 0]
    assert e.faithfulness == pytest.approx(e.prediction.confidence - after.item(), abs=1e-5)
    assert Explainer(predictor, faithfulness=False).explain(img).faithfulness is None


def test_true_target_needs_labels_and_unknown_names_are_named(predictor):
    img = torch.from_numpy(two_squares()).permute(2, 0, 1).contiguous()
    ex = Explainer(predictor)
    assert ex.explain([img, img], target="true", labels=[1, "redcar sedan 2001"])[0].target == 1
    with pytest.raises(ExplainError, match="target='true' needs the true label"):
        ex.explain(img, target="true")
    with pytest.raises(ExplainError, match="'Bluecar 2003' is not one of the model's 2 class names"):
        ex.explain(img, target="Bluecar 2003")
    with pytest.raises(ExplainError, match="unknown CAM method 'scorecam'"):
        Explainer(predictor, method="scorecam")
    with pytest.raises(ExplainError, match="no module 'layer9'"):
        Explainer(predictor, target_layer="layer9")


def test_modes_hooks_and_inference_mode_are_left_as_they_were(predictor, tmp_path):
    img = torch.from_numpy(two_squares()).permute(2, 0, 1).contiguous()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    ex = Explainer(predictor, method="eigencam")
    predictor.model.train()
    predictor.model.fc.eval()
    with torch.inference_mode():  # the caller's context: explain turns autograd back on for itself
        out = ex.explain([bad, img])
    assert predictor.model.training and not predictor.model.fc.training
    assert "bad.jpg" in out[0].prediction.error and out[0].cam is None
    assert out[1].ok and out[1].cam.shape == (SIZE, SIZE)
    layer = predictor.model.layer4
    assert not layer._forward_hooks  # hooks live only during explain(): predict is untouched
    assert all(p.grad is None for p in predictor.model.parameters())
    assert predictor.predict(img).name == out[1].prediction.name


# -- the command line ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def original_model(tmp_path_factory):
    """The original TwinCars format: a torchvision resnet50 state dict with a 196-way fc, and classes.txt;
    two images in a folder named after their class (for --target true)."""
    import torchvision

    from twincar.data.classes import stanford_cars_class_names, write_classes_txt

    d = tmp_path_factory.mktemp("original")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(num_classes=196).state_dict(), d / "resnet50_twin_cars.pth")
    names = stanford_cars_class_names()
    write_classes_txt(names, d / "classes.txt")
    folder = d / "images" / names[7]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(folder / f"car{i}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    return d, names


@pytest.mark.slow  # a ResNet-50 at 224 px: about 10 s on 2 idle cores
def test_cli_reads_the_original_pth_and_writes_overlays_grid_and_csv(original_model, tmp_path):
    import csv

    from twincar.explain import main

    d, names = original_model
    out = tmp_path / "cams"
    assert main(["--images", str(d / "images"), "--model", str(d / "resnet50_twin_cars.pth"), "--classes",
                 str(d / "classes.txt"), "--method", "finercam", "--target", "true", "--out", str(out)]) == 0
    with (out / "explain.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows] == ["broken.jpg", "car0.jpg", "car1.jpg"]
    assert "broken.jpg" in rows[0]["error"] and rows[0]["overlay"] == ""
    p = Predictor.load(d / "resnet50_twin_cars.pth", classes=d / "classes.txt", device="cpu")
    explainer = Explainer(p, method="finercam")
    for r in rows[1:]:
        assert r["pred_name"] == p.predict(r["path"]).name and r["target_name"] == names[7]
        # the CSV's faithfulness is the confidence drop the library computes for that image and target
        again = explainer.explain(r["path"], target=names[7])
        assert float(r["faithfulness"]) == pytest.approx(again.faithfulness, abs=1e-4) and r["method"] == "finercam"
        with Image.open(out / r["overlay"]) as img:  # image + overlay, titled
            assert img.format == "PNG" and img.size == (700, 380)
    with Image.open(out / "finercam_grid.png") as grid:
        assert grid.format == "PNG"


def test_cli_errors_are_one_sentence(original_model, tmp_path, caplog):
    from twincar.explain import main

    d, _ = original_model
    args = ["--model", str(d / "resnet50_twin_cars.pth"), "--classes", str(d / "classes.txt"), "--out", str(tmp_path)]
    assert main(["--images", str(tmp_path / "none.jpg"), *args]) == 1
    assert "none.jpg does not exist" in caplog.text
    assert main(["--images", str(d / "images"), "--target", "Trabant 601 1964", *args]) == 1
    assert "'Trabant 601 1964' is not one of the model's 196 class names" in caplog.text
    (tmp_path / "alone.pth").symlink_to(d / "resnet50_twin_cars.pth")  # no classes.txt beside it
    assert main(["--images", str(d / "images"), "--model", str(tmp_path / "alone.pth"), "--out", str(tmp_path)]) == 1
    assert "carries no class names: pass --classes" in caplog.text
    loose = tmp_path / "loose.png"
    Image.new("RGB", (40, 30)).save(loose)
    assert main(["--images", str(loose), "--target", "true", *args]) == 1
    assert f"--target true: the folder of {loose} ('{tmp_path.name}') is not a class name" in caplog.text
    assert not (tmp_path / "explain.csv").exists()
