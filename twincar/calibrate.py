"""Calibrate a trained model: ``python -m twincar.calibrate ckpt=PATH [classes=...] [data.split=val] [data.root=PATH]``.

Fits the temperature (one scalar, by NLL) and the "unknown car" threshold (the score that keeps ``tpr`` of the
split's images) with :func:`twincar.evaluation.calibration.calibrate` on the logits
:class:`~twincar.inference.predictor.Predictor`
computes (:func:`~twincar.inference.predictor.collect_logits`, as eval does), and stores them with the model file
(:func:`twincar.models.loading.write_calibration`: a ``.ckpt``'s hyper-parameters, the ``model_card.json`` beside
exported weights, or ``NAME.calibration.json`` beside a bare state dict such as the original TwinCars ``.pth``).
Predict, eval and the demo then use them. Training does this itself at its end; this is for any other model file.

It writes ``calibration.json`` and ``reliability.png`` (before and after) into its run directory.
``calibrate_model(cfg)`` is the pure function; ``main`` the thin Hydra entry point. It never trains.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from twincar.errors import exit_on_user_error
from twincar.evaluation.calibration import SCORES, Calibration, calibrate
from twincar.evaluation.figures import reliability_diagram
from twincar.evaluation.loop import EvalError, collect_logits, data_config, eval_samples
from twincar.files import check_writable_dir, write_json
from twincar.inference.engines import default_workers
from twincar.inference.predictor import Predictor
from twincar.models.loading import write_calibration
from twincar.models.metrics import calibration_bins
from twincar.runs import resolve_launch_paths

log = logging.getLogger(__name__)


def calibrate_model(cfg: DictConfig) -> Calibration:
    """Fit ``cfg.ckpt``'s calibration on ``cfg.data.split`` and store it with the model file (unless ``dry_run``)."""
    resolve_launch_paths(cfg)
    if str(cfg.score) not in SCORES:
        raise EvalError(f"score={cfg.score} is not an unknown score: use one of {', '.join(SCORES)}")
    if not 0 < float(cfg.tpr) <= 1:
        raise EvalError(f"tpr={cfg.tpr} must be a share of images in (0, 1], e.g. tpr=0.95")
    if str(cfg.tta) not in ("none", "flip"):
        raise EvalError(f"tta={cfg.tta} is not supported: use tta=none or tta=flip")
    out_dir = Path(cfg.paths.output_dir)
    check_writable_dir(out_dir, "paths.output_dir")
    predictor = Predictor.load(cfg.ckpt, cfg.get("classes"), device=cfg.get("device", "auto"), tta=str(cfg.tta),
                               calibration=None)  # fitted on raw logits, whatever the file carried before
    data, split = data_config(cfg)
    if "skipped_file" in data:
        data["skipped_file"] = str(out_dir / "skipped.txt")
    samples, margin, _ = eval_samples(data, split, predictor.class_names)
    batch_size = int(data.get("eval_batch_size") or data.get("batch_size") or 64)
    out = collect_logits(predictor, samples, bbox_margin=margin, batch_size=batch_size,
                         num_workers=min(int(data.get("num_workers") or 0), default_workers(predictor.device)),
                         progress=bool(cfg.get("progress", True)))
    calibration = calibrate(out.logits, out.labels, score=str(cfg.score), tpr=float(cfg.tpr),
                            fitted_on=f"{split} ({len(out.labels)} images of {data.get('root')})", tta=predictor.tta)
    stored = None if cfg.get("dry_run") else write_calibration(cfg.ckpt, calibration.to_dict())
    write_json(out_dir / "calibration.json", {**calibration.to_dict(), "checkpoint": str(cfg.ckpt),
                                              "stored_in": str(stored) if stored else None, "tta": str(cfg.tta)})
    reliability_diagram(calibration_bins(out.logits / calibration.temperature, out.labels),
                        out_dir / "reliability.png", raw_bins=calibration_bins(out.logits, out.labels))
    log.info("temperature %.3f on %d %s images: ECE %.3f -> %.3f, NLL %.3f -> %.3f; unknown threshold %.4g (%s, "
             "%.0f%% of these images kept)%s", calibration.temperature, calibration.images, split,
             calibration.ece_raw, calibration.ece, calibration.nll_raw, calibration.nll, calibration.threshold,
             calibration.score, 100 * calibration.target_tpr,
             f"; stored in {stored}" if stored else " (dry run: nothing stored)")
    return calibration


@hydra.main(version_base="1.3", config_path="conf", config_name="calibrate")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: a user error is printed as one sentence, exit code 1."""
    with exit_on_user_error(log):
        calibrate_model(cfg)


if __name__ == "__main__":
    main()
