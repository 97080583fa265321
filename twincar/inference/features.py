"""Feature-space unknown scores (numpy, no torch), for every engine: how much an image's embedding (the
L2-normalised pre-logit features of :meth:`twincar.inference.predictor.Predictor.embeddings`) looks like those of
the training images. Higher = more like a known class, as the logit scores of :mod:`twincar.inference.results`.

- ``knn`` (Sun et al., ICML 2022; OpenOOD's ``KNNPostprocessor``): the cosine similarity to the ``k``-th nearest
  training embedding. It needs the training embeddings themselves (the k-NN bank).
- ``mahalanobis`` (Lee et al., NeurIPS 2018; OpenOOD's ``MDSPostprocessor``): minus the smallest Mahalanobis distance
  to a class mean, with one covariance shared by the classes (of the class-centred training features).
- ``rel_mahalanobis`` (Ren et al., 2021; OpenOOD's ``RMDSPostprocessor``): minus the smallest class distance less the
  distance to the one Gaussian of all training features (the background), which removes what every image shares.

:func:`fit_feature_stats` fits these from the training embeddings; :class:`FeatureStats` holds them and is saved as
a small ``.npz`` of plain arrays (read with ``allow_pickle=False``: nothing unpickled) beside the model file
(:func:`twincar.models.card.write_unknown_stats`). Covariances are shrunk towards a multiple of the identity
(``shrinkage``): with fewer training images than feature dimensions the plain covariance is singular, and its
pseudo-inverse would ignore every direction the training images never vary in, which is where an image of no car
differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from twincar.errors import TwinCarError

FEATURE_SCORES = ("knn", "mahalanobis", "rel_mahalanobis")  # the scores that need embeddings and statistics
SHRINKAGE = 0.1  # share of the covariance replaced by (trace / D) * identity
CHUNK = 4096  # queries per similarity block of the k-NN score
ARRAYS = ("means", "precision", "background_mean", "background_precision")  # always in a statistics file


def default_k(images: int, classes: int) -> int:
    """The k of the ``knn`` score for a training set of ``images`` in ``classes`` classes: a tenth of the average
    class, between 1 and 50 (OpenOOD's K=50 is for 50,000 CIFAR images of 10 classes, a hundredth of a class of
    5,000; a fine-grained class has a few dozen images, and its nearest neighbours are what tells)."""
    return int(min(50, max(1, round(images / max(classes, 1) / 10))))


@dataclass
class FeatureStats:
    """What the feature scores need of the training embeddings (D-dimensional, L2-normalised)."""

    means: np.ndarray  # (C, D) class means
    precision: np.ndarray  # (D, D) inverse of the shared (shrunk) within-class covariance
    background_mean: np.ndarray  # (D,) mean of all training features
    background_precision: np.ndarray  # (D, D) inverse of their (shrunk) covariance
    bank: np.ndarray | None = None  # (N, D) the training embeddings (None: no knn score)
    k: int = 1  # the knn score's k

    def __post_init__(self):
        c, d = self.means.shape
        shapes = {"precision": (d, d), "background_mean": (d,), "background_precision": (d, d)}
        for name, shape in shapes.items():
            if getattr(self, name).shape != shape:
                raise TwinCarError(f"feature statistics: {name} is {getattr(self, name).shape}, not {shape}")
        if self.bank is not None and (self.bank.ndim != 2 or self.bank.shape[1] != d):
            raise TwinCarError(f"feature statistics: the k-NN bank is {self.bank.shape}, not (N, {d})")
        if self.k < 1:
            raise TwinCarError(f"feature statistics: k must be at least 1, got {self.k}")
        # float32 products with the D x D precisions (no float64 copies of them in memory), the rest in float64
        self.precision = np.ascontiguousarray(self.precision, np.float32)
        self.background_precision = np.ascontiguousarray(self.background_precision, np.float32)
        self._mu = self.means.astype(np.float64)
        self._mu_p_mu = np.einsum("cd,cd->c", self._mu, (self.means.astype(np.float32) @ self.precision).astype(
            np.float64))

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def classes(self) -> int:
        return int(self.means.shape[0])

    def scores(self, features: np.ndarray, score: str) -> np.ndarray:
        """(N,) float64 ``score`` (one of :data:`FEATURE_SCORES`) of (N, D) L2-normalised features."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise TwinCarError(f"the model's embeddings are {x.shape[-1]}-d but its unknown-score statistics are "
                               f"{self.dim}-d: they were fitted for another model (python -m twincar.calibrate "
                               "ckpt=MODEL fits them again)")
        if score == "knn":
            return self.knn(x)
        if score == "mahalanobis":
            return -self.class_distances(x).min(axis=1)
        if score == "rel_mahalanobis":
            return -(self.class_distances(x) - self.background_distances(x)[:, None]).min(axis=1)
        raise TwinCarError(f"unknown feature score {score!r}: use one of {', '.join(FEATURE_SCORES)}")

    def class_distances(self, x: np.ndarray) -> np.ndarray:
        """(N, C) squared Mahalanobis distances of features to each class mean, with the shared precision:
        ``x'Px - 2 (xP) mu_c + mu_c'P mu_c`` (P symmetric)."""
        xp = (x.astype(np.float32) @ self.precision).astype(np.float64)
        return np.einsum("nd,nd->n", xp, x)[:, None] - 2 * xp @ self._mu.T + self._mu_p_mu

    def background_distances(self, x: np.ndarray) -> np.ndarray:
        """(N,) squared Mahalanobis distances of features to the background Gaussian."""
        z = x - self.background_mean.astype(np.float64)
        return np.einsum("nd,nd->n", (z.astype(np.float32) @ self.background_precision).astype(np.float64), z)

    def knn(self, x: np.ndarray) -> np.ndarray:
        """(N,) cosine similarity of each feature row to its ``k``-th most similar bank row."""
        if self.bank is None:
            raise TwinCarError("the knn score needs the training embeddings, which these statistics do not keep: "
                               "python -m twincar.calibrate ckpt=MODEL keep_knn=true keeps them")
        x, k = x.astype(np.float32), min(self.k, len(self.bank))  # float32 products: cosines to 1e-7
        out = [np.partition(-(x[i:i + CHUNK] @ self.bank.T), k - 1, axis=1)[:, k - 1] for i in range(0, len(x), CHUNK)]
        return -np.concatenate(out).astype(np.float64) if out else np.empty(0)

    def arrays(self) -> dict[str, np.ndarray]:
        """The plain arrays a statistics file holds (float32; ``k`` a 0-d int64)."""
        out = {name: np.ascontiguousarray(getattr(self, name), np.float32) for name in ARRAYS}
        if self.bank is not None:
            out["bank"] = np.ascontiguousarray(self.bank, np.float32)
        out["k"] = np.asarray(self.k, np.int64)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], source: str = "the statistics") -> FeatureStats:
        """Statistics from :meth:`arrays` (read back from a file named ``source``); a missing array is one
        sentence."""
        missing = [name for name in (*ARRAYS, "k") if name not in arrays]
        if missing:
            raise TwinCarError(f"{source} lacks {', '.join(missing)}: it is not a TwinCar unknown-score statistics "
                               "file (python -m twincar.calibrate ckpt=MODEL writes one)")
        return cls(*(np.asarray(arrays[name], np.float32) for name in ARRAYS),
                   bank=np.asarray(arrays["bank"], np.float32) if "bank" in arrays else None, k=int(arrays["k"]))

    def without_bank(self) -> FeatureStats:
        """These statistics without the k-NN bank (the file to keep when ``knn`` is not the score in use)."""
        return FeatureStats(self.means, self.precision, self.background_mean, self.background_precision, None, self.k)


