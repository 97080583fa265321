"""Predictor: the one inference object, over one of two engines. predict, eval, explain, the demo, the Space and
the ablation all go through here.

>>> from twincar import Predictor
>>> p = Predictor.load("outputs/runs/RUN/model.pth")  # model_card.json beside it gives classes and preprocessing
>>> r = p.predict("car.jpg")
>>> r.make, r.model, r.year, r.confidence
>>> rs = p.predict(["a.jpg", "b.png"], batch_size=32, num_workers=2)  # a list; unreadable files get ``error``

Every step but the engine is defined once, without torch: decode (:mod:`twincar.data.images`), resize and crop
(:mod:`twincar.inference.preprocess`), batches (:mod:`twincar.inference.batches`), flip TTA, temperature, unknown
score, top-k and the :class:`Prediction` (:mod:`twincar.inference.results`). The engine
(:mod:`twincar.inference.engines`) is a torch module on the CPU or a GPU, or an onnxruntime session:
``Predictor.load("model.onnx")`` is the torch-free runtime (numpy, PIL and onnxruntime; torch is never imported).

Calibration (:mod:`twincar.evaluation.calibration` fits it): a model file that carries a temperature ``T`` is
predicted with ``softmax(logits / T)``, so ``confidence`` is the calibrated probability; with an unknown threshold
too, an image whose unknown score is below it has ``known=False`` (not one of the model's classes) and keeps its
closest classes in ``topk``. Flip TTA averages the logits of the image and of its mirror image, then divides by
the temperature (:func:`~twincar.inference.results.flip_average`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from twincar.data.classes import parse_car_name
from twincar.data.preprocess import Preprocess
from twincar.errors import TwinCarError
from twincar.inference import batches
from twincar.inference.batches import Batch, BatchOutputs, source_name
from twincar.inference.engines import ModelError, OnnxEngine, TorchEngine
from twincar.inference.features import FEATURE_SCORES, FeatureStats
from twincar.inference.preprocess import ImageInput, input_preprocess, prepare
from twincar.inference.results import (
    DEFAULT_SCORE,
    SCORES,
    Prediction,
    check_calibration,
    check_tta,
    flip_average,
    predictions,
    unknown_scores,
    unknown_threshold,
)

log = logging.getLogger(__name__)


class Predictor:
    """A loaded classifier with its class names and preprocessing; predicts on files, PIL images, arrays or tensors.

    Args:
        model: the network (a torch module: it runs on a :class:`~twincar.inference.engines.TorchEngine`), or an
            engine (:class:`~twincar.inference.engines.OnnxEngine`, ``TorchEngine``); outputs logits over
            ``class_names``.
        class_names: one name per output.
        preprocess: what the model expects (a :class:`~twincar.data.preprocess.Preprocess` or a card's dict;
            None: the original TwinCars preprocessing).
        device, channels_last, precision: how a torch module runs (:class:`TorchEngine`); ``bf16`` is refused for
            an ONNX model (fp32 only).
        tta: ``"flip"`` averages the logits of the image and its mirror image; None (or ``"none"``) for one pass.
        calibration: the model's calibration (a :class:`~twincar.evaluation.calibration.Calibration` or its dict):
            its temperature divides the logits; None: raw softmax, no unknown answer.
        unknown: ``"auto"`` (the calibration's threshold, when it has one), ``"off"`` (every image is one of the
            classes) or a number: the threshold on the calibration's score (max-logit by default).
        unknown_score: the unknown score to use instead of the calibration's default (one of
            :data:`~twincar.inference.results.SCORES` it has a threshold for; None: its default).
        feature_stats: the training features' statistics the feature scores need
            (:class:`~twincar.inference.features.FeatureStats`; :meth:`load` reads the file the calibration names).
    """

    def __init__(self, model, class_names: Sequence[str], preprocess=None, *, device="auto",
                 channels_last: bool = True, precision: str = "fp32", tta: str | None = None,
                 calibration=None, unknown: str | float = "auto", unknown_score: str | None = None,
                 feature_stats: FeatureStats | None = None):
        self.tta = check_tta(tta)
        self.class_names = list(class_names)
        self.parsed = [parse_car_name(n) for n in self.class_names]  # make, model, year of each class
        self.preprocess = input_preprocess(preprocess)
        if isinstance(model, OnnxEngine) and precision == "bf16":
            raise TwinCarError("an ONNX model runs in fp32 only: use --precision fp32 or auto with a .onnx model")
        self.engine = model if isinstance(model, (OnnxEngine, TorchEngine)) else TorchEngine(
            model, self.preprocess, device=device, channels_last=channels_last, precision=precision)
        self.feature_stats = feature_stats
        self._fingerprint: str | None = None  # set by load; else computed from the torch network when asked
        self._set_calibration(calibration, unknown, unknown_score)

    @property
    def fingerprint(self) -> str | None:
        """The model's fingerprint (:func:`twincar.models.checkpoint.state_fingerprint`; an ONNX model's from its
        card, else of the file): what its neighbour index and predict's shards record."""
        if self._fingerprint is None and not self.is_onnx:
            from twincar.models.checkpoint import state_fingerprint

            self._fingerprint = state_fingerprint(self.engine.model.state_dict())
        return self._fingerprint

    def _set_calibration(self, calibration, unknown: str | float | None, unknown_score: str | None = None) -> None:
        """The temperature, the unknown score (``unknown_score``, None: the calibration's default) and its threshold
        (``unknown`` as ``--unknown`` takes it) of ``calibration``."""
        self.calibration = check_calibration(calibration.to_dict() if hasattr(calibration, "to_dict")
                                             else calibration)
        self.temperature = float(self.calibration["temperature"]) if self.calibration else 1.0
        self.score = unknown_score or (self.calibration or {}).get("score") or DEFAULT_SCORE
        check_unknown_score(self.score)
        self.unknown_threshold = unknown_threshold(unknown, self.calibration, self.tta, self.score)
        if self.unknown_threshold is not None and self.score in FEATURE_SCORES:
            if self.feature_stats is None:
                raise TwinCarError(f"the {self.score} unknown score needs the training features' statistics, which "
                                   "this model does not carry: python -m twincar.calibrate ckpt=MODEL fits them")
            if self.score == "knn" and self.feature_stats.bank is None:
                raise TwinCarError("the knn unknown score needs the training embeddings, which this model's "
                                   "statistics do not keep: python -m twincar.calibrate ckpt=MODEL keep_knn=true")
            if self.feature_stats.classes != len(self.class_names):
                raise TwinCarError(f"the unknown-score statistics are of {self.feature_stats.classes} classes but "
                                   f"the model has {len(self.class_names)}: they were fitted for another model")

    @property
    def needs_features(self) -> bool:
        """Whether the unknown answer needs the images' embeddings (a feature score with a threshold in use)."""
        return self.unknown_threshold is not None and self.score in FEATURE_SCORES

    # -- what runs it ----------------------------------------------------------------------------------------
    @property
    def is_onnx(self) -> bool:
        """True on the onnxruntime engine (no Grad-CAM: it needs the PyTorch weights; embeddings when the export has
        its ``features`` output)."""
        return self.engine.kind == "onnx"

    @property
    def model(self):
        """The torch network of a torch engine (Grad-CAM, Lightning); an ONNX model has none."""
        if self.is_onnx:
            raise TwinCarError("an ONNX model has no PyTorch network: use the .pth, .safetensors or .ckpt weights")
        return self.engine.model

    @property
    def device(self):
        """Where the network runs: a torch device, or ``"cpu"``/``"cuda"`` for onnxruntime."""
        return self.engine.device

    @property
    def autocast_dtype(self):
        """The torch engine's autocast dtype (None: fp32)."""
        return getattr(self.engine, "autocast_dtype", None)

    @classmethod
    def load(cls, path: str | Path, classes: str | Path | list[str] | None = None, *, device="auto",
             preprocess=None, architecture: str | None = None, image_size: int | None = None,
             resize_mode: str | None = None, threads: int | None = None, **kwargs) -> Predictor:
        """Load a ``.ckpt``, an exported ``.pth``/``.safetensors``/``.onnx`` (with its model card) or the original
        TwinCars ``.pth`` (then ``classes`` is needed; ``architecture`` is the timm name of a bare state dict,
        ``resnet50`` by default). ``preprocess`` replaces what the file says; ``image_size``/``resize_mode`` change
        one field of it. Other keywords go to :class:`Predictor`.

        An ``.onnx`` file runs on onnxruntime and imports no torch (``threads``: its intra-op threads). A bare
        ``model.pth`` takes the ``classes.txt`` beside it when ``classes`` is not given, and, without a model card
        but inside a training run, that run's architecture and preprocessing (its ``config.yaml``).
        ``local-dir:DIR`` and ``hf-hub:USER/REPO`` name a timm hub folder or repository (``export format=hf``)."""
        if str(path).endswith(".onnx"):
            engine, names, pre, calibration, fingerprint = _load_onnx(Path(path).expanduser(), classes, device,
                                                                      preprocess, image_size, resize_mode, threads)
            kwargs.setdefault("calibration", calibration)
            if kwargs.get("unknown", "auto") != "off":  # --unknown off needs no statistics file
                kwargs.setdefault("feature_stats", load_feature_stats(path, kwargs["calibration"], len(names)))
            predictor = cls(engine, names, pre, **kwargs)
            predictor._fingerprint = fingerprint
            return predictor
        from twincar.models.factory import min_input_size

        model, names, pre, calibration, arch, fingerprint = _load_torch(path, classes, preprocess, architecture)
        spec = input_preprocess(pre, image_size, resize_mode)
        smallest = min_input_size(model)
        if spec.image_size < smallest:
            raise TwinCarError(f"--img-size {spec.image_size} is smaller than {arch} takes: its features "
                               f"are {smallest}x smaller than the input, so give at least {smallest} pixels")
        kwargs.setdefault("calibration", calibration)
        if kwargs.get("unknown", "auto") != "off":  # --unknown off needs no statistics file
            kwargs.setdefault("feature_stats", load_feature_stats(resolved_source(path), kwargs["calibration"],
                                                                  len(names)))
        predictor = cls(model, names, spec, device=device, **kwargs)
        predictor._fingerprint = fingerprint
        return predictor

    def with_calibration(self, calibration, unknown: str | float = "auto", *, unknown_score: str | None = None,
                         feature_stats: FeatureStats | None = None) -> Predictor:
        """This predictor (same engine, no copy) with another calibration (and its ``feature_stats``, None: these):
        ``calibration`` None is raw softmax."""
        other = object.__new__(Predictor)
        other.__dict__.update(self.__dict__)
        if feature_stats is not None:
            other.feature_stats = feature_stats
        other._set_calibration(calibration, unknown, unknown_score)
        return other

    def to(self, device) -> Predictor:
        """Move a torch engine to ``device`` (in place: a process of a multi-process run takes its own GPU);
        ``precision="auto"`` is resolved again for it. Returns this predictor."""
        if self.is_onnx:
            raise TwinCarError("an ONNX model runs in one process on the device it was loaded for")
        self.engine.to(device)
        return self

    # -- the steps: per image, per batch, results -------------------------------------------------------------
    def prepare(self, image: ImageInput) -> np.ndarray:
        """Per-image work (decode, resize, crop): an (S, S, 3) ``uint8`` array. Safe in DataLoader workers.

        A large JPEG is decoded at reduced size (never below what the resize needs)."""
        return prepare(image, self.preprocess)

    def outputs(self, batch) -> tuple[np.ndarray, np.ndarray]:
        """``(raw, calibrated)`` float32 logits (N, K) of one forward pass over a ``uint8`` (N, S, S, 3) batch of
        prepared images: ``raw`` at temperature 1 (what the unknown score and ``ece_raw`` use), ``calibrated``
        divided by the temperature (their softmax is the calibrated probability); with flip TTA both averaged over
        the image and its mirror image first."""
        out, _ = self.engine.run(batch, self.tta == "flip")
        return flip_average(out, 1.0, self.tta), flip_average(out, self.temperature, self.tta)

    def logits(self, batch) -> np.ndarray:
        """The calibrated logits (N, K) of :meth:`outputs`."""
        return self.outputs(batch)[1]

    def outputs_with_embeddings(self, batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(raw, calibrated, embeddings)``: :meth:`outputs` and :meth:`embeddings` of ONE forward pass."""
        out, feats = self.engine.run(batch, self.tta == "flip", embeddings=True)
        return flip_average(out, 1.0, self.tta), flip_average(out, self.temperature, self.tta), self._normalised(feats)

    def embeddings(self, batch) -> np.ndarray:
        """L2-normalised pre-logit features (N, D) float32 of a ``uint8`` batch of prepared images (timm's
        ``forward_head(forward_features(x), pre_logits=True)``); with flip TTA the normalised mean of the image's
        and its mirror image's. The torch engine, or an ONNX export with its ``features`` output."""
        return self.outputs_with_embeddings(batch)[2]

    def _normalised(self, feats: np.ndarray) -> np.ndarray:
        def unit(x: np.ndarray) -> np.ndarray:
            return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))

        if self.tta == "flip":
            feats = sum(np.split(unit(feats), 2))
        return unit(feats).astype(np.float32, copy=False)

    def embed(self, images: ImageInput | Iterable[ImageInput], *, batch_size: int = 32,
              num_workers: int = 0) -> np.ndarray:
        """L2-normalised pre-logit features (N, D) of images, input order (:meth:`embeddings`); an unreadable input
        is an error naming it."""
        items = [images] if _single(images) else list(images)
        out = []
        for _, batch, errors in self.prepared_batches(items, batch_size=batch_size, num_workers=num_workers):
            if errors:
                raise TwinCarError(f"cannot embed an image: {next(iter(errors.values()))}")
            out.append(self.embeddings(batch))
        return np.concatenate(out) if out else np.empty((0, 0), np.float32)

    def unknown_scores(self, raw_logits, features=None, score: str | None = None) -> np.ndarray:
        """(N,) unknown scores (``score``, None: the one in use) of raw logits (:meth:`outputs`' first) and, for a
        feature score, the images' embeddings, higher = more like a known class."""
        return unknown_scores(np.asarray(raw_logits), score or self.score, self.temperature,
                              features=None if features is None else np.asarray(features), stats=self.feature_stats)

    def results(self, logits, sources: Sequence[str], topk: int = 5, scores=None) -> list[Prediction]:
        """Turn (calibrated) logits into :class:`Prediction` objects (top-k names and probabilities, make/model/year);
        with the images' unknown ``scores`` and a threshold in use, ``known`` and ``unknown_score`` too."""
        return predictions(np.asarray(logits), sources, self.class_names, topk,
                           scores=None if scores is None else np.asarray(scores), threshold=self.unknown_threshold,
                           parsed=self.parsed)

    def inputs(self, images: Sequence[ImageInput]) -> batches.Numbered:
        """The inputs as numbered items, each :meth:`prepare`\\ d when taken (in a DataLoader worker): ``(uint8
        image, i)``, or ``(None, (i, message))`` when input ``i`` cannot be read."""
        return batches.inputs(images, self.preprocess)

    def prepared_batches(self, images: Sequence[ImageInput], *, batch_size: int = 32,
                         num_workers: int = 0) -> Iterator[Batch]:
        """:meth:`prepare` every input in batches: ``(indices of the readable inputs, their uint8 batch or None,
        {index: message} of the others)``. The torch engine decodes in ``num_workers`` DataLoader processes (0:
        here); the ONNX engine in this process, without torch."""
        return self.batches(self.inputs(images), batch_size=batch_size, num_workers=num_workers)

    def batches(self, items: batches.Numbered, *, batch_size: int, num_workers: int = 0) -> Iterator[Batch]:
        """:func:`~twincar.inference.batches.iter_batches` of numbered items as this engine takes them: the torch
        engine's in ``num_workers`` DataLoader processes (pinned for a GPU), the ONNX engine's in this process,
        without torch."""
        return batches.iter_batches(items, batch_size=batch_size, num_workers=None if self.is_onnx else num_workers,
                                    pin_memory=not self.is_onnx and self.device.type == "cuda")

    def batch_outputs(self, batch: Batch, *, embeddings: bool = False) -> BatchOutputs:
        """One forward pass over a batch of :meth:`prepared_batches` (or of a distributed sampler's share): the raw
        and calibrated logits (and with ``embeddings`` the L2-normalised pre-logit features of the same pass) of its
        readable images."""
        indices, images, errors = batch
        if not indices:
            return BatchOutputs(indices, None, None, errors)
        if embeddings or self.needs_features:
            raw, calibrated, features = self.outputs_with_embeddings(images)
            return BatchOutputs(indices, raw, calibrated, errors, features)
        raw, calibrated = self.outputs(images)
        return BatchOutputs(indices, raw, calibrated, errors)

    def batch_predictions(self, out: BatchOutputs, images: Sequence[ImageInput], topk: int = 5,
                          neighbours: Callable[[np.ndarray], list] | None = None) -> list[Prediction]:
        """The :class:`Prediction` of every input of one batch, readable or not, in index order; ``images[i]`` is
        input ``i`` (it names the results). An unreadable one has ``error`` set (and is named in a warning).
        ``neighbours``: embeddings -> each one's nearest training images (``partial(NeighbourIndex.search, k=3)``;
        the batch outputs must carry embeddings)."""
        done = {}
        if out.indices:
            scores = self.unknown_scores(out.raw, out.embeddings) if self.unknown_threshold is not None else None
            sources = [source_name(images[i]) for i in out.indices]
            done = dict(zip(out.indices, self.results(out.calibrated, sources, topk, scores), strict=True))
            if neighbours is not None:
                for i, near in zip(out.indices, neighbours(out.embeddings), strict=True):
                    done[i].neighbours = near
        for i, message in out.errors.items():
            log.warning("skipping unreadable image: %s", message)
            done[i] = Prediction(source=source_name(images[i]), error=message)
        return [done[i] for i in sorted(done)]

    def iter_predict(self, images: Sequence[ImageInput], *, batch_size: int = 32, topk: int = 5,
                     num_workers: int = 0, neighbours: Callable[[np.ndarray], list] | None = None
                     ) -> Iterator[Prediction]:
        """Yield one :class:`Prediction` per input, in input order, batch by batch.

        Decoding and resizing run in ``num_workers`` DataLoader processes (0: in this process; the ONNX engine
        always here). An unreadable file yields a Prediction with ``error`` set (and a warning); the rest of its
        batch goes on. ``neighbours``: as :meth:`batch_predictions` takes it (the embeddings come from the same
        decoded batch)."""
        for batch in self.prepared_batches(images, batch_size=batch_size, num_workers=num_workers):
            out = self.batch_outputs(batch, embeddings=neighbours is not None)
            yield from self.batch_predictions(out, images, topk, neighbours)

    def predict(self, images: ImageInput | Iterable[ImageInput], *, batch_size: int = 32, topk: int = 5,
                num_workers: int = 0) -> Prediction | list[Prediction]:
        """Predict one image (returns a :class:`Prediction`) or many (returns a list, input order).

        An unreadable file gives a Prediction with ``error`` set; the others are still predicted.
        """
        single = _single(images)
        items = [images] if single else list(images)
        results = list(self.iter_predict(items, batch_size=batch_size, topk=topk, num_workers=num_workers))
        return results[0] if single else results


