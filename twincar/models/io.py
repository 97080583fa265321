"""Every way weights come in and go out, always safely (``weights_only`` torch loads, safetensors).

In: a timm hub tag (``model.pretrained``), or a local file (``model.weights``): a plain state dict
``.pth``/``.pt``/``.bin`` (torchvision's resnet50 included), ``.safetensors``, or a Lightning ``.ckpt``;
for inference, :func:`load_model` also reads ``.onnx`` (run by onnxruntime, imported only then).
Out: a plain state dict with torchvision-compatible keys (``model.pth``); see :mod:`twincar.export`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from twincar.data.classes import class_names_difference, read_class_names
from twincar.data.transforms import TWINCARS_PREPROCESS, Preprocess
from twincar.errors import TwinCarError
from twincar.files import ReadError, atomic_path, read_json_object, write_json

log = logging.getLogger(__name__)


class WeightsError(TwinCarError, RuntimeError):
    """Weights could not be had; the message says what to pass instead."""


def safe_torch_load(path: Path, *, mmap: bool = False) -> object:
    """``torch.load(weights_only=True)``: a file that needs pickle code execution is refused in one sentence, an
    empty or truncated one is named as such. ``mmap``: map the tensors instead of reading them (a cheap check)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for a damaged or foreign file
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise WeightsError(
                f"{path} needs pickle code execution to load (it holds more than tensors and plain values): "
                "refused for safety; re-save it as a plain state dict or .safetensors"
            ) from e
        problem = load_problem(path, e)
        if problem.startswith("cannot be read: "):
            raise WeightsError(f"cannot read weights from {path}: {problem.removeprefix('cannot be read: ')}") from e
        raise WeightsError(f"{path} {problem}") from e


def load_problem(path: Path, error: Exception) -> str:
    """Why ``torch.load`` failed on ``path``, as the end of a sentence that starts with the path: ``is empty (0
    bytes)``, ``is truncated or damaged (...)``, or ``cannot be read: <the error's first line>``."""
    path, text = Path(path), str(error).strip()
    detail = text.splitlines()[0].split(". ")[0] if text else type(error).__name__  # torch adds paragraphs of advice
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    if size == 0:
        return "is empty (0 bytes)"
    if magic == b"PK" or magic[:1] == b"\x80" or isinstance(error, EOFError):  # a torch zip or pickle file
        return f"is truncated or damaged ({size} bytes; {detail})"
    return f"cannot be read: {detail}"


