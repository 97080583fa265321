import pytest
import torch

from twincar.metrics import classification_metrics

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
