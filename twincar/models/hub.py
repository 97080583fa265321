"""The timm / Hugging Face hub layout, out and in: ``config.json`` (timm's model config, with the class names as
``label_names`` and a ``pretrained_cfg`` whose eval transform is TwinCar's) + ``model.safetensors`` + a ``README.md``
model card; and a TwinCar card read from a hub ``config.json`` written by another tool.

Torch-free: the networks are only read for their attributes. Hub folders and repositories are resolved to weights
by :func:`twincar.models.loading.resolve_model_source`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from twincar.data.preprocess import Preprocess
from twincar.models import WeightsError

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

HUB_CONFIG = "config.json"  # timm's model config: architecture, num_classes, label_names, pretrained_cfg
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # the weights timm looks for in a hub folder, first first
# pretrained_cfg keys that describe the network (kept from timm's own config); the rest is replaced or dropped
_TIMM_NETWORK_KEYS = ("first_conv", "classifier", "fixed_input_size", "min_input_size")


def timm_crop_pct(preprocess: Preprocess) -> float:
    """A ``crop_pct`` for which timm's eval transform resizes the short side to exactly TwinCar's size.

    TwinCar resizes to ``round(image_size / eval_crop_pct)``, timm to ``floor(image_size / crop_pct)``: the
    run's own ``eval_crop_pct`` when both agree (``0.875`` at 224: 256), else ``image_size / (size + 0.25)``,
    which floors to ``size`` whatever the float rounding."""
    if preprocess.resize_mode == "squash":  # the whole image to image_size x image_size, nothing cropped
        return 1.0
    size = preprocess.decode_min_side
    if math.floor(preprocess.image_size / preprocess.eval_crop_pct) == size:
        return preprocess.eval_crop_pct
    return preprocess.image_size / (size + 0.25)


def timm_pretrained_cfg(model: nn.Module, preprocess: Preprocess, class_names: Sequence[str]) -> dict:
    """The ``pretrained_cfg`` of a hub ``config.json`` whose eval transform (timm's ``resolve_data_config`` +
    ``create_transform``) is TwinCar's: short side (or squash) resize, bilinear (PIL's, antialiased), center
    crop, the run's mean and std."""
    own = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg = {k: own[k] for k in _TIMM_NETWORK_KEYS if own.get(k) is not None}
    size = preprocess.image_size
    cfg.update(
        input_size=[3, size, size], interpolation="bilinear", crop_pct=timm_crop_pct(preprocess),
        crop_mode="squash" if preprocess.resize_mode == "squash" else "center", mean=list(preprocess.mean),
        std=list(preprocess.std), num_classes=len(class_names),
    )
    return cfg


def _global_pool(model: nn.Module) -> str:
    pool = getattr(model, "global_pool", "")
    return pool if isinstance(pool, str) else str(getattr(pool, "pool_type", "") or "")


def hub_config(model: nn.Module, class_names: Sequence[str], preprocess: Preprocess, architecture: str) -> dict:
    """timm's hub ``config.json`` for ``model``: what ``timm.create_model("local-dir:DIR", pretrained=True)`` and
    ``"hf-hub:USER/REPO"`` build the network from, with the class names as ``label_names``."""
    config = {"architecture": architecture, "num_classes": len(class_names),
              "num_features": int(getattr(model, "num_features", 0)) or None,
              "global_pool": _global_pool(model) or None,
              "label_names": list(class_names), "pretrained_cfg": timm_pretrained_cfg(model, preprocess, class_names)}
    return {k: v for k, v in config.items() if v is not None}


HUB_README = "README.md"  # the Hugging Face model card: YAML front matter + how to use the model


