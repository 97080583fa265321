"""The torch-free runtime: predict with an exported ONNX model using numpy, PIL and onnxruntime only.

``twincar-predict --model model.onnx`` and the Space go through here: neither torch nor torchvision is imported,
so start-up is a fraction of a second and the install is numpy, pillow and onnxruntime
(``requirements-runtime.txt``). It follows the ``input`` section of ``model_card.json`` step by step, the same steps
as the PyTorch path (:mod:`twincar.data.images` + :mod:`twincar.data.transforms`): PIL decode (a large JPEG at
reduced size with ``draft``, EXIF orientation applied, RGB), short-side resize (bilinear, antialiased: PIL's),
center crop, ``(pixel / 255 - mean) / std`` as float32 NCHW, logits out. Flip TTA is the same definition as
:mod:`twincar.inference.predictor`'s. Nothing here imports a TwinCar module that imports torch.

>>> from twincar.inference.runtime import OnnxPredictor
>>> p = OnnxPredictor.load("exports/onnx/model.onnx")  # model_card.json beside it gives classes and preprocessing
>>> p.predict("car.jpg").name
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from twincar.data.classes import class_names_difference, parse_car_name, read_class_names
from twincar.errors import TwinCarError
from twincar.files import ReadError, read_json_object

log = logging.getLogger(__name__)

MODEL_CARD = "model_card.json"  # the card beside the weights (twincar.models.io.MODEL_CARD)
MAX_IMAGE_PIXELS = 2 * 89_478_485  # as twincar.data.images: refused before decoding (decompression bombs)
JPEG_FORMATS = ("JPEG", "MPO")
# A card-less model gets the original TwinCars preprocessing: 224x224 squash, ImageNet mean/std
DEFAULT_PREPROCESS = {"image_size": 224, "eval_crop_pct": 1.0, "resize_mode": "squash",
                      "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


class RuntimeModelError(TwinCarError, ValueError):
    """The ONNX model, its card or an option cannot be used; the message says what to pass."""


class RuntimeImageError(TwinCarError, OSError):
    """An image cannot be read; the message names it."""


@dataclass
class Prediction:
    """One image's answer. ``error`` is set (and the rest empty) when the image could not be read."""

    source: str  # the file path, or "<PIL image>" / "<tensor>" for in-memory inputs
    name: str = ""  # the predicted class name, e.g. "BMW M3 Coupe 2012"
    label: int = -1  # its index in the class list
    confidence: float = 0.0  # (calibrated) softmax probability of the predicted class
    make: str = ""
    model: str = ""
    year: int | None = None
    topk: list[tuple[str, float]] = field(default_factory=list)  # (name, probability), most likely first
    error: str | None = None
    known: bool = True  # False: the unknown score is below the model's threshold, not one of its classes
    unknown_score: float | None = None  # the score compared with the threshold (None: no threshold in use)
    num_classes: int = 0  # how many classes the model knows (for the "not one of the N" answer)
    neighbours: list[tuple[str, str, float]] = field(default_factory=list)  # nearest training (image, class, cosine)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def answer(self) -> str:
        """The class name, or, for an unknown car, that it is not one of the known classes."""
        return self.name if self.known else unknown_answer(self.num_classes)

    def to_row(self, topk: int | None = None, open_set: bool = False,
               neighbours: int | None = None) -> dict[str, object]:
        """A flat row: the original TwinCars columns ``image, make, model, year, confidence``, then
        ``class``, ``label``, ``top{i}_class``/``top{i}_prob`` for i = 1..topk, ``nn{i}_image``/``_class``/
        ``_similarity`` for i = 1..neighbours, with ``open_set`` ``known`` and ``unknown_score``, and ``error``
        (None: as many top-k and neighbour columns as this prediction has; missing cells are empty). An unknown car
        has empty make/model/year/label, ``class`` says it is not one of the known classes, and the top-k columns
        keep its closest classes."""
        k = len(self.topk) if topk is None else topk
        n = len(self.neighbours) if neighbours is None else neighbours
        known = self.known or not self.ok
        row: dict[str, object] = {
            "image": self.source, "make": self.make if known else "", "model": self.model if known else "",
            "year": "" if self.year is None or not known else self.year,
            "confidence": round(self.confidence, 6) if self.ok else "",
            "class": self.answer if self.ok else "", "label": self.label if self.ok and known else "",
        }
        for i in range(k):
            name, prob = self.topk[i] if i < len(self.topk) else ("", "")
            row[f"top{i + 1}_class"] = name
            row[f"top{i + 1}_prob"] = round(prob, 6) if prob != "" else ""
        for i in range(n):
            image, name, sim = self.neighbours[i] if i < len(self.neighbours) else ("", "", "")
            row[f"nn{i + 1}_image"], row[f"nn{i + 1}_class"] = image, name
            row[f"nn{i + 1}_similarity"] = round(sim, 6) if sim != "" else ""
        if open_set:
            row["known"] = ("true" if self.known else "false") if self.ok else ""
            row["unknown_score"] = "" if self.unknown_score is None else round(self.unknown_score, 6)
        row["error"] = self.error or ""
        return row


