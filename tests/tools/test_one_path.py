"""One evaluation path: eval's predictions.csv, the predict CSV, ``Predictor.predict`` and the demo's answer give
the same top-1 and the same probabilities for the same model file and images, with and without flip TTA."""

from __future__ import annotations

import csv

import pytest

from tests.trained import compose, trained_run

pytestmark = pytest.mark.slow  # trains the session's small model once


def _rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_eval_predict_predictor_and_demo_give_the_same_answer(tmp_path_factory, data_dir, tmp_path, tta):
    from twincar.demo import Answerer
    from twincar.evaluation.recipes import evaluate
    from twincar.inference.predictor import Predictor
    from twincar.predict import predict_files

    run = trained_run(tmp_path_factory, data_dir)
    model = run / "model.pth"
    evaluate(compose("eval", [f"ckpt={model}", f"tta={tta}", f"paths.output_dir={tmp_path}/eval", "progress=false"]))
    evaluated = {r["path"]: r for r in _rows(tmp_path / "eval" / "reports" / "predictions.csv")}
    images = list(evaluated)
    assert len(images) == 24  # the small set's 6 classes x 4 test images, all readable

    predict_files(images, model, output=tmp_path / "predict.csv", tta=None if tta == "none" else tta,
                  precision="fp32", device="cpu", progress=False, unknown="off")  # every car named: compare names
    predicted = {r["image"]: r for r in _rows(tmp_path / "predict.csv")}
    predictor = Predictor.load(model, device="cpu", precision="fp32", tta=tta, unknown="off")
    answers = predictor.predict(images)
    demo = Answerer(predictor)

    assert len({a.label for a in answers}) > 1  # a trained model: not one class for every image
    for path, answer in zip(images, answers, strict=True):
        e, p = evaluated[path], predicted[path]
        assert e["pred_name"] == p["class"] == answer.name
        assert float(e["confidence"]) == pytest.approx(answer.confidence, abs=1e-5)
        assert float(p["confidence"]) == pytest.approx(answer.confidence, abs=1e-5)
        assert float(p["top2_prob"]) == pytest.approx(answer.topk[1][1], abs=1e-5)
        eval_top5 = [part.rsplit(" (", 1) for part in e["top5"].split("; ")]
        assert [(n, float(q.rstrip(")"))) for n, q in eval_top5] == [
            (n, pytest.approx(q, abs=1e-5)) for n, q in answer.topk]
        make, _, year, _, topk, _, _ = demo(path)
        assert (make, year) == (answer.make, str(answer.year))
        assert list(topk) == [n for n, _ in answer.topk]
        assert list(topk.values()) == pytest.approx([q for _, q in answer.topk], abs=1e-5)


def test_flip_tta_averages_logits_so_the_temperature_never_changes_the_top1(tiny_export, car_images):
    import numpy as np

    from twincar.evaluation.calibration import Calibration
    from twincar.inference.predictor import Predictor

    plain = Predictor.load(tiny_export, device="cpu", precision="fp32")
    flip = Predictor.load(tiny_export, device="cpu", precision="fp32", tta="flip")
    batch = np.stack([plain.prepare(p) for p in car_images])  # uint8 (N, S, S, 3): the mirror flips axis 2
    expected = (plain.logits(batch) + plain.logits(batch[:, :, ::-1])) / 2
    assert np.allclose(flip.logits(batch), expected, atol=1e-5)
    hot = flip.with_calibration(Calibration(temperature=0.25), unknown="off")  # T divides the averaged logits
    raw, calibrated = hot.outputs(batch)
    assert np.allclose(calibrated, expected / 0.25, atol=1e-4) and np.array_equal(raw.argmax(1), calibrated.argmax(1))
