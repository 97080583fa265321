"""Inference: one pipeline (decode, preprocess, batch, engine, score, write) with two engines, a torch module or an
onnxruntime session. ``from twincar.inference import Predictor`` imports no torch: the torch engine imports it when
it is built."""

from __future__ import annotations

__all__ = ["Predictor", "Prediction"]


def __getattr__(name: str):
    if name == "Predictor":
        from twincar.inference.predictor import Predictor

        return Predictor
    if name == "Prediction":
        from twincar.inference.results import Prediction

        return Prediction
    raise AttributeError(f"module 'twincar.inference' has no attribute {name!r}")