def save_torch(obj: object, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (:func:`twincar.files.atomic_path`): a full disk or a kill leaves
    the previous file intact and no temporary file; an ``OSError`` becomes a :class:`~twincar.files.WriteError`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # torch's writer turns the file's OSError (ENOSPC) into a RuntimeError
            cause = e.__context__
            if isinstance(cause, OSError):
                raise cause from e
            raise
    return Path(path)


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` whose keys start with ``prefix`` (a LightningModule's ``model.``), without it."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def module_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's own tensors of a state dict: a Lightning checkpoint's ``model.``-prefixed ones (the
    :class:`~twincar.models.classifier.CarClassifier` keeps its network as ``self.model``), and a DDP/
    ``DataParallel`` save without its ``module.`` prefix. The one place these prefixes are known."""
    if any(k.startswith("model.") for k in state):
        state = strip_prefix(state, "model.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file; a Lightning checkpoint gives its ``model.``-prefixed module weights."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist: pass model.weights=PATH to an existing file")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors raises several types for a damaged or foreign file
            raise WeightsError(f"cannot read weights from {path}: {e}") from e
    else:
        state = safe_torch_load(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # Lightning checkpoint or a {"state_dict": ...} wrapper
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return module_weights(state)


def checkpoint_class_names(path: str | Path) -> list[str]:
    """Class names stored in a TwinCar Lightning checkpoint (label order)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist: pass ckpt_path=PATH to an existing .ckpt")
    ckpt = safe_torch_load(path)
    try:
        return list(ckpt["hyper_parameters"]["class_names"])
    except Exception as e:  # a foreign file
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


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors, detached, on the CPU and contiguous (for resnet50: the torchvision key names)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def export_state_dict(model: nn.Module, path: str | Path) -> Path:
    """Save a plain state dict (:func:`plain_state_dict`) to ``path`` atomically."""
    return save_torch(plain_state_dict(model), path)


def export_safetensors(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Save the model's tensors as ``.safetensors`` to ``path`` atomically, with ``metadata`` (string keys and
    values, e.g. ``{"format": "pt"}``) in its header."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(plain_state_dict(model), str(tmp), metadata=metadata)
    return Path(path)


def min_input_size(model: nn.Module) -> int:
    """The smallest input side a network takes: its total stride (timm's last ``feature_info`` reduction, 32 for
    a ResNet), below which its last feature map is made of padding alone; 1 when the network does not say."""
    info = getattr(model, "feature_info", None)
    try:
        return int(info[-1]["reduction"]) if info else 1
    except (TypeError, KeyError, IndexError):
        return 1


def input_contract(preprocess: Preprocess) -> dict:
    """Everything a client needs to turn an image file into the network's input, with no TwinCar code: the
    ``input`` section of the model card. TwinCar's own predict follows exactly these steps (a numpy + PIL
    client that follows them gets the same answers: ``tests/test_deploy.py``)."""
    size = preprocess.image_size
    if preprocess.resize_mode == "squash":
        resize = {"mode": "squash", "size": [size, size], "interpolation": "bilinear", "antialias": True,
                  "rule": "the whole image to size (width, height); aspect ratio not kept"}
        crop = None
        decode_side = size
    else:
        decode_side = preprocess.decode_min_side
        resize = {"mode": "short_side", "short_side": decode_side, "interpolation": "bilinear", "antialias": True,
                  "rule": "short side to short_side = round(image_size / eval_crop_pct); long side "
                          "int(short_side * long / short), truncated"}
        crop = {"mode": "center", "size": [size, size],
                "rule": "top = int(round((height - size) / 2)), left = int(round((width - size) / 2)), "
                        "Python's round (half to even)"}
    return {
        "layout": "NCHW", "dtype": "float32", "channels": "RGB", "batch": "any (dynamic)",
        "decode": {"color": "RGB (grayscale, palette, CMYK converted; alpha dropped; 16-bit scaled to 8)",
                   "exif_orientation": "applied (PIL ImageOps.exif_transpose)",
                   "large_jpeg": f"decoded at 1/s size by libjpeg DCT scaling (PIL Image.draft('RGB', (ceil(w / s), "
                                 f"ceil(h / s)))), s the largest of 1, 2, 4, 8 with min(w, h) // s >= {decode_side}"},
        "resize": resize, "crop": crop,
        "scale": "pixel / 255 (0 to 1)", "mean": list(preprocess.mean), "std": list(preprocess.std),
        "normalize": "(pixel / 255 - mean) / std, per channel",
    }


MODEL_CARD = "model_card.json"  # written beside exported weights: architecture, class names, preprocessing


def build_model_card(
    class_names: Sequence[str],
    preprocess: Preprocess,
    architecture: str,
    *,
    metrics: dict | None = None,
    config: dict | None = None,
    source: str | None = None,
    calibration: dict | None = None,
) -> dict:
    """What a consumer of exported weights needs (class names, preprocessing, architecture) and what the run was
    (metrics such as ``test/acc``, config group choices and overrides), and its ``calibration`` when fitted."""
    from twincar import __version__

    return {
        "architecture": architecture,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "preprocess": preprocess.to_dict(),
        "input": input_contract(preprocess),
        "output": {"name": "logits", "shape": ["N", len(class_names)], "dtype": "float32",
                   "meaning": "unnormalised logits, one per class in class_names order: softmax over the last axis "
                              "gives the probabilities"},
        "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))},
        "config": config or {},
        "source": source,
        "twincar_version": __version__,
        **({CALIBRATION: dict(calibration)} if calibration else {}),
    }


def write_model_card(directory: str | Path, card: dict) -> Path:
    """Write ``model_card.json`` (strict JSON) into ``directory``, beside the weights it describes."""
    return write_json(Path(directory) / MODEL_CARD, card)


# -- the timm / Hugging Face hub layout: config.json + model.safetensors (+ README.md) ----------------------
HUB_CONFIG = "config.json"  # timm's model config: architecture, num_classes, label_names, pretrained_cfg
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # the weights timm looks for in a hub folder, first first
HUB_SOURCES = ("local-dir:", "hf-hub:")  # the model sources timm.create_model takes, and load_model too
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
    if len(size) != 3 or size[1] != size[2]:
        raise WeightsError(f"{source}: input_size {list(size)} is not square: TwinCar takes square inputs only")
    mode = pretrained_cfg.get("crop_mode") or "center"
    if mode not in ("center", "squash"):
        raise WeightsError(f"{source}: crop_mode {mode!r} is not supported: TwinCar crops 'center' or 'squash'")
    if pretrained_cfg.get("interpolation", "bilinear") != "bilinear":
        log.warning("%s: trained with %s resizing; TwinCar resizes bilinear (answers may differ slightly)",
                    source, pretrained_cfg["interpolation"])
    crop = float(pretrained_cfg.get("crop_pct") or 0.875)
    image_size = int(size[-1])
    pre = {"image_size": image_size, "resize_mode": "squash" if mode == "squash" else "crop",
           "eval_crop_pct": 1.0 if mode == "squash" else image_size / math.floor(image_size / crop)}
    for key in ("mean", "std"):
        if pretrained_cfg.get(key):
            pre[key] = tuple(float(v) for v in pretrained_cfg[key])
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


def _hub_weights(folder: Path, spec: str) -> Path:
    if not (folder / HUB_CONFIG).is_file():
        raise WeightsError(f"--model {spec}: {folder} has no {HUB_CONFIG}: pass a folder written by "
                           "twincar.export format=hf (or a timm hub model)")
    for name in HUB_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"--model {spec}: {folder} has {HUB_CONFIG} but no {' or '.join(HUB_WEIGHTS)}")


def resolve_model_source(spec: str | Path) -> Path:
    """The weights file a model argument names: a path as it is; ``local-dir:DIR`` the weights of a hub folder
    (``config.json`` + ``model.safetensors``); ``hf-hub:USER/REPO[@REVISION]`` those of a Hugging Face Hub
    repository, downloaded, or with ``HF_HUB_OFFLINE=1`` taken from the local Hugging Face cache only. A folder or
    repository that is not there is one sentence."""
    text = str(spec)
    if text.startswith("local-dir:"):
        folder = Path(text.removeprefix("local-dir:")).expanduser()
        if not folder.is_dir():
            raise WeightsError(f"--model {spec}: no such folder {folder} (export one with twincar.export format=hf)")
        return _hub_weights(folder, text)
    if not text.startswith("hf-hub:"):
        return Path(spec).expanduser()
    repo, _, revision = text.removeprefix("hf-hub:").partition("@")
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError as e:
        raise WeightsError(f"--model {spec} needs huggingface_hub: pip install huggingface_hub") from e
    try:
        folder = Path(snapshot_download(repo, revision=revision or None,
                                        allow_patterns=[HUB_CONFIG, MODEL_CARD, *HUB_WEIGHTS]))
    except Exception as e:  # hub, network and cache errors come in many types
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else \
            "on the Hugging Face Hub or in the local cache"
        raise WeightsError(f"--model {spec}: repository {repo} is not {where}: check the name, or download it "
                           "first (hf download USER/REPO)") from e
    return _hub_weights(folder, text)


@dataclass
class LoadedModel:
    """A model ready for inference with what it needs to be used: its class names and input preprocessing."""

    model: nn.Module
    class_names: list[str]
    preprocess: Preprocess
    architecture: str
    source: Path
    card: dict = field(default_factory=dict)  # the model card or checkpoint hparams it came with
    calibration: dict | None = None  # temperature and unknown threshold (twincar.evaluation.calibration), when fitted


class OnnxModule(nn.Module):
    """An ONNX model run by onnxruntime, callable like the eager network: float (N, 3, S, S) in, logits out.

    onnxruntime (the ``onnx`` extra) is imported here only. CUDA is used when onnxruntime has it and
    ``device`` asks for it; otherwise the CPU.
    """

    def __init__(self, path: str | Path, device: str = "auto"):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise WeightsError(f"{path} is an ONNX model: install the onnx extra (pip install 'twincar[onnx]')") from e
        providers = ["CPUExecutionProvider"]
        if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for a damaged file
            raise WeightsError(f"cannot read ONNX model {path}: {str(e).strip().splitlines()[0]}") from e
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name = inp.name
        side = inp.shape[-1] if len(inp.shape) == 4 else None
        self.image_size: int | None = side if isinstance(side, int) else None  # None: any size
        self.num_outputs: int = out.shape[-1] if isinstance(out.shape[-1], int) else -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(None, {self.input_name: x.detach().float().contiguous().cpu().numpy()})
        return torch.from_numpy(logits).to(x.device)


def read_model_card(weights: Path) -> dict:
    """The ``model_card.json`` beside exported weights, or ``{}`` when there is none."""
    card_path = weights.with_name(MODEL_CARD)
    if not card_path.is_file():
        hub = weights.with_name(HUB_CONFIG)
        if weights.suffix != ".onnx" and hub.is_file():  # a timm hub folder written by another tool
            try:
                config = json.loads(hub.read_text("utf-8"))
            except ValueError as e:
                raise WeightsError(f"{hub} is not valid JSON: {e}") from e
            if isinstance(config, dict) and "architecture" in config:
                return card_from_hub_config(config, hub)
        return {}
    try:
        return read_json_object(card_path, "class_names, preprocess, architecture")
    except ReadError as e:
        raise WeightsError(str(e)) from e


def _check_names(given: list[str] | None, carried: list[str] | None, num_outputs: int, path: Path) -> list[str]:
    """The class names to use: those the file carries, else those given; a mismatch is an error."""
    difference = class_names_difference(carried, given) if carried is not None and given is not None else None
    if difference:
        raise WeightsError(
            f"{path} carries class names that differ from those given by --classes ({difference}): "
            "leave --classes out, or pass the classes the model was trained with"
        )
    names = carried if carried is not None else given
    if names is None:
        raise WeightsError(f"{path} carries no class names: pass --classes classes.txt (or classes=...)")
    if len(names) != num_outputs:
        raise WeightsError(f"the class list has {len(names)} names but {path} has {num_outputs} outputs")
    return list(names)


def _head_outputs(state: dict[str, torch.Tensor], path: Path) -> int:
    heads = [k for k in ("fc.weight", "head.fc.weight", "classifier.weight", "head.weight") if k in state]
    if not heads:
        raise WeightsError(f"{path}: no classifier head found (fc.weight, head.fc.weight, classifier.weight)")
    return int(state[heads[0]].shape[0])


def load_model(
    path: str | Path,
    classes: str | Path | list[str] | None = None,
    *,
    architecture: str | None = None,
    preprocess: Preprocess | None = None,
) -> LoadedModel:
    """The one way a trained model comes in, for predict, eval, explain, export and the demo.

    ``path`` is a TwinCar Lightning ``.ckpt`` (class names and preprocessing inside), exported weights
    (``.pth``/``.safetensors``/``.onnx``, the last run by onnxruntime) with a ``model_card.json`` beside them,
    a timm hub folder or repository (``local-dir:DIR``, ``hf-hub:USER/REPO``: :func:`resolve_model_source`),
    or a bare state dict such as the original TwinCars ``.pth`` (a torchvision resnet50 with a K-way ``fc``),
    which needs ``classes`` and gets the original preprocessing (224x224 squash, ImageNet mean/std) unless
    ``preprocess`` is given.
    Every file is read with ``weights_only=True`` or safetensors: nothing is unpickled.
    """
    path = resolve_model_source(path)
    if not path.is_file():
        raise WeightsError(f"model file {path} does not exist: give the path of a .ckpt, .pth, .safetensors or .onnx"
                           " (or local-dir:DIR, hf-hub:USER/REPO)")
    try:
        given = read_class_names(classes) if isinstance(classes, (str, Path)) else (list(classes) if classes else None)
    except (OSError, ValueError) as e:
        raise WeightsError(str(e)) from e
    card: dict = {}
    if path.suffix == ".onnx":
        model = OnnxModule(path)
        card = read_model_card(path)
        carried = card.get("class_names")
        names = _check_names(given, list(carried) if carried else None, model.num_outputs, path)
        pre = Preprocess.from_dict(card["preprocess"]) if "preprocess" in card else TWINCARS_PREPROCESS
        return LoadedModel(model, names, preprocess or pre, card.get("architecture", "onnx"), path, card,
                           read_calibration(path, card))
    if path.suffix == ".ckpt":
        ckpt = safe_torch_load(path)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise WeightsError(f"{path} is not a Lightning checkpoint (no state_dict)")
        card = dict(ckpt.get("hyper_parameters") or {})
        state = strip_prefix(ckpt["state_dict"], "model.")
        arch = card.get("name", architecture or "resnet50")
        carried = card.get("class_names")
        pre = Preprocess.from_dict(card.get("preprocess"))
    else:
        state = read_state_dict(path)
        card = read_model_card(path)
        arch = card.get("architecture", architecture or "resnet50")
        carried = card.get("class_names")
        pre = Preprocess.from_dict(card["preprocess"]) if "preprocess" in card else TWINCARS_PREPROCESS
    names = _check_names(given, list(carried) if carried else None, _head_outputs(state, path), path)
    return LoadedModel(build_model(arch, len(names), state, path), names, preprocess or pre, arch, path, card,
                       read_calibration(path, card))


CALIBRATION = "calibration"  # the key of the calibration in checkpoint hyper-parameters and model cards


def calibration_sidecar(path: str | Path) -> Path:
    """Where the calibration of a model file without a model card lives: ``NAME.calibration.json`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}.calibration.json")


