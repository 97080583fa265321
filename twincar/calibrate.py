"""Calibrate a trained model: ``python -m twincar.calibrate ckpt=PATH [classes=...] [data.split=val] [data.root=PATH]``.

Fits the temperature (one scalar, by NLL) and the "unknown car" threshold (the score that keeps ``tpr`` of the
split's images) with :func:`twincar.evaluation.calibration.calibrate` on the logits
:class:`~twincar.inference.predictor.Predictor` computes (:func:`~twincar.evaluation.loop.collect_logits`, as eval
does), and stores them with the model file (:func:`twincar.models.loading.write_calibration`: a ``.ckpt``'s
hyper-parameters, the ``model_card.json`` beside exported weights, or ``NAME.calibration.json`` beside a bare state
dict such as the original TwinCars ``.pth``). Predict, eval and the demo then use them. Training does this itself at
its end; this is for any other model file.

It writes ``calibration.json`` and ``reliability.png`` (before and after) into its run directory.
:func:`twincar.evaluation.recipes.calibrate_model` does the work; ``main`` is the thin Hydra entry point. It never
trains.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from twincar.data.pipeline import refuse_removed_overrides
from twincar.errors import exit_on_user_error, run_hydra_tool
from twincar.evaluation.recipes import calibrate_model

log = logging.getLogger(__name__)


def main() -> None:
    """Command-line entry point: a removed data option (``data.cache=true``) is one sentence naming its replacement,
    before Hydra composes the config; then :func:`hydra_main`."""
    run_hydra_tool(hydra_main, log, refuse_removed_overrides)


@hydra.main(version_base="1.3", config_path="conf", config_name="calibrate")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra entry point: a user error is printed as one sentence, exit code 1."""
    with exit_on_user_error(log):
        calibrate_model(cfg)


if __name__ == "__main__":
    main()
