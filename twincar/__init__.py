"""TwinCar: fine-grained car recognition (Stanford Cars) with timm, PyTorch Lightning and Hydra."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Predictor", "Prediction", "__version__"]


def __getattr__(name: str):
    """``from twincar import Predictor`` without importing torch for ``import twincar`` alone."""
    if name in ("Predictor", "Prediction"):
        from twincar.inference import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'twincar' has no attribute {name!r}")
