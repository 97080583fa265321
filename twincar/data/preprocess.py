"""What a model expects of its input (:class:`Preprocess`): saved with the weights, read back by every consumer.

Torch-free (the model card and the ONNX runtime read it without torch); the transforms that apply it are in
:mod:`twincar.data.transforms`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("crop", "squash")


@dataclass(frozen=True)
class Preprocess:
    """What a model expects of its input; saved with the weights and read back by every consumer."""

    image_size: int = 224  # side of the square network input, pixels
    eval_crop_pct: float = 0.875  # eval resizes the short side to image_size / eval_crop_pct, then center-crops
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel normalisation mean (RGB, 0..1 scale)
    std: tuple[float, float, float] = IMAGENET_STD  # per-channel normalisation std
    # eval resize: "crop" (short side, then center crop) or "squash" (whole image to image_size x image_size,
    # aspect ratio not kept: the original TwinCars project's Resize((224, 224)))
    resize_mode: str = "crop"

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")

    @property
    def eval_resize_side(self) -> int:
        """The short side eval resizes to before its center crop: ``round(image_size / eval_crop_pct)``."""
        return int(round(self.image_size / self.eval_crop_pct))

    @property
    def decode_min_side(self) -> int:
        """The short side an image needs before eval resizing: a smaller decode would upsample."""
        return self.image_size if self.resize_mode == "squash" else self.eval_resize_side

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict | None) -> Preprocess:
        """Read back :meth:`to_dict` (a checkpoint's or model card's); missing keys take the defaults."""
        return from_mapping(cls, d, "preprocessing field")


def from_mapping(cls, d: dict | None, what: str):
    """A frozen dataclass from a config/JSON mapping: lists become tuples, unknown keys are an error."""
    d = dict(d or {})
    unknown = set(d) - set(cls.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown {what}(s): {', '.join(sorted(unknown))}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# The original TwinCars project's inference preprocessing: Resize((224, 224)), ImageNet mean/std.
TWINCARS_PREPROCESS = Preprocess(image_size=224, eval_crop_pct=1.0, resize_mode="squash")