def _single(images) -> bool:
    """True for one input (a path, a PIL image, an array or a tensor), False for a collection of them."""
    return isinstance(images, (str, Path, Image.Image, np.ndarray)) or type(images).__module__.startswith("torch")


def check_unknown_score(score: str) -> None:
    """A name that is not an unknown score is one sentence."""
    from twincar.inference.results import SCORES

    if score not in SCORES:
        raise TwinCarError(f"--unknown-score {score} is not an unknown score: use one of {', '.join(SCORES)}")


def resolved_source(path) -> Path:
    """The weights file of a model argument (``local-dir:``/``hf-hub:`` resolved; a path as it is)."""
    if str(path).startswith(("local-dir:", "hf-hub:")):
        from twincar.models.loading import resolve_model_source

        return resolve_model_source(path)
    return Path(path).expanduser()


def load_feature_stats(path, calibration, num_classes: int) -> FeatureStats | None:
    """The training features' statistics that ``calibration`` (of the model file at ``path``) names, checked
    against it (:func:`twincar.models.card.read_unknown_stats`); None when it names none."""
    from twincar.models.card import read_unknown_stats

    calibration = calibration.to_dict() if hasattr(calibration, "to_dict") else calibration
    arrays = read_unknown_stats(path, calibration, num_classes)
    return None if arrays is None else FeatureStats.from_arrays(arrays, str(path))


