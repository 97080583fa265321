"""Model creation, weight files in and out, optimizer groups and the learning-rate schedule."""

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from twincar.models import WeightsError
from twincar.models.checkpoint import export_state_dict, read_state_dict
from twincar.models.classifier import CarClassifier, param_groups, warmup_cosine
from twincar.models.factory import create_model


@pytest.fixture(scope="module")
def tv_resnet50_pth(tmp_path_factory):
    """A plain torchvision resnet50 state dict (1000-class head), as users download it."""
    path = tmp_path_factory.mktemp("w") / "resnet50_tv.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


def test_torchvision_weights_load_into_the_backbone_and_head_is_new(tv_resnet50_pth):
    tv = torch.load(tv_resnet50_pth, weights_only=True)
    model = create_model("resnet50", 14, weights=str(tv_resnet50_pth))
    own = model.state_dict()
    assert torch.equal(own["conv1.weight"], tv["conv1.weight"])
    assert torch.equal(own["layer4.2.bn3.running_var"], tv["layer4.2.bn3.running_var"])
    assert own["fc.weight"].shape == (14, 2048)


def test_exported_state_dict_loads_strictly_into_torchvision(tmp_path):
    model = create_model("resnet50", 14)
    path = export_state_dict(model, tmp_path / "model.pth")
    tv = torchvision.models.resnet50(num_classes=14)
    tv.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randn(1, 3, 64, 64)
    model.eval(), tv.eval()
    assert torch.allclose(model(x), tv(x), atol=1e-5)


def test_safetensors_and_lightning_checkpoint_weights(tmp_path):
    src = create_model("resnet18", 5)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "w.safetensors")
    loaded = create_model("resnet18", 5, weights=str(tmp_path / "w.safetensors"))
    assert torch.equal(loaded.fc.weight, src.fc.weight)  # same head shape: the head is loaded too
    torch.save({"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}, "epoch": 3},
               tmp_path / "run.ckpt")
    assert torch.equal(read_state_dict(tmp_path / "run.ckpt")["conv1.weight"], src.conv1.weight)


def test_weights_errors_name_the_file(tmp_path):
    with pytest.raises(WeightsError, match="nothere.pth does not exist"):
        create_model("resnet18", 5, weights=str(tmp_path / "nothere.pth"))
    torch.save(create_model("resnet18", 5).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match=r"r18.pth does not fit model"):
        create_model("resnet50", 5, weights=str(tmp_path / "r18.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="cannot read weights from .*junk.pth"):
        create_model("resnet18", 5, weights=str(tmp_path / "junk.pth"))


def test_pretrained_tag_must_match_the_architecture():
    with pytest.raises(WeightsError, match="another architecture"):
        create_model("resnet18", 5, pretrained="resnet50.a1_in1k")


def test_param_groups_split_head_and_skip_decay_on_norms_and_biases():
    model = create_model("resnet18", 5)
    groups = {g["name"]: g for g in param_groups(model, lr=0.01, weight_decay=5e-4, head_lr_mult=10)}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    assert groups["head"]["lr"] == pytest.approx(0.1) and groups["backbone"]["lr"] == pytest.approx(0.01)
    assert [p.shape for p in groups["head"]["params"]] == [torch.Size([5, 512])]
    assert groups["head_no_decay"]["weight_decay"] == 0 and groups["backbone_no_decay"]["weight_decay"] == 0
    no_decay = {id(p) for p in groups["backbone_no_decay"]["params"]}
    assert id(model.bn1.weight) in no_decay and id(model.bn1.bias) in no_decay
    assert id(model.conv1.weight) in {id(p) for p in groups["backbone"]["params"]}
    n_params = sum(len(g["params"]) for g in groups.values())
    assert n_params == len(list(model.parameters()))


def test_warmup_cosine_schedule():
    f = lambda s: warmup_cosine(s, warmup_steps=10, total_steps=110, min_lr_ratio=0.01)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.01 + 0.99 * 0.5)  # half-way through the cosine
    assert f(110) == pytest.approx(0.01) and f(500) == pytest.approx(0.01)


def test_classifier_keeps_class_names_and_preprocessing_in_checkpoint_hparams():
    model = CarClassifier(["A X Sedan 2012", "A X Sedan 2007"], name="resnet18",
                          preprocess={"image_size": 64})
    assert model.hparams.class_names == ["A X Sedan 2012", "A X Sedan 2007"]
    assert model.hparams.preprocess == {"image_size": 64}
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 2)


def test_channels_last_and_drop_rate_options_take_effect():
    model = CarClassifier(["a", "b"], name="resnet18", channels_last=True, drop_rate=0.3)
    assert model.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.model.drop_rate == 0.3
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)
