"""The nearest training cars: an exact nearest-neighbour index over :meth:`twincar.inference.Predictor.embed`
features (cosine similarity of L2-normalised pre-logit features, searched in torch, chunked).

:func:`build_index` embeds labelled samples (a training split), :meth:`NeighbourIndex.search` returns the ``k``
most similar for each query, :func:`knn_metrics` the embedding's own k-NN top-1 (queries against the index) and
Recall@1 (each query against the other queries, leave-one-out, as metric-learning papers report on Cars196).
An index is saved as ``index.safetensors`` (the embeddings and labels) and ``index.json`` (image paths, class names).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from twincar.errors import TwinCarError
from twincar.files import atomic_path, write_json

INDEX_TENSORS, INDEX_META = "index.safetensors", "index.json"
CHUNK = 4096  # queries per similarity matrix block: memory is CHUNK x index size floats


def top_k_similar(queries: torch.Tensor, keys: torch.Tensor, k: int, *, exclude_self: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, indices), each (Q, k): the ``k`` rows of ``keys`` with the largest dot product with each row of
    ``queries`` (cosine similarity for normalised rows), most similar first; ``exclude_self`` (queries are the keys)
    leaves each row's own index out."""
    k = min(k, len(keys) - int(exclude_self))
    if k < 1:
        raise TwinCarError("the index has too few images to search")
    sims, idx = [], []
    for start in range(0, len(queries), CHUNK):
        block = queries[start:start + CHUNK].float() @ keys.float().T
        if exclude_self:
            rows = torch.arange(len(block))
            block[rows, rows + start] = float("-inf")
        s, i = block.topk(k, dim=1)
        sims.append(s)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


@dataclass
class NeighbourIndex:
    """Embeddings of labelled images, to search for the nearest ones."""

    embeddings: torch.Tensor  # (N, D) float32, L2-normalised
    labels: torch.Tensor  # (N,) class index of each image
    paths: list[str]  # the N images
    class_names: list[str]  # what the labels name

    def search(self, queries: torch.Tensor, k: int = 3) -> list[list[tuple[str, str, float]]]:
        """Per query (rows of ``queries``, normalised embeddings): its ``k`` nearest indexed images as
        ``(path, class name, cosine similarity)``, most similar first."""
        sims, idx = top_k_similar(queries, self.embeddings, k)
        names = [self.class_names[int(label)] for label in self.labels]
        return [[(self.paths[j], names[j], s) for s, j in zip(srow, irow, strict=True)]
                for srow, irow in zip(sims.tolist(), idx.tolist(), strict=True)]

    def save(self, folder: str | Path) -> Path:
        """Write ``index.safetensors`` and ``index.json`` into ``folder`` (atomically); returns the folder."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / INDEX_TENSORS) as tmp:
            save_file({"embeddings": self.embeddings.contiguous(), "labels": self.labels.long().contiguous()},
                      str(tmp))
        write_json(folder / INDEX_META, {"paths": self.paths, "class_names": self.class_names,
                                         "images": len(self.paths), "dim": int(self.embeddings.shape[1])})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> NeighbourIndex:
        """An index written by :meth:`save` (safetensors: nothing unpickled)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / INDEX_TENSORS).is_file() or not (folder / INDEX_META).is_file():
            raise TwinCarError(f"{folder} holds no neighbour index ({INDEX_TENSORS} + {INDEX_META}): build one with "
                               "python -m twincar.index ckpt=MODEL")
        tensors = load_file(str(folder / INDEX_TENSORS))
        meta = json.loads((folder / INDEX_META).read_text("utf-8"))
        return cls(tensors["embeddings"], tensors["labels"], list(meta["paths"]), list(meta["class_names"]))


def build_index(predictor, samples: Sequence, *, batch_size: int = 64, bbox_margin: float | None = None
                ) -> NeighbourIndex:
    """Embed labelled ``samples``, read as :func:`~twincar.inference.collect_logits` reads them (unreadable ones
    left out)."""
    from twincar.inference import labelled_batches

    samples = list(samples)
    feats, kept = [], []
    for indices, images, _ in labelled_batches(predictor, samples, bbox_margin=bbox_margin, batch_size=batch_size):
        if images is not None:
            feats.append(predictor.embeddings(images))
            kept.extend(indices)
    if not kept:
        raise TwinCarError(f"none of the {len(samples)} images could be read to build the index")
    return NeighbourIndex(torch.cat(feats), torch.tensor([samples[i].label for i in kept]),
                          [str(samples[i].path) for i in kept], list(predictor.class_names))


def knn_metrics(index: NeighbourIndex, queries: torch.Tensor, labels: torch.Tensor, prefix: str = "test/"
                ) -> dict[str, float]:
    """``{prefix}knn_acc``: the nearest indexed (training) image's class is the query's; ``{prefix}recall_at_1``:
    the nearest other query image is of the query's class (Recall@1 of metric learning)."""
    _, nearest = top_k_similar(queries, index.embeddings, 1)
    knn = float((index.labels[nearest[:, 0]] == labels).double().mean())
    _, other = top_k_similar(queries, queries, 1, exclude_self=True)
    recall = float((labels[other[:, 0]] == labels).double().mean())
    return {f"{prefix}knn_acc": knn, f"{prefix}recall_at_1": recall}
