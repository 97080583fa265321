"""Hugging Face Space: the TwinCar demo over the model files in this folder.

By default it serves ``model.onnx`` (with its ``model_card.json``) with ``Predictor.load``'s ONNX engine, torch-free
(numpy, PIL, onnxruntime; ``requirements.txt`` has no torch). Grad-CAM needs PyTorch
weights: with ``model.safetensors`` (or ``model.pth`` / ``model.ckpt``) here and ``requirements-gradcam.txt``
installed, those are served instead, Grad-CAM offered, and with them an ``index/`` folder (``python -m twincar.index``,
which keeps a thumbnail of each training image) shows the nearest training cars. Optionally an ``examples/`` folder
of photos, and the ``twincar`` package (see README.md). Locally: ``python space/app.py``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from twincar.demo import build_app, example_images, launch  # noqa: E402

HERE = Path(__file__).resolve().parent
TORCH_FILES = ("model.safetensors", "model.pth", "model.ckpt")  # PyTorch weights: Grad-CAM possible


def _torch_installed() -> bool:
    """Whether torch can be imported here, without importing it (a broken install counts as none)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def load_predictor(folder: str | Path):
    """The ONNX model (torch-free); the PyTorch weights (Grad-CAM) when they are here and torch is
    installed, or when there is no ONNX model."""
    folder = Path(folder)
    classes = folder / "classes.txt"
    classes = classes if classes.is_file() else None
    torch_file = next((folder / n for n in TORCH_FILES if (folder / n).is_file()), None)
    has_torch = _torch_installed()
    from twincar.inference.predictor import Predictor

    if (folder / "model.onnx").is_file() and not (torch_file and has_torch):
        return Predictor.load(folder / "model.onnx", classes)
    if not has_torch:
        from twincar.errors import TwinCarError

        raise TwinCarError(f"no model.onnx in {folder}: export one (python -m twincar.export ... format=onnx), or "
                           "install requirements-gradcam.txt to serve PyTorch weights")
    from twincar.demo import find_model_file

    return Predictor.load(torch_file or find_model_file(folder), classes)


def create_app(folder: str | Path = HERE):
    """The demo app over the model file (with ``index/`` and ``examples/``) in ``folder``."""
    folder = Path(folder)
    predictor = load_predictor(folder)
    index = None
    if not predictor.is_onnx:  # the neighbours need PyTorch weights (and torch: not imported for an ONNX model)
        from twincar.evaluation.neighbours import find_index

        index = find_index(folder / "model", class_names=predictor.class_names,
                           fingerprint=predictor.fingerprint)  # index/
    return build_app(predictor, examples=example_images(folder / "examples"), title="TwinCar", index=index)


if __name__ == "__main__":
    # Spaces route traffic to 0.0.0.0:7860; locally the same address serves http://127.0.0.1:7860
    launch(create_app(), host=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
           port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
