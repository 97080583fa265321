"""Eval and predict preprocessing, the one definition (numpy and PIL, no torch), applying what a model expects
(:class:`twincar.data.preprocess.Preprocess`, from its card or checkpoint): the per-image resize and center crop
(:func:`prepare`: any input -> an (S, S, 3) ``uint8`` array) and the per-batch normalisation (:func:`normalise`).

Every engine takes these pixels: the torch one as ``torch.from_numpy`` of the same crop (normalised on its device
with the same constants, :func:`scale_shift`), onnxruntime as :func:`normalise` gives them. Training's
val transform (:class:`twincar.data.transforms.EvalImageTransform`) is the torch twin kept for the training loop;
a test pins it to this one.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from twincar.data.images import load_image, rgb_image
from twincar.data.preprocess import TWINCARS_PREPROCESS, Preprocess
from twincar.errors import TwinCarError

ImageInput = object  # a path (str or Path), a PIL image, an (H, W, 3) uint8 array or a (C, H, W) uint8 tensor


def input_preprocess(pre: Preprocess | dict | None = None, image_size: int | None = None,
                     resize_mode: str | None = None) -> Preprocess:
    """What the network takes: a :class:`~twincar.data.preprocess.Preprocess`, a model card's ``preprocess`` dict
    (None or empty: the original TwinCars preprocessing, :data:`TWINCARS_PREPROCESS`); ``image_size``/``resize_mode``
    replace one field, as ``--img-size``/``--resize-mode`` do."""
    if not isinstance(pre, Preprocess):
        pre = Preprocess.from_dict(pre) if pre else TWINCARS_PREPROCESS
    if image_size is not None and image_size < 1:
        raise TwinCarError(f"--img-size must be a positive number of pixels, got {image_size}")
    if image_size is None and resize_mode is None:
        return pre
    try:
        return replace(pre, image_size=pre.image_size if image_size is None else image_size,
                       resize_mode=resize_mode or pre.resize_mode)
    except ValueError as e:
        raise TwinCarError(f"--resize-mode: {e}") from e


def scale_shift(pre: Preprocess) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float32 ``(scale, shift)`` with ``pixel * scale + shift == (pixel / 255 - mean) / std``."""
    std, mean = np.asarray(pre.std, np.float32), np.asarray(pre.mean, np.float32)
    return np.float32(1) / (np.float32(255) * std), -mean / std


def to_pil(image: ImageInput, min_side: int | None = None) -> Image.Image:
    """Any input as an RGB PIL image: a file decoded by :func:`twincar.data.images.load_image` (a large JPEG at
    reduced size, never below ``min_side``), a PIL image as a file of its mode decodes, a ``uint8`` array (H, W, 3)
    or tensor (C, H, W; C in 1, 3, 4). Unreadable files raise ImageReadError, other inputs ValueError/TypeError."""
    if isinstance(image, (str, Path)):
        return load_image(image, min_side=min_side)
    if isinstance(image, Image.Image):
        return rgb_image(image)
    if type(image).__module__.startswith("torch"):  # a torch tensor (C, H, W), without importing torch
        if getattr(image, "ndim", 0) not in (2, 3) or (image.ndim == 3 and image.shape[0] not in (1, 3, 4)):
            raise ValueError(f"an image tensor must be (C, H, W) with C in 1, 3, 4; got shape {tuple(image.shape)}")
        if str(image.dtype) != "torch.uint8":
            raise ValueError(f"an image tensor must be uint8 (0..255); got {image.dtype}")
        array = image.cpu().numpy()
        image = array if array.ndim == 2 else array.transpose(1, 2, 0)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError(f"an image array must be uint8 (H, W, C) with C in 1, 3, 4; got {image.dtype} "
                             f"{tuple(image.shape)}")
        image = image if image.ndim == 2 else image[..., 0] if image.shape[2] == 1 else image[..., :3]
        return Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    raise TypeError(f"cannot predict on a {type(image).__name__}: pass a path, a PIL image or a uint8 array or tensor")


def resize_and_crop(image: Image.Image, pre: Preprocess) -> np.ndarray:
    """The eval transform: short side to ``pre.eval_resize_side`` (long side ``int(side * long / short)``),
    bilinear with antialiasing (PIL's), then a center crop; or the whole image to a square (``squash``). An
    (S, S, 3) ``uint8`` array."""
    size = pre.image_size
    if pre.resize_mode == "squash":
        return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = pre.eval_resize_side, int(pre.eval_resize_side * long / short)
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


def prepare(image: ImageInput, pre: Preprocess) -> np.ndarray:
    """The per-image step of every engine: decode (a large JPEG at reduced size), resize and crop one input into
    an (S, S, 3) ``uint8`` array (writable and contiguous: ``torch.from_numpy`` takes it as it is)."""
    return np.array(resize_and_crop(to_pil(image, pre.decode_min_side), pre))


def normalise(batch: np.ndarray, pre: Preprocess) -> np.ndarray:
    """(N, S, S, 3) ``uint8`` -> (N, 3, S, S) float32: ``(pixel / 255 - mean) / std``."""
    scale, shift = scale_shift(pre)
    x = batch.astype(np.float32) * scale + shift
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
