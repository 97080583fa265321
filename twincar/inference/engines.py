"""Where the network runs: the device, the precision and the decoding workers of an inference."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch

from twincar.errors import TwinCarError

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)



PRECISIONS = ("auto", "fp32", "bf16")
TTA_MODES = (None, "none", "flip")  # "none" and None are the same: one pass


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a device that does not exist here is one sentence."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise TwinCarError(f"--device {device} is not a device: use auto, cpu, cuda or cuda:N") from e
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise TwinCarError(f"--device {device}: no CUDA GPU is available here: use --device cpu (or auto)")
        if resolved.index is not None and resolved.index >= count:
            raise TwinCarError(f"--device {device}: there are only {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    elif resolved.type != "cpu":
        raise TwinCarError(f"--device {device}: only cpu and cuda devices are supported")
    return resolved


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
        from twincar.compat.torch import cpu_has_native_bf16

        return torch.bfloat16 if cpu_has_native_bf16() else None
    return None