def read_calibration(path: str | Path, card: dict | None = None) -> dict | None:
    """The calibration a model file carries: in its checkpoint hyper-parameters or model card (``card``), else in
    its sidecar file (:func:`calibration_sidecar`); None when it was never calibrated."""
    if card and isinstance(card.get(CALIBRATION), dict):
        return dict(card[CALIBRATION])
    sidecar = calibration_sidecar(path)
    if not sidecar.is_file():
        return None
    try:
        value = json.loads(sidecar.read_text("utf-8"))
    except ValueError as e:
        raise WeightsError(f"{sidecar} is not valid JSON: {e}; delete it or calibrate the model again") from e
    if not isinstance(value, dict):
        raise WeightsError(f"{sidecar} must hold a JSON object (temperature, score, threshold)")
    return value


def write_calibration(path: str | Path, calibration: dict) -> Path:
    """Store ``calibration`` with the model file at ``path``, atomically, where :func:`read_calibration` finds it:
    a ``.ckpt``'s hyper-parameters (the file is rewritten), the ``model_card.json`` beside exported weights, or
    else a sidecar ``NAME.calibration.json`` (the original TwinCars ``.pth``: the weights file is never touched).
    Returns the file written."""
    path = Path(path).expanduser()
    if path.suffix == ".ckpt":
        ckpt = safe_torch_load(path)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise WeightsError(f"{path} is not a Lightning checkpoint (no state_dict)")
        ckpt.setdefault("hyper_parameters", {})[CALIBRATION] = dict(calibration)
        return save_torch(ckpt, path)
    card = read_model_card(path)
    if card:
        card[CALIBRATION] = dict(calibration)
        return write_model_card(path.parent, card)
    return write_json(calibration_sidecar(path), dict(calibration))


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