def shrunk_precision(centred: np.ndarray, shrinkage: float = SHRINKAGE) -> np.ndarray:
    """The inverse of ``(1 - s) * S + s * (trace(S) / D) * I``, ``S`` the covariance ``X'X / N`` of (N, D) centred
    rows."""
    x = np.asarray(centred, np.float64)
    cov = x.T @ x / max(len(x), 1)
    d = cov.shape[0]
    ridge = shrinkage * (np.trace(cov) / d if np.trace(cov) > 0 else 1.0)
    return np.linalg.inv((1 - shrinkage) * cov + ridge * np.eye(d))


def fit_feature_stats(features: np.ndarray, labels: np.ndarray, num_classes: int, *, k: int | None = None,
                      bank: bool = True, shrinkage: float = SHRINKAGE) -> FeatureStats:
    """Fit :class:`FeatureStats` to (N, D) L2-normalised training features and their labels (0..num_classes-1):
    class means (a class without images gets the mean of all), the shared within-class covariance, the background
    mean and covariance, and with ``bank`` the features themselves for ``knn`` (``k``: :func:`default_k` when None)."""
    x, y = np.asarray(features, np.float64), np.asarray(labels).astype(np.int64)
    if len(x) < 2 or len(x) != len(y):
        raise TwinCarError(f"the unknown-score statistics need at least 2 labelled training features, got {len(x)}")
    if not 0 < shrinkage <= 1 or not math.isfinite(shrinkage):
        raise TwinCarError(f"shrinkage must be in (0, 1], got {shrinkage}")
    background = x.mean(axis=0)
    counts = np.bincount(y, minlength=num_classes)[:num_classes]
    sums = np.zeros((num_classes, x.shape[1]))
    np.add.at(sums, y, x)
    means = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], background)
    return FeatureStats(means.astype(np.float32), shrunk_precision(x - means[y], shrinkage).astype(np.float32),
                        background.astype(np.float32), shrunk_precision(x - background, shrinkage).astype(np.float32),
                        bank=np.asarray(features, np.float32) if bank else None,
                        k=k if k is not None else default_k(len(x), num_classes))
