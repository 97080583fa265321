"""Evaluate a trained model: ``python -m twincar.eval ckpt=PATH [data.split=test|val] [data.root=PATH] [tta=flip]
[ood=auto|none|holdout|synthetic|FOLDER]``.

The model comes in through :class:`~twincar.inference.predictor.Predictor` (class names and preprocessing from the
file), the images from :class:`~twincar.data.datamodule.CarsDataModule` built from the training run's data config
(the very val/test sets training used), and the numbers from :func:`twincar.models.metrics.classification_metrics`
(the code training logs with), so ``eval`` on a checkpoint's split reproduces what training logged.

It writes into its run directory ``reports/``: ``metrics.json``, ``per_class.csv``, ``confused_pairs.csv`` /
``.png``, ``top_losses.png``, ``reliability.png`` and ``predictions.csv``; with ``ood=`` (images of no known
class) also ``ood_scores.png`` and the ``ood/*`` open-set metrics. Confidence is the model's calibrated probability
(its temperature, :mod:`twincar.evaluation.calibration`): ``{split}/ece`` after temperature scaling, ``{split}/ece_raw``
before. :func:`twincar.evaluation.recipes.evaluate` does the work (the reports:
:mod:`twincar.evaluation.report`); ``main`` is the thin Hydra entry point. It never trains.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from twincar.data.pipeline import refuse_removed_overrides
from twincar.errors import exit_on_user_error, run_hydra_tool
from twincar.evaluation.recipes import evaluate
from twincar.training.distributed import hydra_job_relaunch, log_file_on_rank_zero_only

log = logging.getLogger(__name__)


def main() -> None:
    """Command-line entry point: a removed data option (``data.cache=true``) is one sentence naming its replacement,
    before Hydra composes the config; then :func:`hydra_main`."""
    run_hydra_tool(hydra_main, log, refuse_removed_overrides)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra entry point: a user error is printed as one sentence, exit code 1."""
    # more processes start as single runs of this job (trainer.devices)
    with exit_on_user_error(log), hydra_job_relaunch("twincar.eval"):
        log_file_on_rank_zero_only()
        evaluate(cfg)


if __name__ == "__main__":
    main()
