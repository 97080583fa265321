"""The transforms: how a model is trained (:class:`Augmentation`), and the per-image and per-batch transforms that
train, eval, predict, explain and the demo all share (what a model expects is :mod:`twincar.data.preprocess`).

Work is split where it scales:

* per image, in DataLoader workers, on decoded ``uint8`` tensors (:mod:`twincar.data.images` decodes, to numpy;
  :func:`to_tensor` makes the (3, H, W) view):
  geometric crop, flip, rotation -> :class:`TrainImageTransform`, :class:`EvalImageTransform`;
* per batch, on the training device after transfer: float conversion, photometric augmentation
  (colour jitter, Gaussian blur, per-sample), ImageNet normalisation and Mixup/CutMix
  -> :class:`BatchTransform`.

With ``data.pipeline=gpu_decode`` or ``data.pipeline=gpu_cache`` the per-image transforms run on device
tensors instead, after the batch transfer (:mod:`twincar.data.device`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

from twincar.data.images import box_pixels
from twincar.data.preprocess import Preprocess, from_mapping
from twincar.errors import TwinCarError

if TYPE_CHECKING:
    from timm.data import Mixup


def crop_to_box(img: torch.Tensor, bbox: tuple[int, int, int, int], margin: float = 0.0) -> torch.Tensor:
    """Crop a (C, H, W) image to a 1-based inclusive box (x1, y1, x2, y2) grown by ``margin`` x its size per side.

    The box is clamped to the image; a box entirely outside it leaves the image uncropped
    (:func:`~twincar.data.images.box_pixels`, the rule the eval and predict crop share).
    """
    box = box_pixels(bbox, margin, img.shape[-1], img.shape[-2])
    if box is None:
        return img
    left, top, right, bottom = box
    return img[..., top:bottom, left:right]


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """A decoded ``uint8`` (H, W, 3) image (:mod:`twincar.data.images`) as the (3, H, W) tensor torch transforms
    take (a view: no copy)."""
    return torch.from_numpy(image).permute(2, 0, 1)


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation; the fields are the keys of the ``augmentation`` config group."""

    random_resized_crop: bool = True  # False: train images are resized and center-cropped like eval
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range, fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range
    hflip: float = 0.0  # probability of a horizontal flip
    rotation: float = 0.0  # maximum rotation in degrees (uniform in [-rotation, rotation])
    color_jitter: tuple[float, float, float, float] | None = None  # brightness, contrast, saturation, hue
    color_jitter_prob: float = 0.8  # probability that an image is colour-jittered
    blur_prob: float = 0.0  # probability of a Gaussian blur
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # blur sigma range, pixels
    mixup_alpha: float = 0.0  # Mixup beta(alpha, alpha); 0 disables Mixup
    cutmix_alpha: float = 0.0  # CutMix beta(alpha, alpha); 0 disables CutMix
    mix_prob: float = 1.0  # probability that a batch is mixed at all
    mix_switch_prob: float = 0.5  # probability of CutMix rather than Mixup when both are on

    @property
    def mixes(self) -> bool:
        """True when batches get Mixup or CutMix (soft targets, even batch size needed)."""
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    @classmethod
    def from_config(cls, cfg: dict | None) -> Augmentation:
        """Build from a config mapping; lists become tuples and unknown keys are an error."""
        return from_mapping(cls, cfg, "augmentation option")


class MixBatchError(TwinCarError, ValueError):
    """Mixup/CutMix was asked for on an odd batch."""


def check_mix_batch(batch: int, what: str = "data.batch_size") -> None:
    """Mixup/CutMix pairs the images of a batch: ``batch`` must be even. The one rule, wherever a batch is sized."""
    if batch % 2:
        raise MixBatchError(f"Mixup/CutMix needs an even batch, got {batch}: use an even {what}")


def train_decode_min_side(preprocess: Preprocess, aug: Augmentation) -> int:
    """The short side a training image needs so that even the smallest random crop (``aug.scale[0]`` of the
    area, at the most elongated ``aug.ratio``) still has ``image_size`` pixels each way: decoding a large JPEG
    down to this loses nothing the crop would keep (``load_rgb(min_side=)``)."""
    if not aug.random_resized_crop:
        return preprocess.decode_min_side
    elongation = max(aug.ratio[1], 1 / aug.ratio[0])
    return math.ceil(preprocess.image_size * math.sqrt(elongation / aug.scale[0]))


class EvalImageTransform(nn.Module):
    """Per-image eval transform: resize the short side and center-crop to ``image_size`` (``resize_mode="crop"``),
    or resize the whole image to a square (``"squash"``); uint8 in, uint8 out."""

    def __init__(self, preprocess: Preprocess):
        super().__init__()
        size = preprocess.image_size
        self.ops = v2.Compose(
            [v2.Resize((size, size), antialias=True)]
            if preprocess.resize_mode == "squash"
            else [v2.Resize(preprocess.eval_resize_side, antialias=True), v2.CenterCrop(size)]
        )

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.ops(img)


