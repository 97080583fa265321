"""Hugging Face Space: the TwinCar demo over the model file in this folder.

Put ``model.safetensors`` (or ``model.pth`` / ``model.ckpt`` / ``model.onnx``) with its ``model_card.json`` here,
optionally an ``examples/`` folder of photos, and the ``twincar`` package (see README.md). Locally:
``python space/app.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from twincar.demo import build_app, example_images, find_model_file, launch  # noqa: E402
from twincar.inference import Predictor  # noqa: E402

HERE = Path(__file__).resolve().parent


def create_app(folder: str | Path = HERE):
    """The demo app over the model file (and ``examples/``) in ``folder``."""
    folder = Path(folder)
    classes = folder / "classes.txt"
    predictor = Predictor.load(find_model_file(folder), classes if classes.is_file() else None)
    return build_app(predictor, examples=example_images(folder / "examples"), title="TwinCar")


if __name__ == "__main__":
    # Spaces route traffic to 0.0.0.0:7860; locally the same address serves http://127.0.0.1:7860
    launch(create_app(), host=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
           port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
