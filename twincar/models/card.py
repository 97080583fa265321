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
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

from twincar.data.classes import class_names_difference, name_key, read_class_names
from twincar.data.preprocess import RESIZE_MODES, Preprocess
from twincar.files import ReadError, atomic_path, read_json_object, write_json
from twincar.models import WeightsError
from twincar.models.hub import HUB_CONFIG, card_from_hub_config

log = logging.getLogger(__name__)

MODEL_CARD = "model_card.json"  # written beside exported weights: architecture, class names, preprocessing
CALIBRATION = "calibration"  # the key of the calibration in checkpoint hyper-parameters and model cards
FINGERPRINT = "fingerprint"  # the key of the weights' fingerprint in cards and every artefact derived from a model
IMAGE_SIZE_BOUNDS = (8, 2048)  # the input sides a card may name (pixels): 100000 would allocate tens of GB
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
    fingerprint: str | None = None,
) -> dict:
    """What a consumer of exported weights needs (class names, preprocessing, architecture) and what the run was
    (metrics such as ``test/acc``, config group choices and overrides), its ``calibration`` when fitted, and the
    ``fingerprint`` of the weights it describes (:func:`twincar.models.checkpoint.state_fingerprint`)."""
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
        **({FINGERPRINT: fingerprint} if fingerprint else {}),
    }


def write_model_card(directory: str | Path, card: dict) -> Path:
    """Write ``model_card.json`` (strict JSON) into ``directory``, beside the weights it describes."""
    return write_json(Path(directory) / MODEL_CARD, card)


def read_model_card(weights: str | Path, scores: Sequence[str] | None = None) -> dict:
    """The ``model_card.json`` beside ``weights`` (exported ``.pth``/``.safetensors``/``.onnx``), else for PyTorch
    weights a card made from a timm hub ``config.json`` beside them; ``{}`` when there is neither. A card that is
    not a JSON object, or whose facts do not hold (:func:`check_model_card`; ``scores``: the known unknown scores),
    is a :class:`~twincar.models.WeightsError` naming the file and the field."""
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
                return check_model_card(card_from_hub_config(config, hub), hub, scores)
        return {}
    try:
        card = read_json_object(card_path, "class_names, preprocess, architecture")
    except ReadError as e:
        raise WeightsError(str(e)) from e
    return check_model_card(card, card_path, scores)


def calibration_sidecar(path: str | Path) -> Path:
    """Where the calibration of a model file without a model card lives: ``NAME.calibration.json`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}.calibration.json")


def read_calibration(path: str | Path, card: dict | None = None, scores: Sequence[str] | None = None,
                     fingerprint: str | None = None) -> dict | None:
    """The calibration a model file carries: in its checkpoint hyper-parameters or model card (``card``, already
    checked), else in its sidecar file (:func:`calibration_sidecar`, checked here as a card's calibration is, and
    refused when it records another ``fingerprint`` than the model's); None when it was never calibrated."""
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
    check_calibration_fields(value, sidecar, scores)
    check_fingerprint(value.get(FINGERPRINT), fingerprint, sidecar,
                      f"delete it and run python -m twincar.calibrate ckpt={path}")
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


# -- the one validator: every fact a card (or a checkpoint's hyper-parameters, or a sidecar) carries -------------
def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rgb(value: object, positive: bool = False) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 3 and all(_finite(v) for v in value)
            and (not positive or all(v > 0 for v in value)))


def _image_size(value: object) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)
            and IMAGE_SIZE_BOUNDS[0] <= value <= IMAGE_SIZE_BOUNDS[1])


Field = tuple[Callable[[object], bool], str]  # (the test a value passes, what the value must be)

# The fields of each section and what each must be: a consumer reads nothing these tests did not pass. New fields
# (of a calibration, say) are one row here.
PREPROCESS_FIELDS: dict[str, Field] = {
    "image_size": (_image_size, f"a whole number of pixels from {IMAGE_SIZE_BOUNDS[0]} to {IMAGE_SIZE_BOUNDS[1]}"),
    "eval_crop_pct": (lambda v: _finite(v) and 0 < v <= 1, "a number in (0, 1]"),
    "mean": (_rgb, "3 finite numbers (R, G, B)"),
    "std": (lambda v: _rgb(v, positive=True), "3 finite numbers above 0 (R, G, B)"),
    "resize_mode": (lambda v: v in RESIZE_MODES, f"one of {', '.join(RESIZE_MODES)}"),
}
CALIBRATION_FIELDS: dict[str, Field] = {
    "temperature": (lambda v: _finite(v) and v > 0, "a finite number above 0"),
    "threshold": (lambda v: v is None or _finite(v), "a finite number (or null: no unknown answer)"),
    "score": (lambda v: isinstance(v, str), "the name of an unknown score"),
    "thresholds": (lambda v: v is None or (isinstance(v, dict) and all(_finite(x) for x in v.values())),
                   "an object of finite thresholds, one per unknown score"),
    "tta": (lambda v: v in (None, "none", "flip"), "none or flip"),
    FINGERPRINT: (lambda v: v is None or isinstance(v, str), "the fingerprint of the model's weights"),
}


