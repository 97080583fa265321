"""Predictor: the one inference object, and the one loop over labelled images. predict, eval, explain, the
demo and the ablation all go through here.

>>> from twincar import Predictor
>>> p = Predictor.load("outputs/runs/RUN/model.pth")  # model_card.json beside it gives classes and preprocessing
>>> r = p.predict("car.jpg")
>>> r.make, r.model, r.year, r.confidence
>>> rs = p.predict(["a.jpg", "b.png"], batch_size=32, num_workers=2)  # a list; unreadable files get ``error``

Loading goes through :func:`twincar.models.loading.load_model` (safe: no unpickling) and preprocessing through
:mod:`twincar.data.transforms` (the same eval transform as validation). Evaluation runs its images through
:func:`collect_logits`, which calls the same :meth:`Predictor.prepare` decode and :meth:`Predictor.logits`, so
a prediction here equals what evaluation computes for the same file, flip TTA included.

Calibration (:mod:`twincar.evaluation.calibration`): a model file that carries a temperature ``T`` (from the end of
training
or ``python -m twincar.calibrate``) is predicted with ``softmax(logits / T)``, so ``confidence`` is the calibrated
probability; with an unknown threshold too, an image whose unknown score is below it has ``known=False`` (not one of
the model's classes) and keeps its closest classes in ``topk``.

Flip TTA (``tta="flip"``), the one definition: the logits of the image and of its mirror image are averaged, then
divided by the temperature. Averaging logits (not probabilities) keeps calibration exact: the temperature divides the
averaged logits as it divides one view's, so it never changes the top-1, and the unknown score keeps its scale.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from twincar.data.classes import parse_car_name
from twincar.data.preprocess import Preprocess
from twincar.data.transforms import BatchTransform, EvalImageTransform
from twincar.errors import TwinCarError
from twincar.evaluation.calibration import Calibration
from twincar.inference.batches import Batch, BatchOutputs, ImageInput, _Inputs, iter_batches, prepare_image, source_name
from twincar.inference.engines import TTA_MODES, resolve_device, resolve_precision
from twincar.inference.runtime import Prediction, unknown_threshold  # shared with the torch-free runtime
from twincar.models.card import MODEL_CARD
from twincar.models.factory import min_input_size
from twincar.models.loading import LoadedModel, OnnxModule, load_model, resolve_model_source
from twincar.runs import find_run_config

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)




class Predictor:
    """A loaded classifier with its class names and preprocessing; predicts on files, PIL images or tensors.

    Args:
        model: the network (eval mode is set here); outputs logits over ``class_names``.
        class_names: one name per output.
        preprocess: what the model expects (size, resize mode, mean/std).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        channels_last: run convolutions in channels-last memory format (faster on CPU and GPU).
        precision: ``fp32`` (exact), ``bf16`` (autocast) or ``auto`` (bf16 where the hardware has it natively,
            see :func:`resolve_precision`). An ONNX model always runs in fp32.
        tta: ``"flip"`` averages the logits of the image and its mirror image (see the module's
            docstring); None (or ``"none"``) for one pass.
        calibration: the model's :class:`~twincar.evaluation.calibration.Calibration` (or its dict): its temperature
        divides
            the logits; None: raw softmax, no unknown answer.
        unknown: ``"auto"`` (the calibration's threshold, when it has one), ``"off"`` (every image is one of the
            classes) or a number: the threshold on the calibration's score (max-logit by default).
    """

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str],
        preprocess: Preprocess,
        *,
        device: str | torch.device = "auto",
        channels_last: bool = True,
        precision: str = "fp32",
        tta: str | None = None,
        calibration: Calibration | dict | None = None,
        unknown: str | float = "auto",
    ):
        if tta not in TTA_MODES:
            raise TwinCarError(f"--tta must be 'flip' or left out, got {tta!r}")
        self.device = resolve_device(device)
        self.class_names = list(class_names)
        self.preprocess = preprocess
        self.tta = None if tta == "none" else tta
        self.is_onnx = isinstance(model, OnnxModule)
        self.channels_last = channels_last and not self.is_onnx  # onnxruntime takes NCHW: no copy there and back
        self.precision = precision
        self.autocast_dtype = resolve_precision(precision, self.device)
        if self.is_onnx:
            if precision == "bf16":
                raise TwinCarError("an ONNX model runs in fp32 only: use --precision fp32 or auto with a .onnx model")
            self.autocast_dtype = None
        self.model = model.eval().to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.image_transform = EvalImageTransform(preprocess)  # per image: resize + crop, uint8
        self.batch_transform = BatchTransform(preprocess).to(self.device)  # per batch: float + normalise
        self.parsed = [parse_car_name(n) for n in self.class_names]
        self._set_calibration(calibration, unknown)

    def _set_calibration(self, calibration: Calibration | dict | None, unknown: str | float | None) -> None:
        """The temperature and the unknown threshold (``unknown`` as ``--unknown`` takes it) of ``calibration``."""
        self.calibration = calibration if isinstance(calibration, Calibration) else Calibration.from_dict(calibration)
        self.temperature = self.calibration.temperature if self.calibration else 1.0
        self.unknown_threshold = unknown_threshold(unknown, self.calibration and self.calibration.to_dict(), self.tta)

    @property
    def score(self) -> str:
        """The unknown score in use (:data:`twincar.evaluation.calibration.SCORES`)."""
        return self.calibration.score if self.calibration else "max_logit"

    def unknown_scores(self, raw_logits: torch.Tensor) -> torch.Tensor:
        """(N,) unknown scores of raw logits (:meth:`outputs`' first), higher = more like a known class."""
        return (self.calibration or Calibration()).scores(raw_logits)

    @classmethod
    def load(
        cls,
        path: str | Path,
        classes: str | Path | list[str] | None = None,
        *,
        device: str | torch.device = "auto",
        preprocess: Preprocess | None = None,
        architecture: str | None = None,
        image_size: int | None = None,
        resize_mode: str | None = None,
        **kwargs,
    ) -> Predictor:
        """Load a ``.ckpt``, an exported ``.pth``/``.safetensors``/``.onnx`` (with its model card) or the original
        TwinCars ``.pth`` (then ``classes`` is needed; ``architecture`` is the timm name of a bare state dict,
        ``resnet50`` by default). ``preprocess`` replaces what the file says;
        ``image_size``/``resize_mode`` change one field of it. Other keywords go to :class:`Predictor`.

        A bare ``model.pth`` takes the ``classes.txt`` beside it when ``classes`` is not given, and, without a
        model card but inside a training run, that run's architecture and preprocessing (its ``config.yaml``).
        ``local-dir:DIR`` and ``hf-hub:USER/REPO`` name a timm hub folder or repository (``export format=hf``)."""
        path = resolve_model_source(path)
        if path.suffix not in (".ckpt", ".onnx") and not (path.parent / MODEL_CARD).is_file():
            if classes is None and (path.parent / "classes.txt").is_file():
                classes = path.parent / "classes.txt"
            run_arch, run_pre = _run_model_config(path)
            architecture = architecture or run_arch
            preprocess = preprocess or run_pre
        loaded: LoadedModel = load_model(path, classes, architecture=architecture, preprocess=preprocess)
        pre = loaded.preprocess
        if image_size is not None and image_size < 1:
            raise TwinCarError(f"--img-size must be a positive number of pixels, got {image_size}")
        if image_size is not None or resize_mode is not None:
            try:
                pre = replace(pre, image_size=pre.image_size if image_size is None else image_size,
                              resize_mode=resize_mode or pre.resize_mode)
            except ValueError as e:
                raise TwinCarError(f"--resize-mode: {e}") from e
        if isinstance(loaded.model, OnnxModule) and loaded.model.image_size not in (None, pre.image_size):
            raise TwinCarError(
                f"{path} takes {loaded.model.image_size}x{loaded.model.image_size} inputs, not {pre.image_size}: "
                "leave --img-size out for this ONNX model"
            )
        smallest = min_input_size(loaded.model)
        if pre.image_size < smallest:
            raise TwinCarError(f"--img-size {pre.image_size} is smaller than {loaded.architecture} takes: its features "
                               f"are {smallest}x smaller than the input, so give at least {smallest} pixels")
        kwargs.setdefault("calibration", loaded.calibration)
        return cls(loaded.model, loaded.class_names, pre, device=device, **kwargs)

    # -- the three steps: per image, per batch, results ---------------------------------------
    def with_calibration(self, calibration: Calibration | dict | None, unknown: str | float = "auto") -> Predictor:
        """This predictor (same network, no copy) with another calibration: ``calibration`` None is raw softmax."""
        other = object.__new__(Predictor)
        other.__dict__.update(self.__dict__)
        other._set_calibration(calibration, unknown)
        return other

    def to(self, device: str | torch.device) -> Predictor:
        """Move the network and the batch transform to ``device`` (in place: a process of a multi-process run
        takes its own GPU); ``precision="auto"`` is resolved again for it. Returns this predictor."""
        if self.is_onnx:
            raise TwinCarError("an ONNX model runs in one process on the device it was loaded for")
        self.device = torch.device(device)
        self.model.to(self.device)
        self.batch_transform.to(self.device)
        self.autocast_dtype = resolve_precision(self.precision, self.device)
        return self

    def prepare(self, image: ImageInput) -> torch.Tensor:
        """Per-image work (decode, resize, crop): a ``uint8`` (3, S, S) tensor. Safe in DataLoader workers.

        A large JPEG is decoded at reduced size (never below what the resize needs: ``load_rgb(min_side=)``)."""
        return prepare_image(image, self.image_transform, self.preprocess.decode_min_side)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Calibrated logits (N, K) in float32 on the CPU for a ``uint8`` batch (N, 3, S, S) of prepared images:
        the network's divided by the temperature (1 when the model carries none), so their softmax is the
        calibrated probability.

        With ``tta="flip"`` the logits of the image and its mirror image are averaged first (:func:`flip_average`).
        """
        return self.outputs(batch)[1]

    def _run(self, batch: torch.Tensor, network) -> torch.Tensor:
        """``network`` on a ``uint8`` batch as the model takes it: normalised on the device, with its mirror
        images after it under flip TTA, channels-last, under the autocast of ``precision``; float32."""
        x = self.batch_transform(batch.to(self.device, non_blocking=True))
        if self.tta == "flip":
            x = torch.cat([x, x.flip(3)])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            return network(x).float()

    @torch.inference_mode()
    def outputs(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(raw, calibrated)`` logits (N, K) of one forward pass: ``raw`` at temperature 1 (what the unknown
        score and ``ece_raw`` use), ``calibrated`` as :meth:`logits` returns them."""
        out = self._run(batch, self.model).cpu()
        return flip_average(out, 1.0, self.tta), flip_average(out, self.temperature, self.tta)

    @torch.inference_mode()
    def embeddings(self, batch: torch.Tensor) -> torch.Tensor:
        """L2-normalised pre-logit features (N, D), float32 on the CPU, of a ``uint8`` batch of prepared images:
        timm's ``forward_head(forward_features(x), pre_logits=True)`` (after global pooling); with flip TTA the
        normalised mean of the image's and its mirror image's."""
        self._check_embeddings()
        feats = self._run(batch, lambda x: self.model.forward_head(self.model.forward_features(x), pre_logits=True))
        return self._normalised(feats.flatten(1))

    @torch.inference_mode()
    def outputs_with_embeddings(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(raw, calibrated, embeddings)``: :meth:`outputs` and :meth:`embeddings` of ONE forward pass (the
        backbone's ``forward_features`` once; the head and the pre-logit features both from them)."""
        self._check_embeddings()

        def network(x: torch.Tensor) -> torch.Tensor:
            features = self.model.forward_features(x)
            pre_logits = self.model.forward_head(features, pre_logits=True).flatten(1)
            return torch.cat([self.model.forward_head(features), pre_logits], dim=1)

        out = self._run(batch, network).cpu()
        logits, feats = out[:, :len(self.class_names)], out[:, len(self.class_names):]
        return (flip_average(logits, 1.0, self.tta), flip_average(logits, self.temperature, self.tta),
                self._normalised(feats))

    def _check_embeddings(self) -> None:
        if self.is_onnx or not hasattr(self.model, "forward_head"):
            raise TwinCarError("embeddings need a PyTorch timm model (.ckpt, .pth or .safetensors), not ONNX")

    def _normalised(self, feats: torch.Tensor) -> torch.Tensor:
        """L2-normalised features on the CPU; with flip TTA, the normalised mean of each image's two views."""
        if self.tta == "flip":
            feats = sum(torch.nn.functional.normalize(feats, dim=1).chunk(2))
        return torch.nn.functional.normalize(feats, dim=1).cpu()

    def embed(self, images: ImageInput | Iterable[ImageInput], *, batch_size: int = 32,
              num_workers: int = 0) -> torch.Tensor:
        """L2-normalised pre-logit features (N, D) of images (paths, PIL images or tensors), input order
        (:meth:`embeddings`); an unreadable input is an error naming it."""
        single = isinstance(images, (str, Path, Image.Image, torch.Tensor))
        items = [images] if single else list(images)
        out = []
        for _, batch, errors in self.prepared_batches(items, batch_size=batch_size, num_workers=num_workers):
            if errors:
                raise TwinCarError(f"cannot embed an image: {next(iter(errors.values()))}")
            out.append(self.embeddings(batch))
        return torch.cat(out) if out else torch.empty(0, 0)

    def results(self, logits: torch.Tensor, sources: Sequence[str], topk: int = 5,
                scores: torch.Tensor | None = None) -> list[Prediction]:
        """Turn (calibrated) logits into :class:`Prediction` objects (top-k names and probabilities, make/model/year);
        with the images' unknown ``scores`` and a threshold in use, ``known`` and ``unknown_score`` too."""
        probs = logits.float().softmax(dim=1)
        k = min(topk, probs.shape[1])
        top_p, top_i = probs.topk(k, dim=1)
        threshold = self.unknown_threshold if scores is not None else None
        score_list = scores.tolist() if threshold is not None else [None] * len(sources)
        out = []
        for src, ps, idx, score in zip(sources, top_p.tolist(), top_i.tolist(), score_list, strict=True):
            car = self.parsed[idx[0]]
            out.append(Prediction(
                source=src, name=car.full, label=idx[0], confidence=ps[0], make=car.make, model=car.model,
                year=car.year, topk=[(self.class_names[i], p) for i, p in zip(idx, ps, strict=True)],
                known=score is None or score >= threshold, unknown_score=score, num_classes=len(self.class_names),
            ))
        return out

    def prepared_batches(
        self, images: Sequence[ImageInput], *, batch_size: int = 32, num_workers: int = 0
    ) -> Iterator[Batch]:
        """:meth:`prepare` every input, in ``num_workers`` DataLoader processes (0: here), in batches:
        ``(indices of the readable inputs, their uint8 batch or None, {index: message} of the others)``."""
        return iter_batches(self.inputs(images), batch_size=batch_size, num_workers=num_workers,
                            pin_memory=self.device.type == "cuda")

    def inputs(self, images: Sequence[ImageInput]) -> Dataset:
        """The inputs as numbered items, each :meth:`prepare`\ d in ``__getitem__`` (a DataLoader worker):
        ``(uint8 image, i)``, or ``(None, (i, message))`` when input ``i`` cannot be read."""
        return _Inputs(images, self.image_transform, self.preprocess.decode_min_side)

    def batch_outputs(self, batch: Batch, *, embeddings: bool = False) -> BatchOutputs:
        """One forward pass over a batch of :meth:`prepared_batches` (or of a distributed sampler's share): the raw
        and calibrated logits (and with ``embeddings`` the L2-normalised pre-logit features, from the same pass:
        :meth:`outputs_with_embeddings`) of its readable images."""
        indices, images, errors = batch
        if not indices:
            return BatchOutputs(indices, None, None, errors)
        if embeddings:
            raw, calibrated, features = self.outputs_with_embeddings(images)
            return BatchOutputs(indices, raw, calibrated, errors, features)
        raw, calibrated = self.outputs(images)
        return BatchOutputs(indices, raw, calibrated, errors)

    def batch_predictions(self, out: BatchOutputs, images: Sequence[ImageInput], topk: int = 5,
                          neighbours: Callable[[torch.Tensor], list] | None = None) -> list[Prediction]:
        """The :class:`Prediction` of every input of one batch, readable or not, in index order; ``images[i]`` is
        input ``i`` (it names the results). An unreadable one has ``error`` set (and is named in a warning).
        ``neighbours``: embeddings -> each one's nearest training images (``partial(NeighbourIndex.search, k=3)``;
        the batch outputs must carry embeddings)."""
        done = {}
        if out.indices:
            scores = self.unknown_scores(out.raw) if self.unknown_threshold is not None else None
            sources = [source_name(images[i]) for i in out.indices]
            done = dict(zip(out.indices, self.results(out.calibrated, sources, topk, scores), strict=True))
            if neighbours is not None:
                for i, near in zip(out.indices, neighbours(out.embeddings), strict=True):
                    done[i].neighbours = near
        for i, message in out.errors.items():
            log.warning("skipping unreadable image: %s", message)
            done[i] = Prediction(source=source_name(images[i]), error=message)
        return [done[i] for i in sorted(done)]

    def iter_predict(
        self, images: Sequence[ImageInput], *, batch_size: int = 32, topk: int = 5, num_workers: int = 0,
        neighbours: Callable[[torch.Tensor], list] | None = None,
    ) -> Iterator[Prediction]:
        """Yield one :class:`Prediction` per input, in input order, batch by batch.

        Decoding and resizing run in ``num_workers`` DataLoader processes (0: in this process). An unreadable
        file yields a Prediction with ``error`` set (and a warning); the rest of its batch goes on.
        ``neighbours``: as :meth:`batch_predictions` takes it (the embeddings come from the same decoded batch).
        """
        for batch in self.prepared_batches(images, batch_size=batch_size, num_workers=num_workers):
            out = self.batch_outputs(batch, embeddings=neighbours is not None)
            yield from self.batch_predictions(out, images, topk, neighbours)

    def predict(
        self, images: ImageInput | Iterable[ImageInput], *, batch_size: int = 32, topk: int = 5, num_workers: int = 0
    ) -> Prediction | list[Prediction]:
        """Predict one image (returns a :class:`Prediction`) or many (returns a list, input order).

        An unreadable file gives a Prediction with ``error`` set; the others are still predicted.
        """
        single = isinstance(images, (str, Path, Image.Image, torch.Tensor))
        items = [images] if single else list(images)
        results = list(self.iter_predict(items, batch_size=batch_size, topk=topk, num_workers=num_workers))
        return results[0] if single else results


def flip_average(out: torch.Tensor, temperature: float, tta: str | None) -> torch.Tensor:
    """The network's outputs (N, K), or (2N, K) with flip TTA (images, then mirror images: averaged), divided by
    ``temperature``."""
    if tta == "flip":
        plain, flipped = out.chunk(2)
        out = (plain + flipped) / 2
    return out / temperature if temperature != 1.0 else out


def _run_model_config(path: Path) -> tuple[str | None, Preprocess | None]:
    """The architecture and preprocessing of the training run a bare weights file sits in (None when unknown)."""
    from omegaconf import OmegaConf

    run_config = find_run_config(path)
    if run_config is None:
        return None, None
    run = OmegaConf.load(run_config)
    size, crop = OmegaConf.select(run, "data.image_size"), OmegaConf.select(run, "data.eval_crop_pct", default=0.875)
    preprocess = Preprocess(image_size=int(size), eval_crop_pct=float(crop)) if size else None
    return OmegaConf.select(run, "model.name"), preprocess


