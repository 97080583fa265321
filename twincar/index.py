"""Build the nearest-training-cars index: ``python -m twincar.index ckpt=PATH [classes=...] [data overrides]``.

Embeds the training split (:meth:`twincar.inference.predictor.Predictor.embeddings`, L2-normalised pre-logit
features) of the data the model was trained with and writes :class:`twincar.evaluation.neighbours.NeighbourIndex` to
``index/`` beside the model (or ``out=DIR``), where ``twincar-predict --neighbours K``, the demo and
``python -m twincar.eval index=DIR`` find it.
Search is exact (cosine similarity): ``backend=auto`` (faiss when installed, else torch), ``torch`` or ``faiss``
(``pip install 'twincar[faiss]'``). ``thumbnails=128`` (the default) keeps a small JPEG of each image in the index,
so the demo shows the nearest cars wherever the index goes (a Space); ``thumbnails=0`` keeps none.
:func:`twincar.evaluation.recipes.build_neighbour_index` does the work; ``main`` is the thin Hydra entry point.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from twincar.data.pipeline import refuse_removed_overrides
from twincar.errors import exit_on_user_error, run_hydra_tool
from twincar.evaluation.recipes import build_neighbour_index

log = logging.getLogger(__name__)


def main() -> None:
    """Command-line entry point: a removed data option (``data.cache=true``) is one sentence naming its replacement,
    before Hydra composes the config; then :func:`hydra_main`."""
    run_hydra_tool(hydra_main, log, refuse_removed_overrides)


@hydra.main(version_base="1.3", config_path="conf", config_name="index")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra entry point: a user error is printed as one sentence, exit code 1."""
    with exit_on_user_error(log):
        build_neighbour_index(cfg)


if __name__ == "__main__":
    main()