def _load_torch(path, classes, preprocess, architecture: str | None) -> tuple:
    """``(network, class names, preprocess, calibration, architecture)`` of a torch model file
    (:func:`twincar.models.loading.load_model`; torch is imported here). A bare weights file takes the ``classes.txt``
    beside it, and inside a training run that run's architecture and preprocessing."""
    from twincar.models.card import MODEL_CARD
    from twincar.models.loading import load_model, resolve_model_source

    path = resolve_model_source(path)
    if path.suffix != ".ckpt" and not (path.parent / MODEL_CARD).is_file():
        if classes is None and (path.parent / "classes.txt").is_file():
            classes = path.parent / "classes.txt"
        run_arch, run_pre = _run_model_config(path)
        architecture = architecture or run_arch
        preprocess = preprocess or run_pre
    loaded = load_model(path, classes, architecture=architecture, preprocess=preprocess, scores=SCORES)
    return (loaded.model, loaded.class_names, loaded.preprocess, loaded.calibration, loaded.architecture,
            loaded.fingerprint)


def _run_model_config(path: Path) -> tuple[str | None, object]:
    """The architecture and preprocessing of the training run a bare weights file sits in (None when unknown)."""
    from omegaconf import OmegaConf

    from twincar.data.preprocess import Preprocess
    from twincar.runs import find_run_config

    run_config = find_run_config(path)
    if run_config is None:
        return None, None
    run = OmegaConf.load(run_config)
    size, crop = OmegaConf.select(run, "data.image_size"), OmegaConf.select(run, "data.eval_crop_pct", default=0.875)
    preprocess = Preprocess(image_size=int(size), eval_crop_pct=float(crop)) if size else None
    return OmegaConf.select(run, "model.name"), preprocess


