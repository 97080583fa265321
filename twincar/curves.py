"""Loss and accuracy curves (train vs val per epoch), drawn from the CSV logger's ``metrics.csv``."""

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
    """Write ``loss_curve.png`` and ``accuracy_curve.png`` (train and val per epoch) into ``out_dir``."""
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
    return written
