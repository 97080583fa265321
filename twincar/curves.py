"""Loss and accuracy curves (train vs val per epoch) and the fine-grained curve (val accuracy of the class,
make, family and year-in-family per epoch), drawn from the CSV logger's ``metrics.csv``."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

CURVES = {  # file name -> (title, y label, metric suffix)
    "loss_curve.png": ("Loss", "cross-entropy", "loss"),
    "accuracy_curve.png": ("Accuracy", "top-1 accuracy", "acc"),
}

FINE_GRAINED_CURVE = "fine_grained_curve.png"
# val metric -> legend label, drawn in FINE_GRAINED_CURVE when the run logged them
FINE_GRAINED = {
    "val/acc": "class (top-1)",
    "val/acc_make": "make",
    "val/acc_family": "family (make + model)",
    "val/acc_year_in_family": "year, when the family is right",
}


def read_epoch_history(metrics_csv: str | Path) -> dict[str, dict[int, float]]:
    """``{metric: {epoch: value}}`` from a Lightning CSVLogger file (last value per epoch wins)."""
    history: dict[str, dict[int, float]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("epoch"):
                continue
            epoch = int(float(row["epoch"]))
            for key, value in row.items():
                if key not in ("epoch", "step") and value not in ("", None):
                    history.setdefault(key, {})[epoch] = float(value)
    return history


def plot_curves(metrics_csv: str | Path, out_dir: str | Path) -> list[Path]:
    """Write ``loss_curve.png`` and ``accuracy_curve.png`` (train and val per epoch) into ``out_dir``, and
    ``fine_grained_curve.png`` when the run logged make/family/year accuracies."""
    history = read_epoch_history(metrics_csv)
    written = []
    for file_name, (title, ylabel, suffix) in CURVES.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for stage in ("train", "val"):
            series = history.get(f"{stage}/{suffix}", {})
            if series:
                epochs = sorted(series)
                ax.plot([e + 1 for e in epochs], [series[e] for e in epochs], marker="o", label=stage)
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(out_dir) / file_name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if "val/acc_make" in history:
        written.append(plot_fine_grained(history, Path(out_dir) / FINE_GRAINED_CURVE))
    return written


def plot_fine_grained(history: dict[str, dict[int, float]], path: str | Path) -> Path:
    """Val accuracy per epoch at each level of the class hierarchy: class, make, family, year in family."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in FINE_GRAINED.items():
        series = {e: v for e, v in history.get(key, {}).items() if v == v}  # NaN: undefined that epoch
        if series:
            epochs = sorted(series)
            ax.plot([e + 1 for e in epochs], [series[e] for e in epochs], marker="o", label=label)
    ax.set(title="Validation accuracy by level", xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
