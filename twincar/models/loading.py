"""The one way a trained model comes in (:func:`load_model`), with what it needs to be used: class names,
preprocessing, calibration. Always safely: ``weights_only`` torch loads and safetensors, nothing unpickled.

A model source is a local file (``.ckpt``, ``.pth``/``.safetensors`` with a ``model_card.json`` beside them, a bare
state dict, or ``.onnx``, run by onnxruntime, imported only then), a hub folder (``local-dir:DIR``) or a Hugging
Face Hub repository (``hf-hub:USER/REPO``). :func:`write_calibration` stores a fitted calibration where
:func:`load_model` finds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from twincar.data.preprocess import TWINCARS_PREPROCESS, Preprocess
from twincar.files import write_json
from twincar.models import WeightsError
from twincar.models.card import (
    CALIBRATION,
    FINGERPRINT,
    MODEL_CARD,
    UNKNOWN_STATS_SUFFIX,
    calibration_sidecar,
    check_fingerprint,
    check_model_card,
    model_class_names,
    read_calibration,
    read_model_card,
    write_model_card,
)
from twincar.models.checkpoint import (
    read_state_dict,
    safe_torch_load,
    save_torch,
    state_fingerprint,
    strip_prefix,
)
from twincar.models.factory import build_model
from twincar.models.hub import HUB_CONFIG, HUB_WEIGHTS


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
    fingerprint: str | None = None  # the weights' fingerprint (state_fingerprint): which model its artefacts are


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
        patterns = [HUB_CONFIG, MODEL_CARD, *HUB_WEIGHTS, f"*{UNKNOWN_STATS_SUFFIX}"]
        folder = Path(snapshot_download(repo, revision=revision or None, allow_patterns=patterns))
    except Exception as e:  # hub, network and cache errors come in many types
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else \
            "on the Hugging Face Hub or in the local cache"
        raise WeightsError(f"--model {spec}: repository {repo} is not {where}: check the name, or download it "
                           "first (hf download USER/REPO)") from e
    return _hub_weights(folder, text)


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
    scores: Sequence[str] | None = None,
) -> LoadedModel:
    """The one way PyTorch weights come in, for predict, eval, explain, export and the demo (an ``.onnx`` model is
    :meth:`~twincar.inference.predictor.Predictor.load`'s, run by its onnxruntime engine).

    ``path`` is a TwinCar Lightning ``.ckpt`` (class names and preprocessing inside), exported weights
    (``.pth``/``.safetensors``) with a ``model_card.json`` beside them,
    a timm hub folder or repository (``local-dir:DIR``, ``hf-hub:USER/REPO``: :func:`resolve_model_source`),
    or a bare state dict such as the original TwinCars ``.pth`` (a torchvision resnet50 with a K-way ``fc``),
    which needs ``classes`` and gets the original preprocessing (224x224 squash, ImageNet mean/std) unless
    ``preprocess`` is given.
    Every file is read with ``weights_only=True`` or safetensors: nothing is unpickled. Every fact the file carries
    is checked (:func:`~twincar.models.card.check_model_card`; ``scores``: the known unknown scores), and a card or
    calibration that records another model's fingerprint is refused.
    """
    path = resolve_model_source(path)
    if not path.is_file():
        raise WeightsError(f"model file {path} does not exist: give the path of a .ckpt, .pth or .safetensors"
                           " (or local-dir:DIR, hf-hub:USER/REPO)")
    card: dict = {}
    if path.suffix == ".onnx":
        raise WeightsError(f"{path} is an ONNX model: Predictor.load runs it (with onnxruntime); this needs PyTorch "
                           "weights (.ckpt, .pth, .safetensors)")
    if path.suffix == ".ckpt":
        ckpt = safe_torch_load(path)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise WeightsError(f"{path} is not a Lightning checkpoint (no state_dict)")
        card = check_model_card(dict(ckpt.get("hyper_parameters") or {}), path, scores)
        state = strip_prefix(ckpt["state_dict"], "model.")
        arch = card.get("name", architecture or "resnet50")
        carried = card.get("class_names")
        pre = Preprocess.from_dict(card.get("preprocess"))
    else:
        state = read_state_dict(path)
        card = read_model_card(path, scores)
        arch = card.get("architecture", architecture or "resnet50")
        carried = card.get("class_names")
        pre = Preprocess.from_dict(card["preprocess"]) if "preprocess" in card else TWINCARS_PREPROCESS
    names = model_class_names(path, carried, classes, _head_outputs(state, path))
    fingerprint = state_fingerprint(state)
    if path.suffix != ".ckpt" and card.get(FINGERPRINT):
        check_fingerprint(card[FINGERPRINT], fingerprint, path.with_name(MODEL_CARD),
                          f"it does not describe {path.name}: export the model again")
    calibration = read_calibration(path, card, scores, fingerprint)
    if calibration and card.get(CALIBRATION) and calibration.get(FINGERPRINT):  # a card's own, when it records one
        check_fingerprint(calibration[FINGERPRINT], fingerprint, f"the calibration in {path}",
                          f"calibrate it again: python -m twincar.calibrate ckpt={path}")
    return LoadedModel(build_model(arch, len(names), state, path), names, preprocess or pre, arch, path, card,
                       calibration, fingerprint)


def write_calibration(path: str | Path, calibration: dict, fingerprint: str | None = None) -> Path:
    """Store ``calibration`` with the model file at ``path``, atomically, where :func:`read_calibration` finds it:
    a ``.ckpt``'s hyper-parameters (the file is rewritten), the ``model_card.json`` beside exported weights, or
    else a sidecar ``NAME.calibration.json`` (the original TwinCars ``.pth``: the weights file is never touched).
    Returns the file written. ``fingerprint``: the model's (:func:`state_fingerprint`), recorded with the
    calibration (read from the file when not given). (The training features' statistics a calibration names are
    written beside the model first: :func:`~twincar.models.card.write_unknown_stats`.)"""
    path = Path(path).expanduser()
    if path.suffix == ".ckpt":
        ckpt = safe_torch_load(path)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise WeightsError(f"{path} is not a Lightning checkpoint (no state_dict)")
        own = fingerprint or state_fingerprint(strip_prefix(ckpt["state_dict"], "model."))
        calibration = {**calibration, FINGERPRINT: own}
        ckpt.setdefault("hyper_parameters", {})[CALIBRATION] = calibration
        return save_torch(ckpt, path)
    calibration = {**calibration, FINGERPRINT: fingerprint or state_fingerprint(read_state_dict(path))}
    card = read_model_card(path)
    if card:
        card[CALIBRATION] = calibration
        return write_model_card(path.parent, card)
    return write_json(calibration_sidecar(path), calibration)

