"""Predictor: the one inference object. predict, eval, explain and the demo all use it.

>>> from twincar import Predictor
>>> p = Predictor.load("outputs/runs/RUN/model.pth")  # model_card.json beside it gives classes and preprocessing
>>> r = p.predict("car.jpg")
>>> r.make, r.model, r.year, r.confidence
>>> rs = p.predict(["a.jpg", "b.png"], batch_size=32, num_workers=2)  # a list; unreadable files get ``error``

Loading goes through :func:`twincar.models.io.load_model` (safe: no unpickling) and preprocessing through
:mod:`twincar.data.transforms` (the same eval transform as validation), so a prediction here equals what
evaluation computes for the same file.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from twincar.data.classes import parse_car_name
from twincar.data.transforms import BatchTransform, EvalImageTransform, ImageReadError, Preprocess, load_rgb
from twincar.errors import TwinCarError
from twincar.models.io import LoadedModel, OnnxModule, load_model

log = logging.getLogger(__name__)

ImageInput = str | Path | Image.Image | torch.Tensor
PRECISIONS = ("auto", "fp32", "bf16")
TTA_MODES = (None, "flip")


@dataclass
class Prediction:
    """One image's answer. ``error`` is set (and the rest empty) when the image could not be read."""

    source: str  # the file path, or "<PIL image>" / "<tensor>" for in-memory inputs
    name: str = ""  # the predicted class name, e.g. "BMW M3 Coupe 2012"
    label: int = -1  # its index in the class list
    confidence: float = 0.0  # softmax probability of the predicted class
    make: str = ""
    model: str = ""
    year: int | None = None
    topk: list[tuple[str, float]] = field(default_factory=list)  # (name, probability), most likely first
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_row(self, topk: int | None = None) -> dict[str, object]:
        """A flat row: the original TwinCars columns ``image, make, model, year, confidence``, then
        ``class``, ``label``, ``top{i}_class``/``top{i}_prob`` for i = 1..topk, and ``error``."""
        k = len(self.topk) if topk is None else topk
        row: dict[str, object] = {
            "image": self.source, "make": self.make, "model": self.model,
            "year": "" if self.year is None else self.year,
            "confidence": round(self.confidence, 6) if self.ok else "",
            "class": self.name, "label": self.label if self.ok else "",
        }
        for i in range(k):
            name, prob = self.topk[i] if i < len(self.topk) else ("", "")
            row[f"top{i + 1}_class"] = name
            row[f"top{i + 1}_prob"] = round(prob, 6) if prob != "" else ""
        row["error"] = self.error or ""
        return row


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_workers(device: torch.device) -> int:
    """Decoding processes for inference on ``device``: none on the CPU, where the network already uses every
    core (decoding is a few percent of the work there, and a busy core stalls every layer's threads: predict
    ran 4x slower on 2 cores with 2 workers), else up to 8 (a GPU waits on decoding)."""
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision``: ``bf16`` -> bfloat16, ``fp32`` -> None (no autocast), ``auto`` ->
    bfloat16 where the hardware computes it natively (a CUDA GPU with bf16, or a CPU with AVX512-BF16 or
    AMX), else None."""
    if precision not in PRECISIONS:
        raise TwinCarError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return torch.bfloat16 if native else None
    return None


def to_uint8_rgb(image: ImageInput) -> torch.Tensor:
    """A path, PIL image or tensor as a ``uint8`` (3, H, W) RGB tensor; unreadable files raise ImageReadError."""
    if isinstance(image, (str, Path)):
        return load_rgb(image)
    if isinstance(image, Image.Image):
        return TF.pil_to_tensor(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        t = image
        if t.ndim == 2:
            t = t.unsqueeze(0)
        if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
            raise ValueError(f"an image tensor must be (C, H, W) with C in 1, 3, 4; got shape {tuple(image.shape)}")
        if t.dtype != torch.uint8:
            raise ValueError(f"an image tensor must be uint8 (0..255); got {t.dtype}")
        return t[:3] if t.shape[0] == 4 else t.expand(3, -1, -1) if t.shape[0] == 1 else t
    raise TypeError(f"cannot predict on a {type(image).__name__}: pass a path, a PIL image or a uint8 tensor")


def _source(image: ImageInput) -> str:
    if isinstance(image, (str, Path)):
        return str(image)
    return "<PIL image>" if isinstance(image, Image.Image) else "<tensor>"


def prepare_image(image: ImageInput, transform: nn.Module, min_side: int | None = None) -> torch.Tensor:
    """Decode (a large JPEG file at reduced size, never below ``min_side``: ``load_rgb(min_side=)``) and
    ``transform`` one input into a ``uint8`` (3, S, S) tensor."""
    if isinstance(image, (str, Path)):
        return transform(load_rgb(image, min_side=min_side))
    return transform(to_uint8_rgb(image))


class _ImageDataset(Dataset):
    """:func:`prepare_image` of one input (in a DataLoader worker); an unreadable one yields its error message."""

    def __init__(self, items: Sequence[ImageInput], transform: nn.Module, min_side: int | None):
        self.items = items
        self.transform = transform
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, prepare_image(self.items[index], self.transform, self.min_side), None
        except (ImageReadError, ValueError, TypeError) as e:
            return index, None, str(e)


def _collate(batch: list[tuple[int, torch.Tensor | None, str | None]]):
    """(indices of readable images, their uint8 batch or None, {index: error} of the others)."""
    ok = [(i, t) for i, t, _ in batch if t is not None]
    errors = {i: err for i, t, err in batch if t is None}
    return [i for i, _ in ok], (torch.stack([t for _, t in ok]) if ok else None), errors


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
        tta: ``"flip"`` averages the probabilities of the image and its mirror image; None for one pass.
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
    ):
        if tta not in TTA_MODES:
            raise TwinCarError(f"--tta must be 'flip' or left out, got {tta!r}")
        self.device = resolve_device(device)
        self.class_names = list(class_names)
        self.preprocess = preprocess
        self.tta = tta
        self.is_onnx = isinstance(model, OnnxModule)
        self.channels_last = channels_last and not self.is_onnx  # onnxruntime takes NCHW: no copy there and back
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
        ``image_size``/``resize_mode`` change one field of it. Other keywords go to :class:`Predictor`."""
        loaded: LoadedModel = load_model(path, classes, architecture=architecture, preprocess=preprocess)
        pre = loaded.preprocess
        if image_size is not None or resize_mode is not None:
            try:
                pre = replace(pre, image_size=image_size or pre.image_size, resize_mode=resize_mode or pre.resize_mode)
            except ValueError as e:
                raise TwinCarError(f"--resize-mode: {e}") from e
        if isinstance(loaded.model, OnnxModule) and loaded.model.image_size not in (None, pre.image_size):
            raise TwinCarError(
                f"{path} takes {loaded.model.image_size}x{loaded.model.image_size} inputs, not {pre.image_size}: "
                "leave --img-size out for this ONNX model"
            )
        return cls(loaded.model, loaded.class_names, pre, device=device, **kwargs)

    # -- the three steps: per image, per batch, results ---------------------------------------
    def prepare(self, image: ImageInput) -> torch.Tensor:
        """Per-image work (decode, resize, crop): a ``uint8`` (3, S, S) tensor. Safe in DataLoader workers.

        A large JPEG is decoded at reduced size (never below what the resize needs: ``load_rgb(min_side=)``)."""
        return prepare_image(image, self.image_transform, self.preprocess.decode_min_side)

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) in float32 on the CPU for a ``uint8`` batch (N, 3, S, S) of prepared images.

        With ``tta="flip"`` these are the log of the probabilities averaged over the image and its mirror
        image (so their softmax is that average).
        """
        x = self.batch_transform(batch.to(self.device, non_blocking=True))
        if self.tta == "flip":
            x = torch.cat([x, x.flip(3)])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            out = self.model(x).float()
        if self.tta == "flip":
            plain, flipped = out.log_softmax(1).chunk(2)
            out = torch.logaddexp(plain, flipped) - math.log(2)
        return out.cpu()

    def results(self, logits: torch.Tensor, sources: Sequence[str], topk: int = 5) -> list[Prediction]:
        """Turn logits into :class:`Prediction` objects (top-k names and probabilities, make/model/year)."""
        probs = logits.float().softmax(dim=1)
        k = min(topk, probs.shape[1])
        top_p, top_i = probs.topk(k, dim=1)
        out = []
        for src, ps, idx in zip(sources, top_p.tolist(), top_i.tolist(), strict=True):
            car = self.parsed[idx[0]]
            out.append(Prediction(
                source=src, name=car.full, label=idx[0], confidence=ps[0], make=car.make, model=car.model,
                year=car.year, topk=[(self.class_names[i], p) for i, p in zip(idx, ps, strict=True)],
            ))
        return out

    def iter_predict(
        self, images: Sequence[ImageInput], *, batch_size: int = 32, topk: int = 5, num_workers: int = 0
    ) -> Iterator[Prediction]:
        """Yield one :class:`Prediction` per input, in input order, batch by batch.

        Decoding and resizing run in ``num_workers`` DataLoader processes (0: in this process). An unreadable
        file yields a Prediction with ``error`` set (and a warning); the rest of its batch goes on.
        """
        loader = DataLoader(
            _ImageDataset(images, self.image_transform, self.preprocess.decode_min_side), batch_size=batch_size,
            num_workers=num_workers, collate_fn=_collate, pin_memory=self.device.type == "cuda",
        )
        for indices, batch, errors in loader:
            done = dict(zip(indices, self.results(
                self.logits(batch), [_source(images[i]) for i in indices], topk
            ), strict=True)) if indices else {}
            for i in sorted([*indices, *errors]):
                if i in errors:
                    log.warning("skipping unreadable image: %s", errors[i])
                    yield Prediction(source=_source(images[i]), error=errors[i])
                else:
                    yield done[i]

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
