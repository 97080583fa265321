"""Networks built: a timm model with K outputs (random, pretrained from the hub, or from a local weights file),
one holding exactly a state dict's tensors, and the smallest input a network takes."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from twincar.models import WeightsError
from twincar.models.checkpoint import load_weights


def create_model(
    name: str, num_classes: int, *, pretrained: bool | str = False, weights: str | None = None, **kwargs
) -> nn.Module:
    """A timm model with ``num_classes`` outputs.

    Args:
        name: timm architecture, e.g. ``resnet50``.
        pretrained: False for random init; True for timm's default tag; or a hub tag
            such as ``resnet50.a1_in1k``. Fetched from the Hugging Face hub (or its local cache).
        weights: a local weights file, loaded after creation (takes the place of ``pretrained``).
        kwargs: passed to ``timm.create_model`` (``drop_rate``, ``drop_path_rate``, ...).
    """
    import timm  # here, not at import time: an ONNX model needs none of it

    if weights:
        model = timm.create_model(name, num_classes=num_classes, pretrained=False, **kwargs)
        load_weights(model, weights)
        return model
    if not pretrained:
        return timm.create_model(name, num_classes=num_classes, pretrained=False, **kwargs)
    tag = name if pretrained is True else str(pretrained)
    if "." not in tag and tag != name:
        tag = f"{name}.{tag}"  # a bare tag such as "a1_in1k"
    if tag.split(".")[0] != name:
        raise WeightsError(f"model.pretrained={pretrained} is for another architecture than model.name={name}")
    try:
        return timm.create_model(tag, num_classes=num_classes, pretrained=True, **kwargs)
    except Exception as e:  # hub/network errors come in many types
        raise WeightsError(
            f"could not load pretrained weights '{tag}' (no network and not in the Hugging Face cache?): "
            "pass model.weights=/path/to/weights.pth (or .safetensors) or model.pretrained=false"
        ) from e


def min_input_size(model: nn.Module) -> int:
    """The smallest input side a network takes: its total stride (timm's last ``feature_info`` reduction, 32 for
    a ResNet), below which its last feature map is made of padding alone; 1 when the network does not say."""
    info = getattr(model, "feature_info", None)
    try:
        return int(info[-1]["reduction"]) if info else 1
    except (TypeError, KeyError, IndexError):
        return 1


def build_model(arch: str, num_classes: int, state: dict[str, torch.Tensor], path: str | Path) -> nn.Module:
    """A timm ``arch`` network holding exactly the tensors of ``state`` (from ``path``, named in errors), in
    eval mode: a missing, unexpected or misshapen tensor is an error."""
    model = create_model(arch, num_classes)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshapen = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or misshapen:
        raise WeightsError(
            f"{path} does not fit architecture {arch}: {len(missing)} missing, {len(unexpected)} unexpected and "
            f"{len(misshapen)} misshapen tensor(s), e.g. {(missing or unexpected or misshapen)[0]}; "
            "keep its model_card.json beside it (or pass the architecture it was trained with)"
        )
    model.load_state_dict(state)
    return model.eval()
