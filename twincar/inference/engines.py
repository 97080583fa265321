"""The engines: the only fork of the inference pipeline. Each takes a batch of prepared images, ``uint8``
(N, S, S, 3) as :func:`twincar.inference.preprocess.prepare` makes them (a numpy array, or the tensor a DataLoader
collates), and returns the network's raw outputs as float32 numpy: (N, K) logits, or (2N, K) with the mirror
images after the images under flip TTA (:func:`twincar.inference.results.flip_average` averages them).

- :class:`TorchEngine`: a torch module on the CPU or a GPU, channels-last, bf16 autocast where asked; it also gives
  the pre-logit features (embeddings) of the same pass. torch is imported when one is built.
- :class:`OnnxEngine`: an onnxruntime session, fp32, imports no torch.

Also here: where the torch network runs (:func:`resolve_device`, :func:`resolve_precision`) and how many decoding
workers an inference gets (:func:`default_workers`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from twincar.data.preprocess import Preprocess
from twincar.errors import TwinCarError
from twincar.inference.preprocess import normalise, scale_shift

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
FEATURES_OUTPUT = "features"  # the ONNX export's second output: the pre-logit features (N, D) of the same pass


class ModelError(TwinCarError, ValueError):
    """A model file, its card or an option cannot be used; the message says what to pass."""


def resolve_device(device="auto"):
    """``auto`` -> CUDA when available, else CPU; a device that does not exist here is one sentence."""
    import torch

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


def default_workers(device, processes: int | None = None) -> int:
    """Decoding processes for inference on ``device`` (a torch device, or ``"cpu"``/``"cuda"``/an accelerator
    name): none on the CPU, where the network already uses every core (decoding is a few percent of the work there,
    and a busy core stalls every layer's threads: predict ran 4x slower on 2 cores with 2 workers), else up to 8 (a
    GPU waits on decoding). ``processes``: the inference processes per node of a scale-out run
    (:mod:`twincar.inference.parallel`), which share the node's cores, one kept for each process itself."""
    if getattr(device, "type", str(device)) == "cpu":
        return 0
    cores = os.cpu_count() or 1
    return min(8, cores) if processes is None else max(1, min(8, cores // processes - 1))


def resolve_precision(precision: str, device):
    """The autocast dtype for ``precision``: ``bf16`` -> bfloat16, ``fp32`` -> None (no autocast), ``auto`` ->
    bfloat16 where the hardware computes it natively (a CUDA GPU with bf16, or a CPU with AVX512-BF16 or
    AMX), else None."""
    import torch

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


class TorchEngine:
    """A torch network (its eval mode set here) on ``device``: ``uint8`` batches in, float32 logits out.

    Args:
        model: outputs logits; a timm model (``forward_features``/``forward_head``) also gives embeddings.
        pre: the input's mean and std (normalised on the device, as ``(pixel / 255 - mean) / std``).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        channels_last: run convolutions in channels-last memory format (faster on CPU and GPU).
        precision: ``fp32`` (exact), ``bf16`` (autocast) or ``auto`` (:func:`resolve_precision`).
    """

    kind = "torch"

    def __init__(self, model, pre: Preprocess, *, device="auto", channels_last: bool = True,
                 precision: str = "fp32"):
        import torch

        self.device = resolve_device(device)
        self.precision = precision
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.channels_last = channels_last
        self.model = model.eval().to(self.device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        scale, shift = scale_shift(pre)
        self._scale_shift = [torch.from_numpy(v).view(1, 3, 1, 1) for v in (scale, shift)]
        self._on_device = [v.to(self.device) for v in self._scale_shift]

    def to(self, device) -> TorchEngine:
        """Move the network to ``device`` (in place: a process of a multi-process run takes its own GPU);
        ``precision="auto"`` is resolved again for it."""
        import torch

        self.device = torch.device(device)
        self.model.to(self.device)
        self._on_device = [v.to(self.device) for v in self._scale_shift]
        self.autocast_dtype = resolve_precision(self.precision, self.device)
        return self

    def input(self, batch, flip: bool = False):
        """The network's float input (N, 3, S, S) of a ``uint8`` (N, S, S, 3) batch: normalised on the device, with
        the mirror images after it when ``flip``, channels-last (or contiguous NCHW)."""
        import torch

        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(np.ascontiguousarray(batch))
        images = batch.to(self.device, non_blocking=True)
        scale, shift = self._on_device
        x = images.permute(0, 3, 1, 2).float().mul_(scale).add_(shift)  # NHWC storage: already channels-last
        if flip:
            x = torch.cat([x, x.flip(3)])
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def forward(self, network, x):
        """``network`` on a float input under the autocast of ``precision``: float32 on the device."""
        import torch

        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            return network(x).float()

    def run(self, batch, flip: bool = False, *, embeddings: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """``(logits, features)`` of one forward pass, float32 numpy: (N, K) (2N with ``flip``), and with
        ``embeddings`` the pre-logit features (timm's ``forward_head(forward_features(x), pre_logits=True)``,
        after global pooling, flattened) of the same pass, else None."""
        import torch

        with torch.inference_mode():
            x = self.input(batch, flip)
            if not embeddings:
                return self.forward(self.model, x).cpu().numpy(), None
            self.check_embeddings()
            k = []

            def network(x):
                features = self.model.forward_features(x)
                logits = self.model.forward_head(features)
                k.append(logits.shape[1])
                return torch.cat([logits, self.model.forward_head(features, pre_logits=True).flatten(1)], dim=1)

            out = self.forward(network, x).cpu().numpy()
            return out[:, :k[0]], out[:, k[0]:]

    def check_embeddings(self) -> None:
        if not hasattr(self.model, "forward_head"):
            raise TwinCarError("embeddings need a timm model (forward_features/forward_head) run by PyTorch")


class OnnxEngine:
    """An ONNX model run by onnxruntime (fp32; no torch): ``uint8`` batches in, float32 logits out.

    ``device="cuda"`` (or ``auto``) uses onnxruntime's CUDA provider when it has one; ``threads`` caps its
    intra-op threads."""

    kind = "onnx"

    def __init__(self, path: str | Path, pre: Preprocess, *, device="auto", threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ModelError(f"{path} is an ONNX model: install onnxruntime "
                             "(pip install -r requirements-runtime.txt, or the onnx extra)") from e
        if str(device) not in ("auto", "cpu") and not str(device).startswith("cuda"):
            raise ModelError(f"--device {device}: use auto, cpu or cuda with an ONNX model")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if str(device) != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for a damaged file
            raise ModelError(f"cannot read ONNX model {path}: {str(e).strip().splitlines()[0]}") from e
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.has_features = FEATURES_OUTPUT in self.output_names  # an export of this version: features beside logits
        self.input_name = inp.name
        side = inp.shape[-1] if len(inp.shape) == 4 else None
        self.image_size: int | None = side if isinstance(side, int) else None  # None: any size
        self.num_outputs: int | None = out.shape[-1] if isinstance(out.shape[-1], int) else None
        self.device = "cuda" if providers[0].startswith("CUDA") else "cpu"
        self.preprocess = pre

    def run(self, batch, flip: bool = False, *, embeddings: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """``(logits, features)``: (N, K) float32 logits (2N with ``flip``) of one run, and with ``embeddings`` the
        pre-logit features of the same run (the export's ``features`` output), else None."""
        if embeddings and not self.has_features:
            raise TwinCarError("this ONNX model has no features output (exported by an older TwinCar): export it "
                               "again (python -m twincar.export format=onnx), or use the PyTorch weights")
        x = normalise(np.asarray(batch), self.preprocess)
        if flip:
            x = np.concatenate([x, np.ascontiguousarray(x[..., ::-1])])
        names = [self.output_names[0], FEATURES_OUTPUT] if embeddings else [self.output_names[0]]
        out = self.session.run(names, {self.input_name: x})
        return out[0].astype(np.float32, copy=False), (out[1].astype(np.float32, copy=False) if embeddings else None)
