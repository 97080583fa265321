"""Facts that travel with a model are checked wherever they are read (issue 26): the probes of a careless or hostile
user, each with its exact input and the one sentence (or the right answer) it gets. Listed in docs/reliability.md."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY_NAMES
from twincar.errors import TwinCarError
from twincar.inference.predictor import Predictor


def tiny_onnx(folder: Path) -> Path:
    """A tiny ONNX classifier (global average pool + a 3 -> 6 Gemm over 64 px inputs) built with onnx.helper in
    milliseconds, with a model card beside it as export writes one: the ONNX runtime's own reading of the card."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from twincar.data.preprocess import Preprocess
    from twincar.models.card import build_model_card, write_model_card

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1)],
        "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 6])],
        [numpy_helper.from_array(rng.normal(size=(6, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(np.zeros(6, np.float32), "b")])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), path)
    write_model_card(folder, build_model_card(TINY_NAMES, Preprocess(image_size=64), "tiny",
                                              calibration={"temperature": 1.5, "score": "max_logit", "threshold": 0.1}))
    return path


def _copy_export(tiny_export: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("model.pth", "model_card.json"):
        shutil.copy(tiny_export.with_name(name), folder / name)
    return folder / "model.pth"


def _set(card: dict, dotted: str, value) -> None:
    *parents, key = dotted.split(".")
    for p in parents:
        card = card.setdefault(p, {})
    card[key] = value


# (probe, engine, field, value, the sentence it gets): a card with one field changed, read by Predictor.load
CARD_PROBES = [
    ("temperature -1 (ranking inverted)", "onnx", "calibration.temperature", -1,
     r"calibration.temperature is -1 but must be a finite number above 0"),
    ("temperature NaN (class 0 for every image)", "onnx", "calibration.temperature", math.nan,
     r"calibration.temperature is nan but must be a finite number above 0"),
    ("temperature 0 (read as 1)", "onnx", "calibration.temperature", 0, r"calibration.temperature is 0 but"),
    ("temperature -1, PyTorch", "torch", "calibration.temperature", -1, r"calibration.temperature is -1 but"),
    ("threshold NaN (every car unknown)", "onnx", "calibration.threshold", math.nan,
     r"calibration.threshold is nan but must be a finite number"),
    ("threshold NaN, PyTorch", "torch", "calibration.threshold", math.nan, r"calibration.threshold is nan but"),
    ("threshold 'high'", "onnx", "calibration.threshold", "high", r"calibration.threshold is 'high' but"),
    ("threshold 'high', PyTorch", "torch", "calibration.threshold", "high", r"calibration.threshold is 'high' but"),
    ("a score's threshold NaN", "onnx", "calibration.thresholds", {"max_logit": math.nan},
     r"calibration.thresholds is \{'max_logit': nan\} but must be an object of finite thresholds"),
    ("unknown score name", "torch", "calibration.score", "magic",
     r"calibration.score is 'magic' but must be one of max_logit"),
    ("eval_crop_pct 0", "onnx", "preprocess.eval_crop_pct", 0, r"preprocess.eval_crop_pct is 0 but must be a number"),
    ("mean of length 2", "onnx", "preprocess.mean", [0.5, 0.5], r"preprocess.mean is \[0.5, 0.5\] but must be 3"),
    ("std 0", "torch", "preprocess.std", [0.2, 0, 0.2], r"preprocess.std is \[0.2, 0, 0.2\] but must be 3 finite"),
    ("image_size 100000 (52 GB)", "torch", "preprocess.image_size", 100000,
     r"preprocess.image_size is 100000 but must be a whole number of pixels from 8 to 2048"),
    ("unknown resize mode", "onnx", "preprocess.resize_mode", "stretch", r"preprocess.resize_mode is 'stretch' but"),
    ("duplicate class name", "torch", "class_names", [*TINY_NAMES[:5], "audi s4  sedan 2012"],
     r"class_names lists 'audi s4  sedan 2012' twice \(labels 0 and 5\)"),
    ("card of other weights", "torch", "fingerprint", "0123456789abcdef",
     r"model_card.json belongs to another model \(fingerprint 0123456789abcdef; this model's is [0-9a-f]{16}\)"),
]


@pytest.mark.parametrize(("probe", "engine", "field", "value", "sentence"), CARD_PROBES,
                         ids=[p[0] for p in CARD_PROBES])
def test_a_damaged_card_is_one_sentence_naming_the_file_and_the_field(tiny_export, tmp_path, probe, engine, field,
                                                                      value, sentence):
    model = tiny_onnx(tmp_path) if engine == "onnx" else _copy_export(tiny_export, tmp_path)
    card_path = model.with_name("model_card.json")
    card = json.loads(card_path.read_text())
    _set(card, field, value)
    card_path.write_text(json.dumps(card))  # NaN as JSON's careless writers write it
    with pytest.raises(TwinCarError, match=rf"^{card_path}: {sentence}" if field != "fingerprint" else sentence):
        Predictor.load(model, device="cpu")


HUB_PROBES = [
    ("duplicate label_names", "label_names", [*TINY_NAMES[:5], TINY_NAMES[0]],
     rf"class_names lists {TINY_NAMES[0]!r} twice \(labels 0 and 5\)"),
    ("input_size [3, 0, 0]", "pretrained_cfg.input_size", [3, 0, 0],
     r"pretrained_cfg.input_size is \[3, 0, 0\] but must be \[3, SIZE, SIZE\]"),
    ("mean of length 2", "pretrained_cfg.mean", [0.5, 0.5], r"preprocess.mean is \[0.5, 0.5\] but must be 3"),
    ("crop_pct 2", "pretrained_cfg.crop_pct", 2, r"pretrained_cfg.crop_pct is 2 but must be a number in \(0, 1\]"),
]


@pytest.mark.parametrize(("probe", "field", "value", "sentence"), HUB_PROBES, ids=[p[0] for p in HUB_PROBES])
def test_a_damaged_hub_config_is_one_sentence(tiny_export, tmp_path, probe, field, value, sentence):
    """A timm hub folder written by another tool (no model_card.json): its config.json is checked as a card is."""
    shutil.copy(tiny_export, tmp_path / "model.pth")
    config = {"architecture": "resnet18", "num_classes": 6, "label_names": list(TINY_NAMES),
              "pretrained_cfg": {"input_size": [3, 64, 64], "crop_pct": 0.875, "mean": [0.5, 0.5, 0.5],
                                 "std": [0.25, 0.25, 0.25]}}
    _set(config, field, value)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TwinCarError, match=rf"^{tmp_path / 'config.json'}: {sentence}"):
        Predictor.load(tmp_path / "model.pth", device="cpu")


