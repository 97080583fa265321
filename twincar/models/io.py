"""Every way weights come in and go out, always safely (``weights_only`` torch loads, safetensors).

In: a timm hub tag (``model.pretrained``), or a local file (``model.weights``): a plain state dict
``.pth``/``.pt``/``.bin`` (torchvision's resnet50 included), ``.safetensors``, or a Lightning ``.ckpt``.
Out: a plain state dict with torchvision-compatible keys (``model.pth``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from twincar.errors import TwinCarError

log = logging.getLogger(__name__)


class WeightsError(TwinCarError, RuntimeError):
    """Weights could not be had; the message says what to pass instead."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file; a Lightning checkpoint gives its ``model.``-prefixed module weights."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist: pass model.weights=PATH to an existing file")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch/safetensors raise many types for a damaged or foreign file
        raise WeightsError(f"cannot read weights from {path}: {e}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # Lightning checkpoint or a {"state_dict": ...} wrapper
        if any(k.startswith("model.") for k in state):
            state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def checkpoint_class_names(path: str | Path) -> list[str]:
    """Class names stored in a TwinCar Lightning checkpoint (label order)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist: pass ckpt_path=PATH to an existing .ckpt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        return list(ckpt["hyper_parameters"]["class_names"])
    except Exception as e:  # a foreign or damaged file
        raise WeightsError(f"{path} is not a TwinCar checkpoint with class names: {e}") from e


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local weights file into ``model``; a classifier head of another shape is left at init.

    Every non-head tensor must match: a missing or misshapen backbone key is an error naming the file.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    head = model.pretrained_cfg.get("classifier", "fc") if hasattr(model, "pretrained_cfg") else "fc"
    head_keys = {k for k in own if k.startswith(head + ".")}
    for k in head_keys:
        if k in state and state[k].shape != own[k].shape:
            log.info("%s: head %s has shape %s, model needs %s: head left at init",
                     path, k, tuple(state[k].shape), tuple(own[k].shape))
            state = {k2: v for k2, v in state.items() if k2 not in head_keys}
            break
    bad = [k for k in own if k not in head_keys and (k not in state or state[k].shape != own[k].shape)]
    if bad:
        raise WeightsError(
            f"{path} does not fit model {type(model).__name__}: {len(bad)} tensor(s) missing or of another "
            f"shape, e.g. {', '.join(bad[:3])}"
        )
    unexpected = [k for k in state if k not in own]
    if unexpected:
        log.info("%s: ignoring %d tensor(s) the model lacks, e.g. %s", path, len(unexpected), unexpected[0])
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    log.info("loaded weights from %s", path)


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


def export_state_dict(model: nn.Module, path: str | Path) -> Path:
    """Save a plain, CPU, contiguous state dict (for resnet50: the torchvision key names)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, path)
    return path
