"""The model card: the facts that travel with exported weights (``model_card.json``: architecture, class names,
preprocessing, the input contract, metrics, calibration), and the calibration of a model file without one
(``NAME.calibration.json`` beside it), and the training features' statistics that the feature unknown scores need
(``NAME.unknown.npz`` beside the model file, named and fingerprinted by its calibration).

Torch-free, and the one card reader: the PyTorch loader (:func:`twincar.models.loading.load_model`) and the ONNX
runtime both read cards with :func:`read_model_card`. Calibration is written by
:func:`twincar.models.loading.write_calibration` (a ``.ckpt`` needs torch).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

from twincar.data.classes import class_names_difference, read_class_names
from twincar.data.preprocess import Preprocess
from twincar.files import ReadError, atomic_path, read_json_object, write_json
from twincar.models import WeightsError
from twincar.models.hub import HUB_CONFIG, card_from_hub_config

MODEL_CARD = "model_card.json"  # written beside exported weights: architecture, class names, preprocessing
CALIBRATION = "calibration"  # the key of the calibration in checkpoint hyper-parameters and model cards
UNKNOWN_STATS_SUFFIX = ".unknown.npz"  # the training features' statistics of the feature unknown scores


def _twincar_version() -> str | None:
    """The installed TwinCar's version (the package's metadata, from ``pyproject.toml``), None in a source tree that
    is not installed. Read from the metadata, not ``twincar.__version__``: the models layer imports nothing above it."""
    try:
        return metadata.version("twincar")
    except metadata.PackageNotFoundError:
        return None


def input_contract(preprocess: Preprocess) -> dict:
    """Everything a client needs to turn an image file into the network's input, with no TwinCar code: the
    ``input`` section of the model card. TwinCar's own predict follows exactly these steps (a numpy + PIL
    client that follows them gets the same answers: ``tests/tools/test_deploy.py``)."""
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
        "twincar_version": _twincar_version(),
        **({CALIBRATION: dict(calibration)} if calibration else {}),
    }


def write_model_card(directory: str | Path, card: dict) -> Path:
    """Write ``model_card.json`` (strict JSON) into ``directory``, beside the weights it describes."""
    return write_json(Path(directory) / MODEL_CARD, card)


def read_model_card(weights: str | Path) -> dict:
    """The ``model_card.json`` beside ``weights`` (exported ``.pth``/``.safetensors``/``.onnx``), else for PyTorch
    weights a card made from a timm hub ``config.json`` beside them; ``{}`` when there is neither. A card that is
    not a JSON object is a :class:`~twincar.models.WeightsError` naming the file."""
    weights = Path(weights)
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


def unknown_stats_path(path: str | Path) -> Path:
    """Where the unknown-score statistics of the model file at ``path`` live: ``NAME.unknown.npz`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}{UNKNOWN_STATS_SUFFIX}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_unknown_stats(path: str | Path, arrays: dict[str, np.ndarray]) -> dict:
    """Write the unknown-score statistics (:meth:`twincar.inference.features.FeatureStats.arrays`: plain arrays) of
    the model file at ``path`` beside it (:func:`unknown_stats_path`, atomically, an uncompressed ``.npz``); returns
    the calibration's ``features`` entry that names and fingerprints it (file name, SHA-256, sizes), so that a file
    of another model put in its place is refused."""
    target = unknown_stats_path(path)
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    means = arrays["means"]
    return {"file": target.name, "sha256": _sha256(target), "classes": int(means.shape[0]), "dim": int(means.shape[1]),
            "knn_bank": int(len(arrays["bank"])) if "bank" in arrays else 0, "knn_k": int(arrays["k"])}


def read_unknown_stats(path: str | Path, calibration: dict | None, num_classes: int | None = None
                       ) -> dict[str, np.ndarray] | None:
    """The arrays of the unknown-score statistics the ``calibration`` of the model file at ``path`` names (None when
    it names none), read without unpickling. A missing file, one whose fingerprint is not the one recorded (a file
    of another model), or one fitted for another number of classes than ``num_classes`` is one sentence."""
    entry = (calibration or {}).get("features")
    if not entry:
        return None
    target = Path(path).with_name(str(entry["file"]))
    again = "python -m twincar.calibrate ckpt=MODEL fits them again"
    if not target.is_file():
        raise WeightsError(f"{target} is missing: the calibration of {Path(path).name} names it (its unknown-score "
                           f"statistics); copy it beside the model, or {again}")
    if entry.get("sha256") and _sha256(target) != entry["sha256"]:
        raise WeightsError(f"{target} is not the unknown-score statistics file {Path(path).name} was calibrated with "
                           f"(another model's, or changed since): {again}")
    try:
        with np.load(target, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as e:
        raise WeightsError(f"{target} cannot be read as unknown-score statistics ({e}): {again}") from e
    means = arrays.get("means")
    if num_classes is not None and means is not None and means.shape[0] != num_classes:
        raise WeightsError(f"{target} holds statistics of {means.shape[0]} classes but {Path(path).name} has "
                           f"{num_classes}: they were fitted for another model; {again}")
    return arrays


def model_class_names(path: Path, carried: Sequence[str] | None, classes: str | Path | Sequence[str] | None,
                      num_outputs: int | None) -> list[str]:
    """The class names of the model at ``path``: those it carries, else ``classes`` (a ``classes.txt`` path or a
    list, as ``--classes`` gives it). Names that differ from the carried ones, none at all, or a count other than
    the network's ``num_outputs`` (None: unknown) is one sentence naming the file."""
    try:
        given = read_class_names(classes) if isinstance(classes, (str, Path)) else (list(classes) if classes else None)
    except (OSError, ValueError) as e:
        raise WeightsError(str(e)) from e
    carried = list(carried) if carried else None
    difference = class_names_difference(carried, given) if carried is not None and given is not None else None
    if difference:
        raise WeightsError(f"{path} carries class names that differ from those given by --classes ({difference}): "
                           "leave --classes out, or pass the classes the model was trained with")
    names = carried if carried is not None else given
    if names is None:
        raise WeightsError(f"{path} carries no class names: pass --classes classes.txt (or classes=...)")
    if num_outputs is not None and len(names) != num_outputs:
        raise WeightsError(f"the class list has {len(names)} names but {path} has {num_outputs} outputs")
    return names