@pytest.mark.slow  # a few seconds: several loads and an export (the fast set keeps the probe table)
def test_a_sidecar_calibration_is_checked_and_knows_its_model(tiny_export, tmp_path, caplog):
    from twincar.models.card import calibration_sidecar
    from twincar.models.loading import write_calibration

    model = tmp_path / "bare.pth"
    shutil.copy(tiny_export, model)  # a bare state dict: its calibration lives in bare.calibration.json
    sidecar = calibration_sidecar(model)
    sidecar.write_text(json.dumps({"temperature": -2.0}))
    with pytest.raises(TwinCarError, match=rf"^{sidecar}: calibration.temperature is -2.0 but"):
        Predictor.load(model, TINY_NAMES, architecture="resnet18", device="cpu")
    sidecar.write_text(json.dumps({"temperature": 2.0, "threshold": 1.0}))  # written before fingerprints: a warning
    with caplog.at_level(logging.WARNING):
        assert Predictor.load(model, TINY_NAMES, architecture="resnet18", device="cpu").temperature == 2.0
    assert "records no model fingerprint" in caplog.text
    assert write_calibration(model, {"temperature": 2.0, "threshold": 1.0}) == sidecar
    p = Predictor.load(model, TINY_NAMES, architecture="resnet18", device="cpu")
    assert json.loads(sidecar.read_text())["fingerprint"] == p.fingerprint
    sidecar.write_text(json.dumps({"temperature": 2.0, "fingerprint": "0123456789abcdef"}))
    with pytest.raises(TwinCarError, match=rf"^{sidecar} belongs to another model"):
        Predictor.load(model, TINY_NAMES, architecture="resnet18", device="cpu")


def test_the_space_refuses_a_damaged_card(tmp_path):
    """The Space (space/app.py) loads its model.onnx through the same runtime: a damaged card stops it."""
    import importlib.util

    model = tiny_onnx(tmp_path)
    card = json.loads(model.with_name("model_card.json").read_text())
    card["calibration"]["temperature"] = -1
    model.with_name("model_card.json").write_text(json.dumps(card))
    spec = importlib.util.spec_from_file_location("space_app", Path(__file__).parents[2] / "space" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    with pytest.raises(TwinCarError, match="calibration.temperature is -1 but must be a finite number above 0"):
        app.load_predictor(tmp_path)


@pytest.mark.slow  # a few seconds: several loads and an export (the fast set keeps the probe table)
def test_a_fingerprint_is_the_weights_whatever_file_holds_them(tiny_export, tmp_path):
    from twincar.export import export_model

    p = Predictor.load(tiny_export, device="cpu")
    out = export_model(tiny_export, "safetensors", tmp_path / "st")
    assert json.loads(out.with_name("model_card.json").read_text())["fingerprint"] == p.fingerprint
    assert Predictor.load(out, device="cpu").fingerprint == p.fingerprint
    assert len(p.fingerprint) == 16 and Predictor.load(tiny_onnx(tmp_path / "onnx")).fingerprint != p.fingerprint
