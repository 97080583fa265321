"""The nearest training cars: an exact nearest-neighbour index over :meth:`twincar.inference.Predictor.embed`
features (cosine similarity of L2-normalised pre-logit features), searched exactly: in torch (chunked matrix products)
or, with the ``faiss`` extra (``pip install 'twincar[faiss]'``), by faiss's exact inner-product index
(``IndexFlatIP``), faster on large indexes and never holding a whole similarity matrix. Both give the same neighbours.

:func:`build_index` embeds labelled samples (a training split), :meth:`NeighbourIndex.search` returns the ``k``
most similar for each query, :func:`knn_metrics` the embedding's own k-NN top-1 (queries against the index) and
Recall@1 (each query against the other queries, leave-one-out, as metric-learning papers report on Cars196).
An index is saved as ``index.safetensors`` (the embeddings and labels) and ``index.json`` (image paths, class names,
the search backend: ``auto`` is faiss when it is installed, else torch).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from twincar.errors import TwinCarError
from twincar.files import atomic_path, write_json

INDEX_TENSORS, INDEX_META = "index.safetensors", "index.json"
CHUNK = 4096  # queries per similarity matrix block: memory is CHUNK x index size floats
BACKENDS = ("auto", "torch", "faiss")


def faiss_installed() -> bool:
    """Whether faiss (the ``faiss`` extra: faiss-cpu) can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str) -> str:
    """``torch`` or ``faiss``: ``auto`` is faiss when it is installed, else torch; faiss asked for but not installed,
    or another name, is one sentence."""
    if backend not in BACKENDS:
        raise TwinCarError(f"backend={backend} is not a search backend: use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "faiss" if faiss_installed() else "torch"
    if backend == "faiss" and not faiss_installed():
        raise TwinCarError("backend=faiss needs faiss: pip install 'twincar[faiss]' (faiss-cpu), or use backend=torch")
    return backend


def flat_ip_index(keys: torch.Tensor):
    """A faiss exact inner-product index (``IndexFlatIP``) over the rows of ``keys``."""
    import faiss

    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(np.ascontiguousarray(keys.float().numpy()))
    return index


def _faiss_top_k(queries: torch.Tensor, index, k: int, exclude_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    sims, idx = index.search(np.ascontiguousarray(queries.float().numpy()), k + int(exclude_self))
    if exclude_self:  # drop each row's own index (or, where it is not among the k + 1, the last)
        own = idx == np.arange(len(idx))[:, None]
        own[~own.any(axis=1), -1] = True
        sims, idx = sims[~own].reshape(-1, k), idx[~own].reshape(-1, k)
    return torch.from_numpy(sims), torch.from_numpy(idx).long()


def top_k_similar(queries: torch.Tensor, keys: torch.Tensor, k: int, *, exclude_self: bool = False,
                  backend: str = "torch", faiss_index=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, indices), each (Q, k): the ``k`` rows of ``keys`` with the largest dot product with each row of
    ``queries`` (cosine similarity for normalised rows), most similar first; ``exclude_self`` (queries are the keys)
    leaves each row's own index out. ``backend`` (:func:`resolve_backend`): exact search in torch or in faiss
    (``faiss_index``: a :func:`flat_ip_index` already built over ``keys``)."""
    k = min(k, len(keys) - int(exclude_self))
    if k < 1:
        raise TwinCarError("the index has too few images to search")
    if resolve_backend(backend) == "faiss":
        return _faiss_top_k(queries, faiss_index or flat_ip_index(keys), k, exclude_self)
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
    backend: str = "auto"  # how it is searched (BACKENDS)
    _faiss: object = field(default=None, init=False, repr=False, compare=False)  # the faiss index, built once

    def top_k(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarities, indices) of the ``k`` nearest indexed images of each query (:func:`top_k_similar`)."""
        if resolve_backend(self.backend) == "faiss" and self._faiss is None:
            self._faiss = flat_ip_index(self.embeddings)
        return top_k_similar(queries, self.embeddings, k, backend=self.backend, faiss_index=self._faiss)

    def search(self, queries: torch.Tensor, k: int = 3) -> list[list[tuple[str, str, float]]]:
        """Per query (rows of ``queries``, normalised embeddings): its ``k`` nearest indexed images as
        ``(path, class name, cosine similarity)``, most similar first."""
        sims, idx = self.top_k(queries, k)
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
        write_json(folder / INDEX_META, {"paths": self.paths, "class_names": self.class_names, "backend": self.backend,
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
        return cls(tensors["embeddings"], tensors["labels"], list(meta["paths"]), list(meta["class_names"]),
                   str(meta.get("backend", "auto")))


def build_index(predictor, samples: Sequence, *, batch_size: int = 64, bbox_margin: float | None = None,
                backend: str = "auto") -> NeighbourIndex:
    """Embed labelled ``samples``, read as :func:`~twincar.inference.collect_logits` reads them (unreadable ones
    left out), into an index searched with ``backend``."""
    resolve_backend(backend)  # faiss asked for but missing: said before anything is embedded
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
                          [str(samples[i].path) for i in kept], list(predictor.class_names), backend)


def knn_metrics(index: NeighbourIndex, queries: torch.Tensor, labels: torch.Tensor, prefix: str = "test/"
                ) -> dict[str, float]:
    """``{prefix}knn_acc``: the nearest indexed (training) image's class is the query's; ``{prefix}recall_at_1``:
    the nearest other query image is of the query's class (Recall@1 of metric learning)."""
    _, nearest = index.top_k(queries, 1)
    knn = float((index.labels[nearest[:, 0]] == labels).double().mean())
    _, other = top_k_similar(queries, queries, 1, exclude_self=True, backend=index.backend)
    recall = float((labels[other[:, 0]] == labels).double().mean())
    return {f"{prefix}knn_acc": knn, f"{prefix}recall_at_1": recall}