def _load_onnx(path: Path, classes, device, preprocess, image_size: int | None, resize_mode: str | None,
               threads: int | None) -> tuple[OnnxEngine, list[str], Preprocess, dict | None, str]:
    """An ``.onnx`` export, its class names, preprocessing, calibration and fingerprint, from its model card
    (checked as the PyTorch loader checks it) and a ``NAME.calibration.json`` sidecar (:mod:`twincar.models.card`,
    torch-free); numpy, PIL and onnxruntime only."""
    from twincar.models.card import (
        FINGERPRINT,
        file_fingerprint,
        model_class_names,
        read_calibration,
        read_model_card,
    )

    if not path.is_file():
        raise ModelError(f"model file {path} does not exist: give the path of an exported .onnx model")
    card = read_model_card(path, SCORES)
    spec = input_preprocess(preprocess or card.get("preprocess"), image_size, resize_mode)
    engine = OnnxEngine(path, spec, device=device, threads=threads)
    if engine.image_size not in (None, spec.image_size):
        raise ModelError(f"{path} takes {engine.image_size}x{engine.image_size} inputs, not {spec.image_size}: "
                         "leave --img-size out for this ONNX model")
    names = model_class_names(path, card.get("class_names"), classes, engine.num_outputs)
    fingerprint = card.get(FINGERPRINT) or file_fingerprint(path)
    return engine, names, spec, read_calibration(path, card, SCORES, fingerprint), fingerprint
