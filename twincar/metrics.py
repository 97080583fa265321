"""Classification metrics: one torchmetrics collection, cloned per stage as ``stage/name``."""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

TOP_K = (3, 5)


def classification_metrics(num_classes: int, prefix: str = "") -> MetricCollection:
    """Top-1 accuracy, top-3/top-5 accuracy (when k < num_classes), macro precision/recall/F1.

    Names: ``{prefix}acc``, ``{prefix}acc_top3``, ``{prefix}acc_top5``, ``{prefix}precision_macro``,
    ``{prefix}recall_macro``, ``{prefix}f1_macro``. Accuracies are micro averages (fraction of images
    right); precision, recall and F1 are unweighted means over classes.
    """
    metrics = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        **{
            f"acc_top{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
            for k in TOP_K
            if k < num_classes
        },
        "precision_macro": MulticlassPrecision(num_classes, average="macro"),
        "recall_macro": MulticlassRecall(num_classes, average="macro"),
        "f1_macro": MulticlassF1Score(num_classes, average="macro"),
    }
    return MetricCollection(metrics, prefix=prefix)
