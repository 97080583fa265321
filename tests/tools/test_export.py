"""Export: weights + model_card.json in three formats, read back by the Predictor with the same answers."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_NAMES, run_cli
from twincar import Predictor
from twincar.errors import TwinCarError
from twincar.export import ExportError, export_model
from twincar.models.card import MODEL_CARD
from twincar.models.loading import load_model


def test_converting_exported_weights_to_safetensors_keeps_card_and_answers(tiny_export, car_images, tmp_path):
    weights = export_model(tiny_export, "safetensors", tmp_path / "st")
    assert weights == tmp_path / "st" / "model.safetensors"
    card = json.loads((tmp_path / "st" / MODEL_CARD).read_text())
    assert card["class_names"] == TINY_NAMES and card["architecture"] == "resnet18"
    assert card["preprocess"]["image_size"] == 64 and card["preprocess"]["resize_mode"] == "crop"
    assert set(load_file(weights)) == set(torch.load(tiny_export, weights_only=True))
    a = Predictor.load(tiny_export, device="cpu").predict(car_images, topk=6)
    b = Predictor.load(weights, device="cpu").predict(car_images, topk=6)
    for x, y in zip(a, b, strict=True):
        assert x.name == y.name and dict(x.topk) == pytest.approx(dict(y.topk), abs=1e-6)


def test_unknown_format_is_one_sentence(tiny_export, tmp_path):
    with pytest.raises(ExportError, match="format=tflite is not one of pth, safetensors, onnx"):
        export_model(tiny_export, "tflite", tmp_path)


@pytest.mark.slow
def test_export_round_trips_in_all_three_formats(trained_run, data_dir, tmp_path):
    """From a training run's checkpoint: pth, safetensors and a single-file ONNX model (dynamic batch, opset >= 17)
    that onnxruntime runs within 1e-4 of eager PyTorch; each predicts what the checkpoint predicts."""
    import onnx

    ckpt = trained_run / "checkpoints" / "last.ckpt"
    images = sorted(data_dir.glob("synthetic/*/cars_test/*.jpg"))[:5]
    reference = Predictor.load(ckpt, device="cpu").predict(images, topk=3)
    run_metrics = json.loads((trained_run / "metrics.json").read_text())
    for fmt in ("pth", "safetensors", "onnx"):
        weights = export_model(ckpt, fmt, tmp_path / fmt)
        assert sorted(p.name for p in (tmp_path / fmt).iterdir()) == sorted([weights.name, MODEL_CARD])
        card = json.loads((tmp_path / fmt / MODEL_CARD).read_text())
        assert card["class_names"] == (trained_run / "classes.txt").read_text().splitlines()
        assert card["metrics"]["val/acc"] == pytest.approx(run_metrics["val/acc"]) and card["source"] == "last.ckpt"
        got = Predictor.load(weights, device="cpu").predict(images, topk=3)
        for r, g in zip(reference, got, strict=True):
            assert r.name == g.name and dict(r.topk) == pytest.approx(dict(g.topk), abs=1e-4)
    model = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch dimension
    session = Predictor.load(tmp_path / "onnx" / "model.onnx", device="cpu").engine.session
    eager = load_model(ckpt).model
    x = torch.randn(5, 3, 64, 64)  # a batch size the export never saw
    with torch.inference_mode():
        onnx_logits, onnx_features = session.run(["logits", "features"], {session.get_inputs()[0].name: x.numpy()})
        np.testing.assert_allclose(onnx_logits, eager(x).numpy(), atol=1e-4, rtol=0)
        eager_features = eager.forward_head(eager.forward_features(x), pre_logits=True)
        np.testing.assert_allclose(onnx_features, eager_features.numpy(), atol=1e-4, rtol=0)
    with pytest.raises(TwinCarError, match=r"model\.onnx is an ONNX model: Predictor\.load runs it"):
        load_model(tmp_path / "onnx" / "model.onnx")
    # the demo answers from the ONNX model too, and says why it shows no Grad-CAM for it
    from twincar.demo import Answerer

    make, *_, overlay, message = Answerer(Predictor.load(tmp_path / "onnx" / "model.onnx"))(str(images[0]), True)
    assert make == reference[0].make and overlay is None and "Grad-CAM needs a PyTorch model" in message


@pytest.mark.slow
def test_export_cli_writes_into_out_and_says_what_is_missing(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    proc = run_cli("twincar.export", f"ckpt={ckpt}", "format=pth", f"out={tmp_path / 'exp'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = load_model(tmp_path / "exp" / "model.pth")
    assert loaded.architecture == "resnet18" and loaded.preprocess.image_size == 64
    assert list((tmp_path / "outputs" / "exports").glob("*/export.log"))  # the export's own run record
    proc = run_cli("twincar.export", f"ckpt={tmp_path / 'nope.ckpt'}", cwd=tmp_path)
    said = proc.stdout + proc.stderr  # Hydra logs to the console and to export.log
    assert proc.returncode == 1 and "nope.ckpt does not exist" in said and "Traceback" not in said


def test_int8_export_needs_onnx_and_int8_images(tiny_export, tmp_path):
    with pytest.raises(ExportError, match="quantize=int8 needs format=onnx"):
        export_model(tiny_export, "pth", tmp_path, quantize="int8", int8_images=tmp_path)
    with pytest.raises(ExportError, match="quantize=int8 needs int8_images=PATH"):
        export_model(tiny_export, "onnx", tmp_path, quantize="int8")
    with pytest.raises(ExportError, match="quantize=int4 is not one of int8"):
        export_model(tiny_export, "onnx", tmp_path, quantize="int4", int8_images=tmp_path)
    with pytest.raises(ExportError, match=r"int8_images=\S*nowhere: no such file or folder"):
        export_model(tiny_export, "onnx", tmp_path / "out", quantize="int8", int8_images=tmp_path / "nowhere")


def test_the_renamed_int8_options_are_one_sentence_naming_the_new_ones(monkeypatch, caplog):
    from twincar.export import main

    for old, new in (("calibration=imgs", "use int8_images=imgs"), ("calibration_images=16", "use int8_count=16")):
        monkeypatch.setattr(sys, "argv", ["twincar-export", "ckpt=x.ckpt", "format=onnx", "quantize=int8", old])
        caplog.clear()
        with pytest.raises(SystemExit) as exit_:
            main()  # the check runs before Hydra composes anything
        said = [r.getMessage() for r in caplog.records]
        assert exit_.value.code == 1 and len(said) == 1 and "Traceback" not in said[0], said
        assert f"{old.split('=')[0]}= was renamed" in said[0] and new in said[0] and "\n" not in said[0], said


@pytest.mark.slow
def test_int8_export_is_quantised_recorded_and_predicts_like_fp32(tiny_export, small_root, car_images, tmp_path):
    import onnx

    weights = export_model(tiny_export, "onnx", tmp_path / "q", quantize="int8",
                           int8_images=small_root / "cars_train", int8_count=16)
    assert weights == tmp_path / "q" / "model.int8.onnx" and not (tmp_path / "q" / "model.onnx").exists()
    graph = onnx.load(str(weights)).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) >= 10  # every conv's input is quantised
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)  # int8 weights
    q = json.loads((tmp_path / "q" / MODEL_CARD).read_text())["quantization"]
    n_train = len(list((small_root / "cars_train").glob("*.jpg")))
    assert q["type"] == "int8" and q["images"] == 16
    assert q["agreement_images"] == min(128, n_train - 16)
    int8 = Predictor.load(weights, device="cpu")
    # the recorded agreement counts the held-out images (all but the 16 quantised on) whose top-1 the int8
    # model shares with fp32: at most the count over every image, and at least that count minus 16
    train_images = sorted((small_root / "cars_train").glob("*.jpg"))
    fp32_top1 = [r.label for r in Predictor.load(tiny_export, device="cpu", precision="fp32").predict(train_images)]
    same_all = sum(a == r.label for a, r in zip(fp32_top1, int8.predict(train_images), strict=True))
    same_held_out = q["top1_agreement_with_fp32"] * q["agreement_images"]
    assert same_held_out == pytest.approx(round(same_held_out), abs=0.01)  # a count (rounded to 4 decimals)
    assert same_all - 16 <= round(same_held_out) <= same_all
    assert int8.class_names == TINY_NAMES and int8.preprocess.image_size == 64
    fp32 = Predictor.load(tiny_export, device="cpu", precision="fp32")  # what the fp32 ONNX model computes, 1e-4
    batch = np.stack([fp32.prepare(p) for p in car_images])
    a, b = torch.from_numpy(fp32.logits(batch)), torch.from_numpy(int8.logits(batch))
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.9  # the same function, rounded
