import pytest
import torch

from twincar.models.metrics import classification_metrics

# Four images, six classes. Rank of the true class among the logits: 1st, 2nd, 4th, 6th.
LOGITS = torch.tensor([
    [9.0, 1, 2, 3, 4, 5],  # true 0: top-1 right
    [9.0, 8, 1, 2, 3, 4],  # true 1: 2nd -> top-3 right
    [9.0, 8, 6, 7, 1, 2],  # true 2: 4th -> top-5 right
    [1.0, 2, 3, 0, 4, 9],  # true 3: last
])
LABELS = torch.tensor([0, 1, 2, 3])


def test_accuracy_and_top_k_on_known_ranks():
    m = classification_metrics(6, prefix="val/")
    m.update(LOGITS, LABELS)
    values = {k: v.item() for k, v in m.compute().items()}
    assert values["val/acc"] == pytest.approx(1 / 4)
    assert values["val/acc_top3"] == pytest.approx(2 / 4)
    assert values["val/acc_top5"] == pytest.approx(3 / 4)


def test_macro_precision_recall_f1_by_hand():
    # top-1 predictions: 0, 0, 0, 5. Classes seen in labels or predictions: 0, 1, 2, 3, 5 (class 4
    # never occurs and is left out of the macro mean, as in scikit-learn).
    # class 0: precision 1/3, recall 1, F1 1/2; classes 1, 2, 3, 5: all 0.
    m = classification_metrics(6)
    m.update(LOGITS, LABELS)
    values = {k: v.item() for k, v in m.compute().items()}
    assert values["precision_macro"] == pytest.approx((1 / 3) / 5)
    assert values["recall_macro"] == pytest.approx(1 / 5)
    assert values["f1_macro"] == pytest.approx(0.5 / 5)


def test_top_k_only_when_k_below_class_count():
    assert set(classification_metrics(4)) == {"acc", "acc_top3", "precision_macro", "recall_macro", "f1_macro"}
    assert "acc_top5" in classification_metrics(196)


# -- hierarchical metrics and calibration ------------------------------------------------------------
CARS = [
    "BMW M3 Coupe 2012",  # 0
    "BMW M3 Coupe 2008",  # 1  same family as 0, another year
    "BMW X5 SUV 2007",  # 2  same make, another model
    "Audi S4 Sedan 2012",  # 3
    "Audi S4 Sedan 2007",  # 4
    "Tesla Roadster",  # 5  no year in the name
]
# (true, predicted): what each case is
CASES = [
    (0, 0),  # right
    (0, 1),  # wrong year only (2012 -> 2008)
    (1, 2),  # wrong model of the right make; year 2008 -> 2007 is within one year
    (3, 0),  # wrong make, but the year (2012) is right
    (4, 4),  # right
    (4, 3),  # wrong year only (2007 -> 2012)
    (5, 5),  # right, no year
    (3, 5),  # wrong make, predicted class has no year
]


def one_hot_logits(preds: list[int], k: int = 6) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(preds), k).float() * 5


def hierarchy_values(cases, names=CARS) -> dict[str, float]:
    m = classification_metrics(len(names), prefix="val/", class_names=names)
    labels, preds = zip(*cases, strict=True)
    m.update(one_hot_logits(list(preds), len(names)), torch.tensor(labels))
    return {k: v.item() for k, v in m.compute().items()}