def unknown_threshold(unknown: str | float | None, calibration: dict | None, tta: str | None = None) -> float | None:
    """The unknown threshold ``--unknown`` asks for: ``auto`` -> the threshold of the model's ``calibration`` (None
    when it has none), ``off`` (or None) -> None, a number -> that number. A threshold fitted with another flip TTA
    than ``tta`` is used with a warning: averaging the views shifts the scores a little."""
    if unknown is None or unknown == "off":
        return None
    if unknown == "auto":
        threshold = (calibration or {}).get("threshold")
        fitted = (calibration or {}).get("tta") or None
        if threshold is not None and fitted != (tta or None):
            log.warning("the unknown threshold was fitted with tta=%s and is used with tta=%s: the scores shift a "
                        "little (python -m twincar.calibrate tta=%s refits it)", fitted or "none", tta or "none",
                        tta or "none")
        return threshold
    try:
        value = float(unknown)
    except (TypeError, ValueError) as e:
        raise TwinCarError(
            f"--unknown {unknown} is not auto, off or a number (a threshold on the unknown score)") from e
    if not math.isfinite(value):
        raise TwinCarError(f"--unknown {unknown} must be a finite number")
    return value


def unknown_scores(logits: np.ndarray, score: str = "max_logit", temperature: float = 1.0) -> np.ndarray:
    """(N,) unknown scores of raw logits (N, K), as :func:`twincar.evaluation.calibration.unknown_scores` defines
    them."""
    z = logits.astype(np.float64)
    if score == "max_logit":
        return z.max(axis=1)
    if score == "max_softmax":
        return softmax(z / temperature).max(axis=1)
    if score == "energy":
        m = (z / temperature).max(axis=1, keepdims=True)
        return temperature * (m[:, 0] + np.log(np.exp(z / temperature - m).sum(axis=1)))
    raise RuntimeModelError(f"unknown score {score!r}: use max_logit, max_softmax or energy")


def unknown_answer(num_classes: int) -> str:
    """What TwinCar answers for a car that is none of its classes."""
    return f"not one of the {num_classes} known classes" if num_classes else "not one of the known classes"


# -- decode ------------------------------------------------------------------------------------------------
def reduced_decode_scale(width: int, height: int, min_side: int) -> int:
    """The largest JPEG DCT scale-down (1, 2, 4 or 8) that keeps the short side >= ``min_side`` (torch's decoder in
    :mod:`twincar.data.images` and this runtime's use the same rule)."""
    scale = 1
    while scale < 8 and min(width, height) // (scale * 2) >= min_side:
        scale *= 2
    return scale


