"""Grad-CAM through the Predictor: the map points at the evidence, targets, modes and hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from twincar import Predictor
from twincar.data.transforms import Preprocess
from twincar.explain import Explainer, ExplainError

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
    assert 0 <= e.cam.min() and e.cam.max() == pytest.approx(1.0)
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
    x = predictor.batch_transform(img[None])
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
