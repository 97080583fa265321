"""Build the nearest-training-cars index: ``python -m twincar.index ckpt=PATH [classes=...] [data overrides]``.

Embeds the training split (:meth:`twincar.inference.predictor.Predictor.embeddings`, L2-normalised pre-logit
features) of the
data the model was trained with and writes :class:`twincar.evaluation.neighbours.NeighbourIndex` to ``index/`` beside
the model
(or ``out=DIR``), where ``twincar-predict --neighbours K``, the demo and ``python -m twincar.eval index=DIR`` find it.
Search is exact (cosine similarity): ``backend=auto`` (faiss when installed, else torch), ``torch`` or ``faiss``
(``pip install 'twincar[faiss]'``). ``thumbnails=128`` (the default) keeps a small JPEG of each image in the index,
so the demo shows the nearest cars wherever the index goes (a Space); ``thumbnails=0`` keeps none. ``build(cfg)``
is the pure function; ``main`` the thin Hydra entry point.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, open_dict

from twincar.errors import exit_on_user_error
from twincar.evaluation.loop import EvalError, data_config, eval_samples
from twincar.evaluation.neighbours import build_index, resolve_backend
from twincar.inference.predictor import Predictor
from twincar.runs import resolve_launch_paths

log = logging.getLogger(__name__)


def build(cfg: DictConfig) -> Path:
    """Embed ``cfg.data.split`` (train by default) and write the index; returns its folder."""
    resolve_launch_paths(cfg)
    split = str(cfg.data.get("split") or "train")
    if split not in ("train", "val", "test"):
        raise EvalError(f"data.split={split} is not a split: use data.split=train, val or test")
    predictor = Predictor.load(cfg.ckpt, cfg.get("classes"), device=cfg.get("device", "auto"))
    with open_dict(cfg):
        cfg.data.split = "test"  # data_config checks eval's splits; the split is chosen below
    data, _ = data_config(cfg)
    samples, margin, _ = eval_samples(data, split, predictor.class_names)
    batch_size = int(data.get("eval_batch_size") or data.get("batch_size") or 64)
    index = build_index(predictor, samples, batch_size=batch_size, bbox_margin=margin,
                        backend=str(cfg.get("backend") or "auto"), thumbnails=int(cfg.get("thumbnails") or 0))
    out = Path(cfg.out) if cfg.get("out") else Path(cfg.ckpt).expanduser().parent / "index"
    index.save(out)
    log.info("indexed %d %s images (%d-d embeddings) into %s (searched with %s)", len(index.paths), split,
             index.embeddings.shape[1], out, resolve_backend(index.backend))
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="index")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: a user error is printed as one sentence, exit code 1."""
    with exit_on_user_error(log):
        build(cfg)


if __name__ == "__main__":
    main()