def _read_problem(path: Path, error: BaseException) -> str:
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, IsADirectoryError):
        return "a folder, not an image file"
    if isinstance(error, UnidentifiedImageError):
        return "not an image (unknown format or damaged header)"
    if isinstance(error, Image.DecompressionBombError):
        return str(error)
    text = str(error).strip() or type(error).__name__
    return f"{'truncated' if 'truncat' in text.lower() else 'corrupt'} ({text})"


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB as TwinCar decodes it: 16-bit grayscale scaled (value * 255 / 65535, rounded), not clipped."""
    if im.mode.startswith("I"):
        wide = np.asarray(im).astype(np.int64).clip(0, 65535)
        im = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    return im if im.mode == "RGB" else im.convert("RGB")


def decode_rgb(source: str | Path | Image.Image, min_side: int | None = None) -> Image.Image:
    """A file (or PIL image) as an RGB PIL image with its EXIF orientation applied. A JPEG file at least twice
    ``min_side`` is decoded at 1/2, 1/4 or 1/8 size (libjpeg DCT scaling, ``Image.draft``), never below it.
    An unreadable file raises :class:`RuntimeImageError` naming it."""
    if isinstance(source, Image.Image):
        return _to_rgb(source)
    path = Path(source)
    try:
        if path.is_file() and path.stat().st_size == 0:
            raise RuntimeImageError(f"cannot read image {path}: the file is empty (0 bytes)")
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise RuntimeImageError(f"cannot read image {path}: {w}x{h} pixels is over the {MAX_IMAGE_PIXELS} "
                                        "limit (decompression bomb?)")
            scale = reduced_decode_scale(w, h, min_side) if min_side and im.format in JPEG_FORMATS else 1
            if scale > 1:
                im.draft("RGB", (math.ceil(w / scale), math.ceil(h / scale)))
            out = _to_rgb(ImageOps.exif_transpose(im))
            out.load()
            return out
    except RuntimeImageError:
        raise
    except Exception as e:  # whatever a strange file makes PIL raise, it is named, never a traceback
        raise RuntimeImageError(f"cannot read image {path}: {_read_problem(path, e)}") from e


# -- preprocess ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    """The network input a model card describes: square side, resize, mean and std."""

    image_size: int  # side of the square network input
    resize_mode: str  # "crop": short side to short_side, then center crop; "squash": whole image to a square
    short_side: int  # the short side before the center crop (round(image_size / eval_crop_pct)); "crop" only
    mean: tuple[float, float, float]  # per channel, 0..1 scale
    std: tuple[float, float, float]

    @classmethod
    def from_preprocess(cls, pre: dict, image_size: int | None = None, resize_mode: str | None = None) -> InputSpec:
        """From a model card's ``preprocess`` (TwinCar's :class:`~twincar.data.transforms.Preprocess` fields);
        ``image_size``/``resize_mode`` replace one field, as ``--img-size``/``--resize-mode`` do."""
        pre = {**DEFAULT_PREPROCESS, **pre} if pre else dict(DEFAULT_PREPROCESS)
        size = int(image_size or pre["image_size"])
        mode = resize_mode or pre["resize_mode"]
        if mode not in ("crop", "squash"):
            raise RuntimeModelError(f"--resize-mode must be crop or squash, got {mode!r}")
        return cls(size, mode, int(round(size / float(pre["eval_crop_pct"]))), tuple(pre["mean"]), tuple(pre["std"]))

    @property
    def decode_min_side(self) -> int:
        """The short side an image needs before resizing: a smaller decode would upsample."""
        return self.image_size if self.resize_mode == "squash" else self.short_side


def resize_and_crop(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """The eval transform: short side to ``spec.short_side`` (long side ``int(short_side * long / short)``),
    bilinear with antialiasing, then a center crop; or the whole image to a square (``squash``). An (S, S, 3)
    ``uint8`` array."""
    size = spec.image_size
    if spec.resize_mode == "squash":
        return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = spec.short_side, int(spec.short_side * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    array = np.asarray(image)
    if new_w < size or new_h < size:  # only when the crop is larger than the image: pad with zeros, centred
        padded = np.zeros((max(size, new_h), max(size, new_w), 3), np.uint8)
        top, left = (padded.shape[0] - new_h) // 2, (padded.shape[1] - new_w) // 2
        padded[top:top + new_h, left:left + new_w] = array
        array, new_h, new_w = padded, padded.shape[0], padded.shape[1]
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return array[top:top + size, left:left + size]


def normalise(batch: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(N, S, S, 3) ``uint8`` -> (N, 3, S, S) float32: ``(pixel / 255 - mean) / std``."""
    std, mean = np.asarray(spec.std, np.float32), np.asarray(spec.mean, np.float32)
    scale, shift = np.float32(1) / (np.float32(255) * std), -mean / std
    x = batch.astype(np.float32) * scale + shift
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def read_card(weights: Path) -> dict:
    """The ``model_card.json`` beside ``weights``, or ``{}`` when there is none."""
    path = weights.with_name(MODEL_CARD)
    if not path.is_file():
        return {}
    try:
        return read_json_object(path, "class_names, preprocess, architecture")
    except ReadError as e:
        raise RuntimeModelError(str(e)) from e