def _refuse(source: object, where: str, value: object, what: str) -> WeightsError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return WeightsError(f"{source}: {where} is {shown} but must be {what}: export or calibrate the model again, or "
                        "correct the file")


def _check_fields(values: object, fields: dict[str, Field], source: object, section: str,
                  unknown_allowed: bool) -> None:
    if not isinstance(values, dict):
        raise WeightsError(f"{source}: {section} must be a JSON object ({', '.join(fields)}), got {values!r}")
    for key, value in values.items():
        if key not in fields:
            if unknown_allowed:
                continue
            raise WeightsError(f"{source}: {section}.{key} is not a {section} field (those are "
                               f"{', '.join(fields)})")
        test, what = fields[key]
        if not test(value):
            raise _refuse(source, f"{section}.{key}", value, what)


def check_calibration_fields(calibration: object, source: object, scores: Sequence[str] | None = None) -> dict:
    """A calibration (a card's, a checkpoint's or a sidecar's) whose every field passes :data:`CALIBRATION_FIELDS`,
    and whose ``score`` is one of ``scores`` when given; else one sentence naming ``source`` and the field."""
    _check_fields(calibration, CALIBRATION_FIELDS, source, CALIBRATION, unknown_allowed=True)
    score = calibration.get("score")
    if scores is not None and score is not None and score not in scores:
        raise _refuse(source, f"{CALIBRATION}.score", score, f"one of {', '.join(scores)}")
    return dict(calibration)


def check_model_card(card: dict, source: object, scores: Sequence[str] | None = None) -> dict:
    """``card`` (a ``model_card.json``, a hub ``config.json``'s card or a checkpoint's hyper-parameters) when every
    fact a consumer reads from it holds: the class names (a list of names, no class twice by
    :func:`~twincar.data.classes.name_key`, as many as ``num_classes``), the input (:data:`PREPROCESS_FIELDS`) and
    the calibration (:func:`check_calibration_fields`). Else one sentence naming ``source`` and the field. The one
    validator: the PyTorch loader, the ONNX runtime (so the demo, the Space and the server) and hub import use it."""
    names = card.get("class_names")
    if names is not None:
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise _refuse(source, "class_names", names, "a list of class names")
        seen: dict[str, int] = {}
        for i, name in enumerate(names):
            if (first := seen.setdefault(name_key(name), i)) != i:
                raise WeightsError(f"{source}: class_names lists {name!r} twice (labels {first} and {i}): every "
                                   "class needs its own name")
        count = card.get("num_classes")
        if count is not None and count != len(names):
            raise _refuse(source, "num_classes", count, f"the number of class_names ({len(names)})")
    if card.get("preprocess") is not None:
        _check_fields(card["preprocess"], PREPROCESS_FIELDS, source, "preprocess", unknown_allowed=False)
    if card.get(CALIBRATION) is not None:
        check_calibration_fields(card[CALIBRATION], source, scores)
    if card.get(FINGERPRINT) is not None and not isinstance(card[FINGERPRINT], str):
        raise _refuse(source, FINGERPRINT, card[FINGERPRINT], "the fingerprint of the model's weights")
    return card


# -- fingerprints: which model an artefact belongs to -----------------------------------------------------------
def fingerprint_of(chunks: Iterable[tuple[str, bytes | memoryview]]) -> str:
    """A short hash (16 hex digits, BLAKE2b) of named byte chunks: a model's fingerprint is that of its tensors in
    name order (:func:`twincar.models.checkpoint.state_fingerprint`), the same whatever file holds them."""
    h = hashlib.blake2b(digest_size=8)
    for name, data in chunks:
        h.update(name.encode())
        h.update(b"\0")
        h.update(data)
    return h.hexdigest()


def file_fingerprint(path: str | Path) -> str:
    """The fingerprint of a file's bytes (an ONNX model whose card records none)."""
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check_fingerprint(recorded: object, model: str | None, artefact: object, fix: str) -> None:
    """An artefact (a calibration, an index, a predict job) that records another model's fingerprint than
    ``model`` is one sentence naming it and what to do (``fix``); one written before fingerprints (``recorded``
    None) is used with a one-line warning."""
    if model is None:
        return
    if recorded is None:
        log.warning("%s records no model fingerprint (written before fingerprints): it is assumed to be this "
                    "model's (%s)", artefact, fix)
    elif recorded != model:
        raise WeightsError(f"{artefact} belongs to another model (fingerprint {recorded}; this model's is {model}): "
                           f"{fix}")
