"""Predictor: the one inference object (loading, preprocessing, results)."""

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from twincar import Predictor
from twincar.data.classes import stanford_cars_class_names, write_classes_txt
from twincar.data.preprocess import TWINCARS_PREPROCESS
from twincar.models import WeightsError


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
    assert f"{r.make} {r.model} {r.year}" == r.name == names[int(logits[0].argmax())]
    # confidence and top-5 are the softmax of the model's logits on the prepared image, most likely first
    probs = torch.from_numpy(p.logits(p.prepare(paths[0])[None])).softmax(1)[0]
    top_p, top_i = probs.topk(5)
    assert r.confidence == pytest.approx(top_p[0].item(), abs=1e-6)
    assert r.topk == [(names[i], pytest.approx(q, abs=1e-6)) for i, q in zip(top_i.tolist(), top_p.tolist(),
                                                                              strict=True)]


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
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "resnet50_twin_cars.pth").write_bytes((d / "resnet50_twin_cars.pth").read_bytes())
    with pytest.raises(WeightsError, match="carries no class names: pass --classes"):
        Predictor.load(alone / "resnet50_twin_cars.pth")  # no classes.txt beside it either
    assert len(Predictor.load(d / "resnet50_twin_cars.pth").class_names) == 196  # the classes.txt beside it


class _Payload:
    """Pickles to a call of ``open(marker, "w")``: loading it with plain pickle would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class _Foreign:
    """A harmless object of a class torch's safe loader does not know."""


@pytest.mark.parametrize("suffix", [".pth", ".ckpt", ".pt"])
def test_a_malicious_pickle_is_refused_in_one_sentence_and_its_payload_never_runs(tmp_path, suffix):
    from twincar.models.checkpoint import load_weights, read_state_dict

    marker = tmp_path / "pwned"
    evil = tmp_path / f"evil{suffix}"
    state = {"fc.weight": torch.zeros(2, 4), "payload": _Payload(marker)}
    torch.save({"state_dict": state, "hyper_parameters": {}} if suffix == ".ckpt" else state, evil)
    for load in (lambda: Predictor.load(evil, classes=["A 2001", "B 2002"]), lambda: read_state_dict(evil),
                 lambda: load_weights(torch.nn.Linear(4, 2), evil)):
        with pytest.raises(WeightsError) as e:
            load()
        assert "needs pickle code execution to load" in str(e.value) and "refused for safety" in str(e.value)
        assert "\n" not in str(e.value)
    assert not marker.exists()


def test_a_checkpoint_with_a_foreign_object_inside_is_refused(tmp_path):
    import timm

    from twincar.export import export_model

    model = timm.create_model("resnet18", num_classes=2)
    ckpt = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"class_names": ["A 2001", "B 2002"], "name": "resnet18", "extra": _Foreign()}},
               ckpt)
    for load in (lambda: Predictor.load(ckpt), lambda: export_model(ckpt, "pth", tmp_path / "out")):
        with pytest.raises(WeightsError, match=r"foreign.ckpt needs pickle code execution to load .* refused"):
            load()
    assert not (tmp_path / "out" / "model.pth").exists()
