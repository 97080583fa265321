"""Predictor: the one inference object. predict, eval, explain and the demo all use it.

>>> from twincar import Predictor
>>> p = Predictor.load("outputs/runs/RUN/model.pth", classes="outputs/runs/RUN/classes.txt")
>>> r = p.predict("car.jpg")
>>> r.make, r.model, r.year, r.confidence

Loading goes through :func:`twincar.models.io.load_model` (safe: no unpickling) and preprocessing through
:mod:`twincar.data.transforms` (the same eval transform as validation), so a prediction here equals what
evaluation computes for the same file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

from twincar.data.classes import parse_car_name
from twincar.data.transforms import BatchTransform, EvalImageTransform, ImageReadError, Preprocess, load_rgb
from twincar.models.io import LoadedModel, load_model

ImageInput = str | Path | Image.Image | torch.Tensor


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


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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


class Predictor:
    """A loaded classifier with its class names and preprocessing; predicts on files, PIL images or tensors.

    Args:
        model: the network (eval mode is set here); outputs logits over ``class_names``.
        class_names: one name per output.
        preprocess: what the model expects (size, resize mode, mean/std).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        channels_last: run convolutions in channels-last memory format (faster on CPU and GPU).
    """

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str],
        preprocess: Preprocess,
        *,
        device: str | torch.device = "auto",
        channels_last: bool = True,
    ):
        self.device = resolve_device(device)
        self.class_names = list(class_names)
        self.preprocess = preprocess
        self.channels_last = channels_last
        self.model = model.eval().to(self.device)
        if channels_last:
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
        **kwargs,
    ) -> Predictor:
        """Load a ``.ckpt``, an exported ``.pth``/``.safetensors`` (with its model card) or the original
        TwinCars ``.pth`` (then ``classes`` is needed). ``preprocess`` overrides what the file says."""
        loaded: LoadedModel = load_model(path, classes, preprocess=preprocess)
        return cls(loaded.model, loaded.class_names, loaded.preprocess, device=device, **kwargs)

    # -- the three steps: per image, per batch, results ---------------------------------------
    def prepare(self, image: ImageInput) -> torch.Tensor:
        """Per-image work (decode, resize, crop): a ``uint8`` (3, S, S) tensor. Safe in DataLoader workers.

        A large JPEG is decoded at reduced size (never below what the resize needs: ``load_rgb(min_side=)``)."""
        if isinstance(image, (str, Path)):
            return self.image_transform(load_rgb(image, min_side=self.preprocess.decode_min_side))
        return self.image_transform(to_uint8_rgb(image))

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) in float32 on the CPU for a ``uint8`` batch (N, 3, S, S) of prepared images."""
        x = self.batch_transform(batch.to(self.device, non_blocking=True))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).float().cpu()

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

    def predict(
        self, images: ImageInput | Iterable[ImageInput], *, batch_size: int = 32, topk: int = 5
    ) -> Prediction | list[Prediction]:
        """Predict one image (returns a :class:`Prediction`) or many (returns a list, input order).

        An unreadable file gives a Prediction with ``error`` set; the others are still predicted.
        """
        single = isinstance(images, (str, Path, Image.Image, torch.Tensor))
        items = [images] if single else list(images)
        results: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            prepared, errors = {}, {}
            for i, image in enumerate(chunk):
                try:
                    prepared[i] = self.prepare(image)
                except (ImageReadError, ValueError) as e:
                    errors[i] = Prediction(source=_source(image), error=str(e))
            ok = sorted(prepared)
            done = dict(zip(ok, self.results(
                self.logits(torch.stack([prepared[i] for i in ok])), [_source(chunk[i]) for i in ok], topk
            ), strict=True)) if ok else {}
            results.extend(done.get(i) or errors[i] for i in range(len(chunk)))
        return results[0] if single else results
