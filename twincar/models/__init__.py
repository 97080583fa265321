"""The networks and their files: construction (:mod:`~twincar.models.factory`), weights files
(:mod:`~twincar.models.checkpoint`), the model card (:mod:`~twincar.models.card`, torch-free), the timm / Hugging
Face hub layout (:mod:`~twincar.models.hub`, torch-free) and the one way a trained model comes in
(:mod:`~twincar.models.loading`). :class:`WeightsError` is defined here, torch-free, so that each of them raises it."""

from __future__ import annotations

from twincar.errors import TwinCarError


class WeightsError(TwinCarError, RuntimeError):
    """Weights, or the card beside them, could not be had; the message names the file and says what to pass instead."""
