"""Other timm backbones: each builds, takes a training step with head/backbone groups, and exports."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from twincar.models.checkpoint import export_state_dict
from twincar.models.classifier import CarClassifier, param_groups

NAMES = ["Audi S4 Sedan 2007", "Audi S4 Sedan 2012", "BMW M3 Coupe 2012"]
# (timm name, input side); ViT-S/16 takes 224 px, the convolutional ones any size
BACKBONES = [
    ("resnet18", 64),
    pytest.param("resnet34", 64, marks=pytest.mark.slow),  # about 4 s on 2 cores
    pytest.param("resnet101", 64, marks=pytest.mark.slow),  # about 4 s on 2 cores
    pytest.param("convnext_tiny", 64, marks=pytest.mark.slow),  # about 5 s on 2 cores
    ("efficientnet_b0", 64),
    pytest.param("vit_small_patch16_224", 224, marks=pytest.mark.slow),  # about 10 s on 2 cores
]
TORCHVISION = {"resnet18", "resnet34", "resnet50", "resnet101"}


@pytest.mark.parametrize(("name", "size"), BACKBONES)
def test_backbone_builds_trains_a_step_and_exports(tmp_path, name, size):
    torch.manual_seed(0)
    model = CarClassifier(NAMES, name=name, optimizer={"opt": "adamw", "lr": 1e-3, "head_lr_mult": 10.0},
                          scheduler={"name": "none"})
    head = model.model.get_classifier()
    assert head.out_features == len(NAMES)
    groups = {g["name"]: g for g in param_groups(model.model, lr=1e-3, weight_decay=0.05, head_lr_mult=10.0)}
    assert {id(p) for p in groups["head"]["params"]} | {id(p) for p in groups["head_no_decay"]["params"]} == {
        id(p) for p in head.parameters()}
    assert groups["head"]["lr"] == pytest.approx(1e-2) and groups["backbone"]["lr"] == pytest.approx(1e-3)

    optimizer = model.configure_optimizers()
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    model.train()
    x, y = torch.rand(2, 3, size, size), torch.tensor([0, 2])
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    after = model.model.state_dict()
    assert not torch.equal(after[next(k for k in after if k.endswith("weight"))], next(
        before[k] for k in before if k.endswith("weight")))  # the first layer moved: the backbone trains
    assert not torch.equal(head.weight, before[f"{model.model.pretrained_cfg.get('classifier', 'fc')}.weight"])

    path = export_state_dict(model.model, tmp_path / "model.pth")
    state = torch.load(path, weights_only=True)
    if name in TORCHVISION:  # ResNets export torchvision's key names
        import torchvision

        getattr(torchvision.models, name)(num_classes=len(NAMES)).load_state_dict(state, strict=True)
    else:  # the others a timm state dict
        timm.create_model(name, num_classes=len(NAMES)).load_state_dict(state, strict=True)


def test_model_group_options_name_timm_architectures():
    from importlib import resources

    from omegaconf import OmegaConf

    conf = resources.files("twincar") / "conf" / "model"
    for option in ("resnet18", "convnext_tiny", "efficientnet_b0"):
        cfg = OmegaConf.load(str(conf / f"{option}.yaml"))
        assert cfg.name == option and timm.is_model(cfg.name)
        assert str(cfg.pretrained).split(".")[0] == option  # the hub tag is for that architecture