def hub_readme(card: dict, *, repo: str | None = None, license: str = "other") -> str:
    """The Hugging Face model card (``README.md``) of a hub export: front matter (library_name timm, license,
    datasets, tags, the run's test metrics as model-index results) and a body saying how to load the model with
    timm and with TwinCar, its preprocessing, the class list, and its intended use and limits."""
    names, pre = card["class_names"], card["preprocess"]
    metrics = {k: v for k, v in (card.get("metrics") or {}).items()
               if k.startswith("test/") and isinstance(v, (int, float)) and math.isfinite(v)}
    q = json.dumps  # a JSON string or number is a YAML scalar
    front = ["---", "library_name: timm", f"license: {q(license)}", "pipeline_tag: image-classification",
             "tags:", "  - image-classification", "  - timm", "  - twincar", "  - fine-grained", "datasets:",
             "  - stanford-cars"]
    if metrics:
        front += ["model-index:", f"  - name: {q(repo or card['architecture'])}", "    results:",
                  "      - task:", "          type: image-classification",
                  "        dataset:", "          name: Stanford Cars", "          type: stanford-cars",
                  "        metrics:"]
        for k, v in sorted(metrics.items()):
            kind = "accuracy" if "acc" in k else k.split("/", 1)[1]
            front += [f"          - type: {q(kind)}", f"            name: {q(k)}", f"            value: {q(v)}"]
    front.append("---")
    where = f"hf-hub:{repo}" if repo else "local-dir:PATH/TO/THIS/FOLDER"
    resize = (f"the whole image to {pre['image_size']}x{pre['image_size']} (aspect ratio not kept)"
              if pre["resize_mode"] == "squash" else
              f"short side to {card['input']['resize']['short_side']} px, center crop {pre['image_size']}x"
              f"{pre['image_size']}")
    table = "\n".join(f"| {i} | {n} |" for i, n in enumerate(names))
    shown = ", ".join(f"`{k}` {v:.4f}" for k, v in sorted(metrics.items())) or "none recorded"
    body = f"""
# {card['architecture']} for car make, model and year ({len(names)} classes)

A [timm](https://github.com/huggingface/pytorch-image-models) `{card['architecture']}` fine-tuned with TwinCar to name
a car's make, model and year from one photo. Test metrics of its training run: {shown}.

## Use with timm

```python
import timm, torch
from PIL import Image

model = timm.create_model("{where}", pretrained=True).eval()
config = timm.data.resolve_data_config({{}}, model=model)
transform = timm.data.create_transform(**config)  # exactly this model's eval preprocessing
with torch.inference_mode():
    probs = model(transform(Image.open("car.jpg").convert("RGB")).unsqueeze(0)).softmax(-1)
print(model.pretrained_cfg["label_names"][int(probs.argmax())])
```

## Use with TwinCar

```bash
twincar-predict --images photos/ --model {where}
```

## Preprocessing

RGB, {resize}, bilinear with antialiasing, 0-1 scaling, mean {pre['mean']}, std {pre['std']}; the network
outputs logits (softmax gives the probabilities). `model_card.json` spells out every step for a client in any
language.

## Intended use and limits

Recognising the make, model and year of a car in a photo, among the {len(names)} classes below only: a car of any
other model is still given one of them (look at the confidence). Trained on photos like those of Stanford Cars
(mostly side and three-quarter views of whole cars); close-ups, interiors, heavy occlusion, night shots or drawings
are outside what it has seen. Not for identifying people or vehicles' owners.

## Classes

| label | class |
|---|---|
{table}
"""
    return "\n".join(front) + "\n" + body


def preprocess_from_timm(pretrained_cfg: dict, source: object) -> Preprocess:
    """TwinCar's :class:`Preprocess` for a timm ``pretrained_cfg`` (a hub ``config.json`` not written by TwinCar):
    the same input size, resize (timm's ``floor`` rounding kept), crop, mean and std. TwinCar resizes bilinear
    only: another interpolation is used as bilinear, with a warning naming ``source``."""
    size = pretrained_cfg.get("input_size", [3, 224, 224])
    if not (isinstance(size, list) and len(size) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise WeightsError(f"{source}: pretrained_cfg.input_size is {size!r} but must be [3, SIZE, SIZE], whole "
                           "numbers above 0: correct the file")
    if size[1] != size[2]:
        raise WeightsError(f"{source}: input_size {list(size)} is not square: TwinCar takes square inputs only")
    mode = pretrained_cfg.get("crop_mode") or "center"
    if mode not in ("center", "squash"):
        raise WeightsError(f"{source}: crop_mode {mode!r} is not supported: TwinCar crops 'center' or 'squash'")
    if pretrained_cfg.get("interpolation", "bilinear") != "bilinear":
        log.warning("%s: trained with %s resizing; TwinCar resizes bilinear (answers may differ slightly)",
                    source, pretrained_cfg["interpolation"])
    crop = pretrained_cfg.get("crop_pct") or 0.875
    if not (isinstance(crop, (int, float)) and not isinstance(crop, bool) and 0 < crop <= 1):
        raise WeightsError(f"{source}: pretrained_cfg.crop_pct is {crop!r} but must be a number in (0, 1]: correct "
                           "the file")
    image_size = int(size[-1])
    pre = {"image_size": image_size, "resize_mode": "squash" if mode == "squash" else "crop",
           "eval_crop_pct": 1.0 if mode == "squash" else image_size / math.floor(image_size / crop)}
    for key in ("mean", "std"):
        if pretrained_cfg.get(key):
            pre[key] = pretrained_cfg[key]  # checked with the card (twincar.models.card.check_model_card)
    return Preprocess(**pre)


def card_from_hub_config(config: dict, source: object) -> dict:
    """A TwinCar model card (architecture, class names, preprocessing) from a timm hub ``config.json``."""
    pretrained = config.get("pretrained_cfg") or {}
    names = config.get("label_names", pretrained.get("label_names"))
    if isinstance(names, dict):  # {index: name} with gaps: not a class list TwinCar can use
        names = None
    card = {"architecture": config.get("architecture"),
            "preprocess": preprocess_from_timm(pretrained, source).to_dict()}
    if names:
        card["class_names"] = [str(n) for n in names]
    return {k: v for k, v in card.items() if v is not None}