class OnnxPredictor:
    """An ONNX model with its class names and input spec: the torch-free counterpart of
    :class:`twincar.inference.predictor.Predictor` (same answers, same :class:`Prediction` rows)."""

    is_onnx = True  # the demo offers no Grad-CAM for it (that needs PyTorch weights)

    def __init__(self, session, class_names: Sequence[str], spec: InputSpec, *, tta: str | None = None,
                 calibration: dict | None = None, unknown: str | float | None = "auto"):
        if tta not in (None, "none", "flip"):
            raise RuntimeModelError(f"--tta must be 'flip' or left out, got {tta!r}")
        calibration = calibration or {}  # the model card's: temperature, unknown score and threshold
        self.temperature = float(calibration.get("temperature") or 1.0)
        self.score = str(calibration.get("score") or "max_logit")
        self.tta = None if tta == "none" else tta
        self.unknown_threshold = unknown_threshold(unknown, calibration, self.tta)
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.class_names = list(class_names)
        self.spec = spec
        self.parsed = [parse_car_name(n) for n in self.class_names]

    @classmethod
    def load(cls, path: str | Path, classes: str | Path | Sequence[str] | None = None, *, device: str = "auto",
             image_size: int | None = None, resize_mode: str | None = None, tta: str | None = None,
             unknown: str | float | None = "auto", threads: int | None = None) -> OnnxPredictor:
        """An ``.onnx`` export and its ``model_card.json`` (class names, preprocessing); ``classes`` for a model
        that carries none. ``device="cuda"`` uses onnxruntime's CUDA provider when it has one."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise RuntimeModelError(f"model file {path} does not exist: give the path of an exported .onnx model")
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise RuntimeModelError(f"{path} is an ONNX model: install onnxruntime "
                                    "(pip install -r requirements-runtime.txt)") from e
        card = read_card(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if device not in ("auto", "cpu") and not str(device).startswith("cuda"):
            raise RuntimeModelError(f"--device {device}: use auto, cpu or cuda with an ONNX model")
        if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for a damaged file
            raise RuntimeModelError(f"cannot read ONNX model {path}: {str(e).strip().splitlines()[0]}") from e
        outputs = session.get_outputs()[0].shape[-1]
        names = _class_names(path, card.get("class_names"), classes, outputs)
        spec = InputSpec.from_preprocess(card.get("preprocess") or {}, image_size, resize_mode)
        side = session.get_inputs()[0].shape[-1]
        if isinstance(side, int) and side != spec.image_size:
            raise RuntimeModelError(f"{path} takes {side}x{side} inputs, not {spec.image_size}: leave --img-size out "
                                    "for this ONNX model")
        return cls(session, names, spec, tta=tta, calibration=card.get("calibration"), unknown=unknown)

    def prepare(self, image: str | Path | Image.Image) -> np.ndarray:
        """Decode, resize and crop one input: an (S, S, 3) ``uint8`` array."""
        return resize_and_crop(decode_rgb(image, self.spec.decode_min_side), self.spec)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated logits (N, K) float32 of an (N, S, S, 3) ``uint8`` batch (divided by the model's temperature);
        with ``tta="flip"`` the image's and its mirror image's logits are averaged first."""
        return self.outputs(batch)[1]

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(raw, calibrated)`` logits of one run, as :meth:`twincar.inference.predictor.Predictor.outputs` gives
        them."""
        x = normalise(batch, self.spec)
        if self.tta == "flip":
            x = np.concatenate([x, np.ascontiguousarray(x[..., ::-1])])
        (out,) = self.session.run(None, {self.input_name: x})
        out = out.astype(np.float32)
        return self._flip_average(out, 1.0), self._flip_average(out, self.temperature)

    def _flip_average(self, out: np.ndarray, temperature: float) -> np.ndarray:
        """:func:`twincar.inference.predictor.flip_average` in numpy."""
        if self.tta == "flip":
            plain, flipped = np.split(out, 2)
            out = (plain + flipped) / 2
        return out / temperature if temperature != 1.0 else out

    def results(self, logits: np.ndarray, sources: Sequence[str], topk: int = 5,
                scores: np.ndarray | None = None) -> list[Prediction]:
        """:class:`Prediction` objects (top-k names and probabilities, make/model/year) from calibrated logits;
        with the images' unknown ``scores`` and a threshold in use, ``known`` and ``unknown_score`` too."""
        probs = softmax(logits.astype(np.float64)).astype(np.float32)
        k = min(topk, probs.shape[1])
        threshold = self.unknown_threshold if scores is not None else None
        score_list = scores.tolist() if threshold is not None else [None] * len(sources)
        out = []
        for src, p, score in zip(sources, probs, score_list, strict=True):
            idx = np.argsort(-p, kind="stable")[:k]
            car = self.parsed[int(idx[0])]
            out.append(Prediction(source=src, name=car.full, label=int(idx[0]), confidence=float(p[idx[0]]),
                                  make=car.make, model=car.model, year=car.year,
                                  topk=[(self.class_names[int(i)], float(p[i])) for i in idx],
                                  known=score is None or score >= threshold, unknown_score=score,
                                  num_classes=len(self.class_names)))
        return out

    def iter_predict(self, images: Sequence[str | Path | Image.Image], *, batch_size: int = 32,
                     topk: int = 5) -> Iterator[Prediction]:
        """One :class:`Prediction` per input, in input order; an unreadable file gets ``error`` (and a warning)."""
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            prepared, errors = {}, {}
            for i, image in enumerate(chunk):
                try:
                    prepared[i] = self.prepare(image)
                except RuntimeImageError as e:
                    errors[i] = str(e)
            done = {}
            if prepared:
                raw, calibrated = self.outputs(np.stack(list(prepared.values())))
                scores = unknown_scores(raw, self.score, self.temperature) if self.unknown_threshold is not None \
                    else None
                done = dict(zip(prepared, self.results(calibrated, [_source(chunk[i]) for i in prepared], topk,
                                                       scores), strict=True))
            for i, image in enumerate(chunk):
                if i in errors:
                    log.warning("skipping unreadable image: %s", errors[i])
                    yield Prediction(source=_source(image), error=errors[i])
                else:
                    yield done[i]

    def predict(self, images: str | Path | Image.Image | Iterable[str | Path | Image.Image], *, batch_size: int = 32,
                topk: int = 5) -> Prediction | list[Prediction]:
        """One image (a :class:`Prediction`) or many (a list, input order)."""
        single = isinstance(images, (str, Path, Image.Image))
        items = [images] if single else list(images)
        results = list(self.iter_predict(items, batch_size=batch_size, topk=topk))
        return results[0] if single else results


def _source(image: str | Path | Image.Image) -> str:
    return "<PIL image>" if isinstance(image, Image.Image) else str(image)


def _class_names(path: Path, carried: list | None, given: str | Path | Sequence[str] | None,
                 outputs: object) -> list[str]:
    try:
        names = read_class_names(given) if isinstance(given, (str, Path)) else (list(given) if given else None)
    except (OSError, ValueError) as e:
        raise RuntimeModelError(str(e)) from e
    difference = class_names_difference(carried, names) if carried is not None and names is not None else None
    if difference:
        raise RuntimeModelError(f"{path} carries class names that differ from those given by --classes "
                                f"({difference}): leave --classes out, or pass the classes the model was trained with")
    names = list(carried) if carried is not None else names
    if names is None:
        raise RuntimeModelError(f"{path} carries no class names: pass --classes classes.txt (or classes=...)")
    if isinstance(outputs, int) and len(names) != outputs:
        raise RuntimeModelError(f"the class list has {len(names)} names but {path} has {outputs} outputs")
    return names