class TrainImageTransform(nn.Module):
    """Per-image train transform: random resized crop (or eval crop), flip, rotation; uint8 in and out."""

    def __init__(self, preprocess: Preprocess, aug: Augmentation):
        super().__init__()
        size = preprocess.image_size
        ops: list[nn.Module] = (
            [v2.RandomResizedCrop(size, scale=aug.scale, ratio=aug.ratio, antialias=True)]
            if aug.random_resized_crop
            else [EvalImageTransform(preprocess)]
        )
        if aug.hflip > 0:
            ops.append(v2.RandomHorizontalFlip(aug.hflip))
        if aug.rotation > 0:
            ops.append(RandomRotation(aug.rotation))
        self.ops = v2.Compose(ops)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.ops(img)


class RandomRotation(nn.Module):
    """Rotate a ``uint8`` (C, H, W) image by a uniform angle in [-degrees, degrees] about its centre.

    The same result as torchvision's ``RandomRotation(degrees)`` (nearest neighbour, same size, corners
    filled with 0) computed as one integer gather on ``uint8`` instead of a float ``grid_sample``: cheaper
    per image on a CPU core.
    """

    def __init__(self, degrees: float):
        super().__init__()
        self.degrees = float(degrees)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        angle = float(torch.empty(()).uniform_(-self.degrees, self.degrees))
        if img.device.type != "cpu":  # a device tensor (data.pipeline=gpu_decode|gpu_cache): the same pixels
            return v2.functional.rotate(img, angle)  # (nearest is rotate's default), without a host round trip
        return rotate_nearest(img, angle)


def rotate_nearest(img: torch.Tensor, angle: float) -> torch.Tensor:
    """``img`` (C, H, W) rotated ``angle`` degrees counter-clockwise about its centre, nearest neighbour,
    out-of-image pixels 0: torchvision ``rotate``'s result, pixel for pixel."""
    c, h, w = img.shape
    rad = math.radians(angle)
    cos, sin = np.float32(math.cos(rad)), np.float32(math.sin(rad))
    # output pixel centres relative to the image centre -> source pixel (inverse rotation), rounded
    ys = (np.arange(h, dtype=np.float32) - np.float32((h - 1) / 2))[:, None]
    xs = (np.arange(w, dtype=np.float32) - np.float32((w - 1) / 2))[None, :]
    src_x = np.rint(cos * xs - sin * ys + np.float32((w - 1) / 2)).astype(np.int32)
    src_y = np.rint(sin * xs + cos * ys + np.float32((h - 1) / 2)).astype(np.int32)
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    index = np.where(inside, src_y * w + src_x, h * w).ravel()  # h * w: the zero pixel appended below
    flat = np.concatenate([img.reshape(c, h * w).numpy(), np.zeros((c, 1), img.numpy().dtype)], axis=1)
    return torch.from_numpy(np.take(flat, index, axis=1).reshape(c, h, w))


class BatchTransform(nn.Module):
    """Per-batch work on the device: uint8 -> float, photometric augmentation, normalise, Mixup/CutMix.

    ``forward(images, labels)`` returns ``(images, targets)``: ``targets`` are the integer labels, or
    soft (N, K) targets when the batch was mixed. Without ``aug`` it only normalises (eval).
    """

    def __init__(self, preprocess: Preprocess, aug: Augmentation | None = None, num_classes: int = 0):
        super().__init__()
        mean, std = torch.tensor(preprocess.mean).view(1, 3, 1, 1), torch.tensor(preprocess.std).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        # uint8 straight to normalised floats in two in-place passes: x * scale + shift
        self.register_buffer("scale", 1 / (255 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)
        photometric: list[nn.Module] = []
        self.mixup: Mixup | None = None
        if aug is not None:  # kornia and timm's Mixup are imported for training only (predict starts faster)
            import kornia.augmentation as K
            from timm.data import Mixup

            if aug.color_jitter is not None:
                photometric.append(K.ColorJitter(*aug.color_jitter, p=aug.color_jitter_prob))
            if aug.blur_prob > 0:
                kernel = 2 * int(3 * aug.blur_sigma[1]) + 1  # covers +-3 sigma of the widest blur
                photometric.append(K.RandomGaussianBlur(kernel, aug.blur_sigma, p=aug.blur_prob))
            if aug.mixes:
                # label smoothing belongs to the loss, so targets here are exact mixtures of one-hots
                self.mixup = Mixup(
                    mixup_alpha=aug.mixup_alpha, cutmix_alpha=aug.cutmix_alpha, prob=aug.mix_prob,
                    switch_prob=aug.mix_switch_prob, label_smoothing=0.0, num_classes=num_classes,
                )
        self.photometric = nn.Sequential(*photometric)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        x = images.to(torch.float32, copy=True)  # in-place from here on: never the caller's tensor
        if images.dtype == torch.uint8 and not len(self.photometric):
            x.mul_(self.scale.to(x.device)).add_(self.shift.to(x.device))  # 3x faster than (x / 255 - mean) / std
        else:
            if images.dtype == torch.uint8:
                x.div_(255)
            if len(self.photometric):
                x = self.photometric(x).clamp_(0, 1)
            x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))
        if labels is None:
            return x
        if self.mixup is not None:
            check_mix_batch(len(x))
            return self.mixup(x, labels)
        return x, labels
