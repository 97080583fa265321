"""The nearest training cars: an exact nearest-neighbour index over :meth:`twincar.inference.predictor.Predictor.embed`
features (cosine similarity of L2-normalised pre-logit features), searched exactly: in torch (chunked matrix products)
or, with the ``faiss`` extra (``pip install 'twincar[faiss]'``), by faiss's exact inner-product index
(``IndexFlatIP``), faster on large indexes and never holding a whole similarity matrix. Both give the same neighbours.

:func:`build_index` embeds labelled samples (a training split), :meth:`NeighbourIndex.search` returns the ``k``
most similar for each query, :func:`knn_metrics` the embedding's own k-NN top-1 (queries against the index) and
Recall@1 (each query against the other queries, leave-one-out, as metric-learning papers report on Cars196).
An index is saved as ``index.safetensors`` (the embeddings and labels) and ``index.json`` (image paths, class names,
the search backend: ``auto`` is faiss when it is installed, else torch), with ``thumbnails.parquet`` (a small JPEG of
each image) when it was built with thumbnails: the demo then shows the nearest cars on any machine, a Space
included, without the training images.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from twincar.errors import TwinCarError
from twincar.files import atomic_path, write_json
from twincar.models.card import FINGERPRINT, check_fingerprint

log = logging.getLogger(__name__)

INDEX_TENSORS, INDEX_META, INDEX_THUMBNAILS = "index.safetensors", "index.json", "thumbnails.parquet"
THUMBNAIL_QUALITY = 85  # JPEG quality of the thumbnails an index keeps
CHUNK = 4096  # queries per similarity matrix block: memory is CHUNK x index size floats
BACKENDS = ("auto", "torch", "faiss")


def faiss_installed() -> bool:
    """Whether faiss (the ``faiss`` extra: faiss-cpu) can be imported (its loader's INFO lines about the CPU builds it
    tried, ``ModuleNotFoundError`` among them, are kept out of the user's log)."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
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
    thumbnails: list[bytes] | None = None  # a small JPEG of each image (None: the index keeps none)
    fingerprint: str | None = None  # the fingerprint of the model whose embeddings these are
    _faiss: object = field(default=None, init=False, repr=False, compare=False)  # the faiss index, built once
    _rows: dict | None = field(default=None, init=False, repr=False, compare=False)  # path -> row, built once

    def top_k(self, queries: torch.Tensor | np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarities, indices) of the ``k`` nearest indexed images of each query (:func:`top_k_similar`;
        ``queries`` as the Predictor's embeddings, numpy, or a tensor)."""
        queries = torch.as_tensor(queries)
        if queries.shape[1] != self.embeddings.shape[1]:
            raise TwinCarError(f"the model's embeddings are {queries.shape[1]}-d but the neighbour index holds "
                               f"{self.embeddings.shape[1]}-d ones: it was built with another model (rebuild it with "
                               "python -m twincar.index ckpt=MODEL)")
        if resolve_backend(self.backend) == "faiss" and self._faiss is None:
            self._faiss = flat_ip_index(self.embeddings)
        return top_k_similar(queries, self.embeddings, k, backend=self.backend, faiss_index=self._faiss)

    def searcher(self, k: int) -> Callable[[torch.Tensor | np.ndarray], list[list[tuple[str, str, float]]]]:
        """:meth:`search` for ``k`` neighbours, or every indexed image when the index holds fewer (one warning)."""
        if k > len(self.paths):
            log.warning("--neighbours %d is more than the %d images of the index: each answer gets those %d", k,
                        len(self.paths), len(self.paths))
            k = len(self.paths)
        return partial(self.search, k=k)

    def search(self, queries: torch.Tensor | np.ndarray, k: int = 3) -> list[list[tuple[str, str, float]]]:
        """Per query (rows of ``queries``, normalised embeddings): its ``k`` nearest indexed images as
        ``(path, class name, cosine similarity)``, most similar first."""
        sims, idx = self.top_k(queries, k)
        names = [self.class_names[int(label)] for label in self.labels]
        return [[(self.paths[j], names[j], s) for s, j in zip(srow, irow, strict=True)]
                for srow, irow in zip(sims.tolist(), idx.tolist(), strict=True)]

    def thumbnail(self, path: str) -> np.ndarray | None:
        """The (H, W, 3) uint8 thumbnail the index keeps of its image ``path`` (as :meth:`search` names it); None
        when it keeps none."""
        if not self.thumbnails:
            return None
        if self._rows is None:
            self._rows = {p: i for i, p in enumerate(self.paths)}
        row = self._rows.get(path)
        if row is None or not self.thumbnails[row]:
            return None
        from PIL import Image

        with Image.open(io.BytesIO(self.thumbnails[row])) as image:
            return np.asarray(image.convert("RGB"))

    def save(self, folder: str | Path) -> Path:
        """Write ``index.safetensors``, ``index.json`` and, with thumbnails, ``thumbnails.parquet`` into ``folder``
        (each atomically); returns the folder."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / INDEX_TENSORS) as tmp:
            save_file({"embeddings": self.embeddings.contiguous(), "labels": self.labels.long().contiguous()},
                      str(tmp))
        if self.thumbnails:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({"path": pa.array(self.paths, pa.string()),
                              "jpeg": pa.array(self.thumbnails, pa.binary())})
            with atomic_path(folder / INDEX_THUMBNAILS) as tmp:
                pq.write_table(table, tmp)
        else:
            (folder / INDEX_THUMBNAILS).unlink(missing_ok=True)  # an older index's, of other images
        write_json(folder / INDEX_META, {"paths": self.paths, "class_names": self.class_names, "backend": self.backend,
                                         "images": len(self.paths), "dim": int(self.embeddings.shape[1]),
                                         "thumbnails": bool(self.thumbnails), FINGERPRINT: self.fingerprint})
        return folder

    @classmethod
    def load(cls, folder: str | Path, class_names: Sequence[str] | None = None,
             fingerprint: str | None = None) -> NeighbourIndex:
        """An index written by :meth:`save` (safetensors: nothing unpickled); given the model's ``class_names``, an
        index built for other classes (another model, another holdout) is refused in one sentence, as is one whose
        files disagree (a build killed between them) or cannot be read; given the model's ``fingerprint``, one built
        with another model's embeddings (:func:`~twincar.models.card.check_fingerprint`)."""
        from safetensors.torch import load_file

        from twincar.data.classes import class_names_difference

        folder = Path(folder)
        rebuild = f"rebuild it with python -m twincar.index ckpt=MODEL out={folder}"
        if not (folder / INDEX_TENSORS).is_file() or not (folder / INDEX_META).is_file():
            raise TwinCarError(f"{folder} holds no neighbour index ({INDEX_TENSORS} + {INDEX_META}): build one with "
                               "python -m twincar.index ckpt=MODEL")
        try:
            tensors = load_file(str(folder / INDEX_TENSORS))
        except Exception as e:  # safetensors raises several types for a damaged file
            raise TwinCarError(f"{folder / INDEX_TENSORS} cannot be read ({str(e).strip().splitlines()[0]}): "
                               f"{rebuild}") from e
        try:
            meta = json.loads((folder / INDEX_META).read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise TwinCarError(f"{folder / INDEX_META} is not valid JSON ({e}): {rebuild}") from e
        if not (isinstance(meta, dict) and isinstance(meta.get("paths"), list)
                and isinstance(meta.get("class_names"), list)
                and {"embeddings", "labels"} <= set(tensors)):
            raise TwinCarError(f"{folder} is not a neighbour index TwinCar wrote (paths, class_names, embeddings, "
                               f"labels): {rebuild}")
        check_fingerprint(meta.get(FINGERPRINT), fingerprint, folder, rebuild)
        paths = list(meta["paths"])
        if not len(paths) == len(tensors["embeddings"]) == len(tensors["labels"]):
            raise TwinCarError(f"{folder}: {INDEX_META} names {len(paths)} images but {INDEX_TENSORS} holds "
                               f"{len(tensors['embeddings'])}: {rebuild}")
        if class_names is not None and (diff := class_names_difference(list(meta["class_names"]), list(class_names))):
            raise TwinCarError(f"{folder} was built for other classes than the model's ({diff}): {rebuild}")
        return cls(tensors["embeddings"], tensors["labels"], paths, list(meta["class_names"]),
                   str(meta.get("backend", "auto")), _load_thumbnails(folder / INDEX_THUMBNAILS, paths),
                   meta.get(FINGERPRINT))


def _load_thumbnails(path: Path, paths: list[str]) -> list[bytes] | None:
    """An index's thumbnails (None when it has none); a file that does not match its images is named and ignored."""
    if not path.is_file():
        return None
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["path", "jpeg"])
    except (OSError, pa.ArrowException) as e:
        log.warning("%s cannot be read (%s): the nearest cars are shown from their image files", path, e)
        return None
    if table.column("path").to_pylist() != paths:
        log.warning("%s is of other images than its index: the nearest cars are shown from their image files", path)
        return None
    return table.column("jpeg").to_pylist()


def thumbnail_image(rgb: np.ndarray, side: int):
    """A PIL image of an (H, W, 3) uint8 image (:mod:`twincar.data.images`), its longer side at most ``side``
    (never enlarged)."""
    from PIL import Image

    image = Image.fromarray(rgb)
    image.thumbnail((side, side), Image.Resampling.BILINEAR)
    return image


def thumbnail_jpeg(sample, side: int) -> bytes:
    """The JPEG bytes of a sample's thumbnail (:func:`thumbnail_image`); empty when it cannot be read."""
    from twincar.data.images import ImageReadError, load_sample

    try:
        image = thumbnail_image(load_sample(sample, min_side=side), side)
    except ImageReadError:
        return b""
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=THUMBNAIL_QUALITY)
    return buf.getvalue()


def build_index(predictor, samples: Sequence, *, batch_size: int = 64, bbox_margin: float | None = None,
                backend: str = "auto", thumbnails: int = 0) -> NeighbourIndex:
    """Embed labelled ``samples``, read as :func:`~twincar.inference.predictor.collect_logits` reads them (unreadable
    ones
    left out), into an index searched with ``backend``; ``thumbnails``: keep a JPEG of each image, its longer side
    that many pixels (0: none). An image is named by its path, or ``file.parquet#row``."""
    resolve_backend(backend)  # faiss asked for but missing: said before anything is embedded
    from twincar.data.images import sample_label
    from twincar.evaluation.loop import labelled_batches

    samples = list(samples)
    feats, kept = [], []
    for indices, images, _ in labelled_batches(predictor, samples, bbox_margin=bbox_margin, batch_size=batch_size):
        if images is not None:
            feats.append(torch.from_numpy(predictor.embeddings(images)))
            kept.extend(indices)
    if not kept:
        raise TwinCarError(f"none of the {len(samples)} images could be read to build the index")
    return NeighbourIndex(torch.cat(feats), torch.tensor([samples[i].label for i in kept]),
                          [sample_label(samples[i]) for i in kept], list(predictor.class_names), backend,
                          [thumbnail_jpeg(samples[i], thumbnails) for i in kept] if thumbnails > 0 else None,
                          predictor.fingerprint)


def knn_metrics(index: NeighbourIndex, queries: torch.Tensor, labels: torch.Tensor, prefix: str = "test/"
                ) -> dict[str, float]:
    """``{prefix}knn_acc``: the nearest indexed (training) image's class is the query's; ``{prefix}recall_at_1``:
    the nearest other query image is of the query's class (Recall@1 of metric learning)."""
    _, nearest = index.top_k(queries, 1)
    knn = float((index.labels[nearest[:, 0]] == labels).double().mean())
    _, other = top_k_similar(queries, queries, 1, exclude_self=True, backend=index.backend)
    recall = float((labels[other[:, 0]] == labels).double().mean())
    return {f"{prefix}knn_acc": knn, f"{prefix}recall_at_1": recall}


def index_folder(model: str | Path, index: str | Path | None = None) -> Path:
    """Where the neighbour index of ``model`` is: ``index``, else the ``index/`` folder beside the model file."""
    return Path(index) if index else Path(model).expanduser().parent / "index"


def find_index(model: str | Path, index: str | Path | None = None, class_names: Sequence[str] | None = None,
               fingerprint: str | None = None, *, required: bool = False) -> NeighbourIndex | None:
    """The neighbour index ``index`` names, or the ``index/`` folder beside ``model``; when neither is given and
    there is none beside the model, None (or, if ``required``, the one-sentence error of :meth:`NeighbourIndex.load`).
    Given the model's ``class_names`` (``fingerprint``), an index of other classes (of another model's embeddings)
    is refused."""
    folder = index_folder(model, index)
    if index is None and not required and not (folder / INDEX_META).is_file():
        return None
    return NeighbourIndex.load(folder, class_names, fingerprint)
