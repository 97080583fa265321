"""The error-analysis object (evaluation/interpret.py) on hand-made predictions: exact confusion counts, the
per-class rows, the confused twins and how they differ, the top losses in order."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from twincar.data.formats import Sample
from twincar.evaluation.interpret import Interpretation, relation
from twincar.evaluation.loop import EvalOutputs

NAMES = ["Audi A4 Sedan 2007", "Audi A4 Sedan 2012", "Audi A6 Sedan 2011", "BMW X5 SUV 2007",
         "Tesla Model S Sedan 2012"]
# (true class, predicted class, probability of the predicted class); the rest of the mass is shared evenly
ROWS = [(0, 0, 0.9), (0, 1, 0.9), (0, 1, 0.6), (1, 0, 0.7), (1, 1, 0.8), (2, 0, 0.8), (2, 2, 0.7), (3, 3, 0.9),
        (3, 2, 0.95)]


def made_up() -> tuple[torch.Tensor, torch.Tensor, list[Sample]]:
    probs = torch.zeros(len(ROWS), len(NAMES))
    for i, (_, pred, p) in enumerate(ROWS):
        probs[i] = (1 - p) / (len(NAMES) - 1)
        probs[i, pred] = p
    labels = torch.tensor([t for t, _, _ in ROWS])
    return probs.log(), labels, [Sample(Path(f"img{i}.jpg"), t) for i, (t, _, _) in enumerate(ROWS)]


@pytest.fixture
def interp() -> Interpretation:
    return Interpretation(*made_up(), NAMES)


def test_the_confusion_matrix_counts_true_rows_against_predicted_columns(interp):
    assert interp.confusion_matrix().tolist() == [[1, 2, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0],
                                                  [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]]
    assert interp.preds.tolist() == [p for _, p, _ in ROWS]
    interp.confusion_matrix()[0, 0] = 99  # a copy: the object's own counts stay
    assert interp.confusion_matrix()[0, 0] == 1


def test_per_class_rows_have_precision_recall_f1_and_the_class_most_taken_for(interp):
    rows = {r["name"]: r for r in interp.per_class()}
    assert [r["label"] for r in interp.per_class()] == list(range(5))
    a4_2007 = rows["Audi A4 Sedan 2007"]
    assert (a4_2007["make"], a4_2007["model"], a4_2007["year"]) == ("Audi", "A4 Sedan", 2007)
    assert a4_2007["support"] == 3 and a4_2007["precision"] == a4_2007["recall"] == a4_2007["f1"] == 0.333333
    assert (a4_2007["most_confused_with"], a4_2007["most_confused_count"]) == ("Audi A4 Sedan 2012", 2)
    a4_2012 = rows["Audi A4 Sedan 2012"]  # 1 of 3 predicted right, 1 of 2 images right
    assert (a4_2012["precision"], a4_2012["recall"], a4_2012["f1"]) == (0.333333, 0.5, 0.4)
    bmw = rows["BMW X5 SUV 2007"]
    assert (bmw["precision"], bmw["recall"], bmw["f1"], bmw["most_confused_with"]) == (1.0, 0.5, 0.666667,
                                                                                       "Audi A6 Sedan 2011")
    tesla = rows["Tesla Model S Sedan 2012"]  # no image, never predicted
    assert (tesla["support"], tesla["precision"], tesla["recall"], tesla["f1"]) == (0, 0.0, 0.0, 0.0)
    assert (tesla["most_confused_with"], tesla["most_confused_count"]) == ("", 0)


def test_confused_pairs_are_the_twins_most_often_swapped_with_how_they_differ(interp):
    pairs = interp.confused_pairs()
    first = pairs[0]
    assert (first["name_a"], first["name_b"], first["a_as_b"], first["b_as_a"], first["total"]) == (
        "Audi A4 Sedan 2007", "Audi A4 Sedan 2012", 2, 1, 3)
    assert first["differ_in"] == "year"  # same make and model
    assert first["example_a"].path.name == "img1.jpg" and first["example_b"].path.name == "img3.jpg"  # wrong ones
    rest = {(p["name_a"], p["name_b"]): p for p in pairs[1:]}
    assert set(rest) == {("Audi A4 Sedan 2007", "Audi A6 Sedan 2011"), ("Audi A6 Sedan 2011", "BMW X5 SUV 2007")}
    a6 = rest["Audi A4 Sedan 2007", "Audi A6 Sedan 2011"]
    assert (a6["a_as_b"], a6["b_as_a"], a6["total"], a6["differ_in"]) == (0, 1, 1, "model")
    assert a6["example_a"].path.name == "img0.jpg"  # no A4 2007 taken for the A6: its first image
    assert rest["Audi A6 Sedan 2011", "BMW X5 SUV 2007"]["differ_in"] == "make"
    assert len(interp.confused_pairs(top=1)) == 1  # only pairs confused at least once, at most `top`
    assert relation("Audi A4 Sedan 2007", "Audi A4 Sedan 2012") == "year"


def test_top_losses_are_the_surest_wrong_answers_in_order(interp):
    top = interp.top_losses(10)
    assert [t["index"] for t in top] == [8, 1, 5, 3, 2]  # only the wrong ones, surest (highest loss) first
    assert [t["index"] for t in interp.top_losses(2)] == [8, 1]
    worst = top[0]
    assert (worst["true"], worst["pred"], worst["sample"].path.name) == ("BMW X5 SUV 2007", "Audi A6 Sedan 2011",
                                                                          "img8.jpg")
    assert worst["confidence"] == pytest.approx(0.95)
    assert worst["loss"] == pytest.approx(-math.log(0.05 / 4), rel=1e-5)
    assert interp.losses[0].item() == pytest.approx(-math.log(0.9), rel=1e-5)  # a right answer's loss too


def test_from_outputs_reads_the_calibrated_logits():
    logits, labels, samples = made_up()
    out = EvalOutputs(logits * 0, labels, samples, [], calibrated=logits)
    interp = Interpretation.from_outputs(out, NAMES)
    assert interp.preds.tolist() == [p for _, p, _ in ROWS]
    assert torch.allclose(interp.probs, logits.softmax(1))
