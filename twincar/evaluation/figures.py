"""Every figure TwinCar draws: training curves (loss, accuracy, the fine-grained curve, from the CSV logger's
``metrics.csv``) and the report figures (reliability diagram, confused twins, top losses, Grad-CAM overlays
and grids).

Pure functions over arrays and file paths; each writes one PNG (matplotlib, Agg) atomically and returns its path.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from twincar.data.images import ImageReadError, load_rgb  # noqa: E402
from twincar.files import write_bytes  # noqa: E402
from twincar.models.metrics import expected_calibration_error  # noqa: E402

DPI = 100


def _save(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, dpi=DPI, format="png")
    finally:
        plt.close(fig)
    return write_bytes(path, buf.getvalue())


def _thumbnail(image: str | Path | np.ndarray | None, size: int = 160) -> np.ndarray:
    """An image (a file, or a decoded uint8 (H, W, 3) array) as an (H, W, 3) uint8 array, longest side ``size``;
    a grey tile when there is none or it cannot be read."""
    try:
        if isinstance(image, (str, Path)):
            image = load_rgb(image)
        if isinstance(image, np.ndarray):
            img = torch.from_numpy(image).permute(2, 0, 1).float()[None]
            img = torch.nn.functional.interpolate(img, scale_factor=size / max(img.shape[-2:]), mode="bilinear",
                                                  antialias=True)
            return img[0].clamp(0, 255).byte().permute(1, 2, 0).numpy()
    except (ImageReadError, RuntimeError):
        pass
    return np.full((size * 3 // 4, size, 3), 200, np.uint8)


def _short(name: str, width: int = 28) -> str:
    """A class name wrapped on two lines for a figure title."""
    if len(name) <= width:
        return name
    cut = name.rfind(" ", 0, width)
    cut = cut if cut > 0 else width
    return name[:cut] + "\n" + name[cut:].strip()


def reliability_diagram(bins: torch.Tensor, path: str | Path, raw_bins: torch.Tensor | None = None) -> Path:
    """Accuracy vs confidence per bin (from :func:`twincar.models.metrics.reliability_bins`), ECE in the title; with
    ``raw_bins`` (the same images before temperature scaling) their accuracy vs confidence too, as a line."""
    count, conf, correct = (b.cpu().numpy() for b in bins)
    n_bins = len(count)
    edges = np.linspace(0, 1, n_bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    filled = count > 0
    acc = np.divide(correct, count, out=np.zeros_like(correct), where=filled)
    mean_conf = np.divide(conf, count, out=centers.copy(), where=filled)
    ece = float(expected_calibration_error(bins.cpu()))
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=(3, 1), sharex=True)
    ax.bar(centers, acc, width=1 / n_bins, edgecolor="black", color="tab:blue", label="accuracy")
    ax.bar(centers[filled], (mean_conf - acc)[filled], bottom=acc[filled], width=1 / n_bins, color="tab:red",
           alpha=0.3, edgecolor="tab:red", hatch="//", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    title = f"Reliability (ECE {ece:.3f}, {n_bins} bins)"
    if raw_bins is not None:
        r_count, r_conf, r_correct = (b.cpu().numpy() for b in raw_bins)
        r_filled = r_count > 0
        ax.plot(r_conf[r_filled] / r_count[r_filled], r_correct[r_filled] / r_count[r_filled], "o-",
                color="tab:orange", label="before temperature scaling")
        title = f"Reliability: ECE {ece:.3f} calibrated, {float(expected_calibration_error(raw_bins.cpu())):.3f} raw"
    ax.set(title=title, ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    hist.bar(centers, count / max(count.sum(), 1), width=1 / n_bins, color="grey", edgecolor="black")
    hist.set(xlabel="confidence (top-1 probability)", ylabel="share of images")
    fig.tight_layout()
    return _save(fig, path)


def confused_pairs_figure(pairs: Sequence[dict], path: str | Path) -> Path:
    """One row per pair: an example image of each class, titled with its name and how often it was
    taken for the other. ``pairs``: dicts with ``name_a``, ``name_b``, ``a_as_b``, ``b_as_a``,
    ``differ_in``, ``example_a``, ``example_b`` (image files, uint8 (3, H, W) tensors or None)."""
    rows = max(1, math.ceil(len(pairs) / 2))
    fig, axes = plt.subplots(rows, 4, figsize=(13, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, pair in enumerate(pairs):
        r, c = divmod(k, 2)
        for side, other, ax in (("a", "b", axes[r, 2 * c]), ("b", "a", axes[r, 2 * c + 1])):
            ax.imshow(_thumbnail(pair[f"example_{side}"]))
            head = f"#{k + 1}, {pair['differ_in']} differs: " if side == "a" else f"#{k + 1}: "
            ax.set_title(f"{head}{_short(pair[f'name_{side}'])}\ntaken for the other {pair[f'{side}_as_{other}']}x",
                         fontsize=8)
    if not pairs:
        axes[0, 0].text(0, 0.5, "no confusions", fontsize=14)
    fig.suptitle("Most confused class pairs (left and right: an image of each)", fontsize=12)
    fig.tight_layout()
    return _save(fig, path)


def top_losses_figure(items: Sequence[dict], path: str | Path, cols: int = 4) -> Path:
    """fastai's ``plot_top_losses``: the most confidently wrong images with true and predicted names.
    ``items``: dicts with ``image`` (a file or a uint8 (3, H, W) tensor), ``true``, ``pred``, ``confidence``,
    ``loss``."""
    rows = max(1, math.ceil(len(items) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, it in zip(axes.flat, items, strict=False):
        ax.imshow(_thumbnail(it["image"]))
        ax.set_title(f"true: {_short(it['true'])}\npred: {_short(it['pred'])}\n"
                     f"p={it['confidence']:.2f}  loss={it['loss']:.2f}", fontsize=7)
    if not items:
        axes[0, 0].text(0, 0.5, "no errors", fontsize=14)
    fig.suptitle("Top losses: most confidently wrong (true / predicted / confidence / loss)", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def cam_title(e) -> str:
    """"Make Model, Year (confidence)" of an :class:`~twincar.explain.Explanation`, and the target if other."""
    p = e.prediction
    title = f"{p.make} {p.model}, {p.year if p.year is not None else 'year n/a'} ({p.confidence:.0%})"
    if e.target_name and e.target_name != p.name:
        title += f"\nCAM of: {_short(e.target_name, 40)}"
    return title


def cam_figure(e, path: str | Path) -> Path:
    """The original project's ``gradcam_example_*.png``: the image and its CAM overlay, titled with the
    predicted make, model, year and confidence."""
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.8))
    axes[0].imshow(e.image)
    axes[0].set_title(Path(e.prediction.source).name, fontsize=8)
    axes[1].imshow(e.overlay)
    axes[1].set_title(f"{e.method}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(cam_title(e), fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def cam_grid(explanations: Sequence, path: str | Path, cols: int = 4) -> Path:
    """All overlays in one figure, each titled with its prediction."""
    ok = [e for e in explanations if e.ok]
    cols = max(1, min(cols, len(ok)))
    rows = max(1, math.ceil(len(ok) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, e in zip(axes.flat, ok, strict=False):
        ax.imshow(e.overlay)
        ax.set_title(_short(cam_title(e), 60), fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


# -- training curves --------------------------------------------------------------------------------
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
        written.append(_save(fig, Path(out_dir) / file_name))
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
    return _save(fig, path)


def metric_bars(labels: Sequence[str], values: Sequence[float], metric: str, total: int, path: str | Path) -> Path:
    """A horizontal bar of ``metric`` per run (in the order given: best first, on top), labelled by ``labels``;
    ``total``: how many runs there were (those without the metric are not drawn)."""
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * max(1, len(values))))
    ax.barh(range(len(values)), values, color="tab:blue")
    ax.set_yticks(range(len(values)), [label[:60] for label in labels], fontsize=8)
    ax.invert_yaxis()
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.4f}", va="center", fontsize=8)
    ax.set(xlabel=metric, title=f"{metric} per run ({len(values)} of {total} runs)")
    ax.margins(x=0.15)
    fig.tight_layout()
    return _save(fig, path)


def score_histogram(known: torch.Tensor, unknown: torch.Tensor, path: str | Path, *, threshold: float | None = None,
                    score: str = "max_logit", auroc: float | None = None) -> Path:
    """Histograms of the unknown score of known-class and unknown images (shared bins), with the threshold."""
    k, u = known.float().numpy(), unknown.float().numpy()
    both = np.concatenate([k, u])
    edges = np.linspace(float(both.min()), float(both.max()) + 1e-6, 41)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(k, bins=edges, alpha=0.6, color="tab:blue", label=f"known classes ({len(k)})", density=True)
    ax.hist(u, bins=edges, alpha=0.6, color="tab:red", label=f"unknown ({len(u)})", density=True)
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
    title = f"Unknown score ({score}): higher = more like a known class"
    ax.set(title=title + (f", AUROC {auroc:.3f}" if auroc is not None else ""), xlabel=score, ylabel="density")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
