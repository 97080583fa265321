"""torch's private parts: CPU feature checks (``torch.cpu._is_*_supported``), the fused multi-tensor updates
(``torch._foreach_*``) and the BatchNorm base class."""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from twincar.compat import require

SUPPORTED = ">=2.11,<3"
require("torch", SUPPORTED, "CPU bf16 detection")


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast is faster than fp32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


BatchNormBase = _BatchNorm  # every BatchNorm{1,2,3}d and SyncBatchNorm


def foreach_copy_(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for every i, in one fused call."""
    torch._foreach_copy_(dst, src)


def foreach_lerp_(dst: list[torch.Tensor], src: list[torch.Tensor], weight: float) -> None:
    """``dst[i].lerp_(src[i], weight)`` for every i, in one fused call."""
    torch._foreach_lerp_(dst, src, weight)
