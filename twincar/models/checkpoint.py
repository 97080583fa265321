"""Weights files in and out, always safely: ``weights_only`` torch loads and safetensors, atomic saves.

In: a local file (``model.weights``): a plain state dict ``.pth``/``.pt``/``.bin`` (torchvision's resnet50
included), ``.safetensors``, or a Lightning ``.ckpt``; the one place the state-dict prefixes of Lightning and DDP
are known. Out: a plain state dict with torchvision-compatible keys (``model.pth``) or ``.safetensors``; see
:mod:`twincar.export`. A whole trained model comes in through :func:`twincar.models.loading.load_model`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from twincar.files import atomic_path
from twincar.models import WeightsError
from twincar.models.card import fingerprint_of

log = logging.getLogger(__name__)


def safe_torch_load(path: Path, *, mmap: bool = False) -> object:
    """``torch.load(weights_only=True)``: a file that needs pickle code execution is refused in one sentence, an
    empty or truncated one is named as such. ``mmap``: map the tensors instead of reading them (a cheap check)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for a damaged or foreign file
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise WeightsError(
                f"{path} needs pickle code execution to load (it holds more than tensors and plain values): "
                "refused for safety; re-save it as a plain state dict or .safetensors"
            ) from e
        problem = load_problem(path, e)
        if problem.startswith("cannot be read: "):
            raise WeightsError(f"cannot read weights from {path}: {problem.removeprefix('cannot be read: ')}") from e
        raise WeightsError(f"{path} {problem}") from e


def load_problem(path: Path, error: Exception) -> str:
    """Why ``torch.load`` failed on ``path``, as the end of a sentence that starts with the path: ``is empty (0
    bytes)``, ``is truncated or damaged (...)``, or ``cannot be read: <the error's first line>``."""
    path, text = Path(path), str(error).strip()
    detail = text.splitlines()[0].split(". ")[0] if text else type(error).__name__  # torch adds paragraphs of advice
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    if size == 0:
        return "is empty (0 bytes)"
    if magic == b"PK" or magic[:1] == b"\x80" or isinstance(error, EOFError):  # a torch zip or pickle file
        return f"is truncated or damaged ({size} bytes; {detail})"
    return f"cannot be read: {detail}"


def save_torch(obj: object, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (:func:`twincar.files.atomic_path`): a full disk or a kill leaves
    the previous file intact and no temporary file; an ``OSError`` becomes a :class:`~twincar.files.WriteError`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # torch's writer turns the file's OSError (ENOSPC) into a RuntimeError
            cause = e.__context__
            if isinstance(cause, OSError):
                raise cause from e
            raise
    return Path(path)


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` whose keys start with ``prefix`` (a LightningModule's ``model.``), without it."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def module_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's own tensors of a state dict: a Lightning checkpoint's ``model.``-prefixed ones (the
    :class:`~twincar.models.classifier.CarClassifier` keeps its network as ``self.model``), and a DDP/
    ``DataParallel`` save without its ``module.`` prefix. The one place these prefixes are known."""
    if any(k.startswith("model.") for k in state):
        state = strip_prefix(state, "model.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file; a Lightning checkpoint gives its ``model.``-prefixed module weights."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist: pass model.weights=PATH to an existing file")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors raises several types for a damaged or foreign file
            raise WeightsError(f"cannot read weights from {path}: {e}") from e
    else:
        state = safe_torch_load(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # Lightning checkpoint or a {"state_dict": ...} wrapper
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return module_weights(state)


def checkpoint_class_names(path: str | Path) -> list[str]:
    """Class names stored in a TwinCar Lightning checkpoint (label order)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist: pass ckpt_path=PATH to an existing .ckpt")
    ckpt = safe_torch_load(path)
    try:
        return list(ckpt["hyper_parameters"]["class_names"])
    except Exception as e:  # a foreign file
        raise WeightsError(f"{path} is not a TwinCar checkpoint with class names: {e}") from e


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local weights file into ``model``; a classifier head of another shape is left at init.

    Every non-head tensor must match: a missing or misshapen backbone key is an error naming the file.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    head = model.pretrained_cfg.get("classifier", "fc") if hasattr(model, "pretrained_cfg") else "fc"
    head_keys = {k for k in own if k.startswith(head + ".")}
    for k in head_keys:
        if k in state and state[k].shape != own[k].shape:
            log.info("%s: head %s has shape %s, model needs %s: head left at init",
                     path, k, tuple(state[k].shape), tuple(own[k].shape))
            state = {k2: v for k2, v in state.items() if k2 not in head_keys}
            break
    bad = [k for k in own if k not in head_keys and (k not in state or state[k].shape != own[k].shape)]
    if bad:
        raise WeightsError(
            f"{path} does not fit model {type(model).__name__}: {len(bad)} tensor(s) missing or of another "
            f"shape, e.g. {', '.join(bad[:3])}"
        )
    unexpected = [k for k in state if k not in own]
    if unexpected:
        log.info("%s: ignoring %d tensor(s) the model lacks, e.g. %s", path, len(unexpected), unexpected[0])
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    log.info("loaded weights from %s", path)


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors, detached, on the CPU and contiguous (for resnet50: the torchvision key names)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """The model's fingerprint (:func:`twincar.models.card.fingerprint_of`): a short hash of its tensors' names,
    dtypes, shapes and bytes in name order, so a ``.ckpt``, the ``model.pth`` and the ``model.safetensors`` of the
    same weights share it. Cards, calibrations, neighbour indexes and predict jobs record it."""
    def chunks():
        for name in sorted(state):
            t = state[name].detach().cpu().contiguous().reshape(-1)
            yield f"{name}:{t.dtype}:{tuple(state[name].shape)}", t.view(torch.uint8).numpy().data
    return fingerprint_of(chunks())


def export_state_dict(model: nn.Module, path: str | Path) -> Path:
    """Save a plain state dict (:func:`plain_state_dict`) to ``path`` atomically."""
    return save_torch(plain_state_dict(model), path)


def export_safetensors(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Save the model's tensors as ``.safetensors`` to ``path`` atomically, with ``metadata`` (string keys and
    values, e.g. ``{"format": "pt"}``) in its header."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(plain_state_dict(model), str(tmp), metadata=metadata)
    return Path(path)