def test_make_family_year_and_mistake_severity_by_hand():
    v = hierarchy_values(CASES)
    assert v["val/acc"] == pytest.approx(3 / 8)
    assert v["val/acc_make"] == pytest.approx(6 / 8)  # all but the two wrong-make cases
    assert v["val/acc_family"] == pytest.approx(5 / 8)  # the 3 right + the 2 wrong-year-only
    # year over the 7 images whose true class names a year: right for cases 0, 3, 4
    assert v["val/acc_year"] == pytest.approx(3 / 7)
    assert v["val/acc_year_pm1"] == pytest.approx(4 / 7)  # + the 2008 -> 2007 case
    # family right and a year: cases 0, 1, 4, 5 -> the year is right in 0 and 4
    assert v["val/acc_year_in_family"] == pytest.approx(2 / 4)
    # 5 errors: 2 wrong year only, 1 wrong model of the right make, 2 wrong make
    assert v["val/err_wrong_year"] == pytest.approx(2 / 5)
    assert v["val/err_wrong_model"] == pytest.approx(1 / 5)
    assert v["val/err_wrong_make"] == pytest.approx(2 / 5)


def test_names_without_years_and_a_perfect_model_give_nan_not_a_crash():
    names = ["Tesla Roadster", "Tesla Model S", "Smart fortwo"]
    v = hierarchy_values([(0, 0), (1, 0), (2, 2)], names)
    assert v["val/acc_make"] == pytest.approx(1.0) and v["val/acc_family"] == pytest.approx(2 / 3)
    assert all(v[f"val/{k}"] != v[f"val/{k}"] for k in ("acc_year", "acc_year_pm1", "acc_year_in_family"))
    assert v["val/err_wrong_model"] == pytest.approx(1.0)
    perfect = hierarchy_values([(0, 0), (1, 1)], ["A One 2001", "A One 2002"])  # one family
    assert perfect["val/acc_year_in_family"] == 1.0 and perfect["val/err_wrong_year"] != perfect["val/err_wrong_year"]


def test_ece_and_nll_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.65, 0.35], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 0, 1])
    m = classification_metrics(2, class_names=["A X 2001", "A X 2002"])
    m.update(probs.log(), labels)
    v = {k: x.item() for k, x in m.compute().items()}
    # bins (width 1/15): {0.9, 0.9} -> acc 0.5, {0.65} -> acc 1, {0.7} -> acc 1
    assert v["ece"] == pytest.approx((2 * abs(0.9 - 0.5) + abs(0.65 - 1) + abs(0.7 - 1)) / 4, abs=1e-6)
    assert v["nll"] == pytest.approx(-(2 * torch.tensor([0.9, 0.1, 0.65, 0.7]).log()).sum().item() / 8, abs=1e-6)


def test_ece_agrees_with_torchmetrics_and_accumulates_over_batches():
    from torchmetrics.classification import MulticlassCalibrationError

    from twincar.models.metrics import ExpectedCalibrationError

    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(200, 7, generator=g) * 2, torch.randint(0, 7, (200,), generator=g)
    ref = MulticlassCalibrationError(7, n_bins=15, norm="l1")(logits.softmax(1), labels)
    whole, parts = ExpectedCalibrationError(), ExpectedCalibrationError()
    whole.update(logits, labels)
    for chunk in range(0, 200, 64):  # as validation batches (or DDP ranks) would feed it
        parts.update(logits[chunk:chunk + 64], labels[chunk:chunk + 64])
    assert whole.compute()["ece"].item() == pytest.approx(ref.item(), abs=1e-5)
    assert parts.compute()["ece"].item() == pytest.approx(ref.item(), abs=1e-5)
    assert parts.compute()["nll"].item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels).item(), abs=1e-5)


def test_train_summary_prints_the_fine_grained_accuracies():
    from pathlib import Path

    from twincar.training.steps import summary

    metrics = {"val/acc": 0.5, "val/acc_make": 0.9, "val/acc_family": 0.75, "val/acc_year_in_family": 0.625,
               "test/acc": 0.4, "test/acc_make": 0.8, "test/acc_family": 0.7, "test/acc_year_in_family": float("nan")}
    text = summary(metrics, 14, Path("run"), "outputs")
    assert "Fine-grained (val): make 0.900, family (make + model) 0.750, year in family 0.625" in text
    assert "Fine-grained (test): make 0.800, family (make + model) 0.700, year in family nan" in text
