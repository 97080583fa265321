"""The web demo (the original TwinCars Hugging Face Space, rebuilt): ``python -m twincar.demo --model PATH``.

Upload, drop or paste a car photo (or pick an example) and see its make, model, year and (calibrated) confidence, or,
for a car below the model's unknown threshold, "Not one of the N cars I know" with the closest classes; the top-5
classes as bars, on request a Grad-CAM overlay (:mod:`twincar.gradcam.explainer`), and, when a neighbour index is
beside the model
(``index/``, built by ``python -m twincar.index``), the nearest training cars as thumbnails with their class and
similarity (:mod:`twincar.evaluation.neighbours`, from the prediction's own forward pass). Everything goes through one
:class:`~twincar.inference.predictor.Predictor`, so the answer equals ``twincar.predict`` on the same file. Runs offline
(no CDN assets, analytics off); uploads are limited in size; one prediction runs at a time (Gradio queue).
``build_app`` makes the app (tests and ``space/app.py`` call it); ``main`` is the thin argparse entry point.
Gradio (the ``demo`` extra) is imported only here.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from twincar.errors import TwinCarError

log = logging.getLogger(__name__)

MAX_UPLOAD_MB = 10  # larger uploads are refused with a message
MODEL_FILES = ("model.safetensors", "model.pth", "model.ckpt", "model.onnx")  # looked for in a Space folder
EXAMPLE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
OVERLAY_MIN_SIDE = 256  # a smaller network input's Grad-CAM overlay is enlarged to this side for display
QUEUE_SIZE = 32  # requests waiting beyond this are turned away ("queue full") instead of piling up
EMPTY_ANSWER = ("", "", "", "", None, None)
NEIGHBOURS = 3  # nearest training cars shown when an index is beside the model
THUMBNAIL_SIDE = 192  # their thumbnails' longer side, pixels


def find_model_file(folder: str | Path) -> Path:
    """The model file of a Space folder: the first of ``MODEL_FILES`` present (PyTorch first, for Grad-CAM)."""
    folder = Path(folder)
    for name in MODEL_FILES:
        if (folder / name).is_file():
            return folder / name
    raise TwinCarError(f"no model file in {folder}: put one of {', '.join(MODEL_FILES)} there (with model_card.json)")


def example_images(folder: str | Path | None) -> list[str]:
    """Image files in ``folder`` (sorted), for the examples gallery; none when ``folder`` is None or absent."""
    if folder is None or not Path(folder).is_dir():
        return []
    return [str(p) for p in sorted(Path(folder).iterdir()) if p.suffix.lower() in EXAMPLE_SUFFIXES]


def thumbnail(path: str, side: int = THUMBNAIL_SIDE):
    """An (H, W, 3) uint8 thumbnail of an image file, its longer side ``side``; None when it cannot be read."""
    import numpy as np

    from twincar.data.images import ImageReadError, load_rgb
    from twincar.evaluation.neighbours import thumbnail_image

    try:
        return np.asarray(thumbnail_image(load_rgb(path, min_side=side), side))
    except ImageReadError:
        return None


def neighbour_gallery(prediction, index=None) -> list[tuple]:
    """``(thumbnail, "class (similarity)")`` of each of a prediction's nearest training cars: the thumbnail the
    ``index`` keeps, else the image file when it can be read here (an index lists the paths of the machine that
    built it)."""
    gallery = []
    for path, name, similarity in prediction.neighbours:
        image = index.thumbnail(path) if index is not None else None
        image = thumbnail(path) if image is None else image
        if image is not None:
            gallery.append((image, f"{name} ({similarity:.2f})"))
    return gallery


def _enlarged(overlay):
    """An (S, S, 3) uint8 overlay enlarged (bilinear) to ``OVERLAY_MIN_SIDE`` when smaller, for display."""
    if overlay is None or overlay.shape[0] >= OVERLAY_MIN_SIDE:
        return overlay
    import numpy as np
    from PIL import Image

    side = OVERLAY_MIN_SIDE
    return np.asarray(Image.fromarray(overlay).resize((side, side), Image.Resampling.BILINEAR))


class Answerer:
    """What the app computes for one upload: the prediction fields, the top-5 and the optional Grad-CAM overlay.

    Never raises for a bad upload: a missing, oversized or unreadable file gives an empty answer and a message.
    With a neighbour ``index``, the answer also holds the gallery of the ``neighbours`` nearest training cars
    (before the message).
    """

    def __init__(self, predictor, *, max_upload_mb: float = MAX_UPLOAD_MB, index=None, neighbours: int = NEIGHBOURS):
        self.predictor = predictor
        self.max_bytes = int(max_upload_mb * 1024 * 1024)
        self._explainer = None
        self.index = index if neighbours > 0 else None
        self.neighbours = neighbours

    def explainer(self):
        """The Grad-CAM explainer, built on first use (PyTorch models only)."""
        if self._explainer is None:
            from twincar.gradcam.explainer import Explainer

            self._explainer = Explainer(self.predictor, method="gradcam", faithfulness=False)
        return self._explainer

    def __call__(self, path: str | None, show_cam: bool = False) -> tuple:
        """``(make, model, year, confidence, top-k {name: prob}, overlay or None, message)`` for an uploaded file;
        with an index, ``(..., overlay or None, gallery, message)``."""
        answer, prediction = self._answer(path, show_cam)
        if self.index is None:
            return answer
        gallery = neighbour_gallery(prediction, self.index) if prediction is not None and prediction.ok else None
        return (*answer[:-1], gallery, answer[-1])

    def _predict(self, path: str, show_cam: bool) -> tuple:
        """(the prediction, with its neighbours when there is an index; the Grad-CAM overlay or None)."""
        if show_cam:
            explanation = self.explainer().explain(path)
            prediction, overlay = explanation.prediction, _enlarged(explanation.overlay)
            if self.index is not None and prediction.ok:
                prediction.neighbours = self.index.search(self.predictor.embed(path), self.neighbours)[0]
            return prediction, overlay
        if self.index is None:
            return self.predictor.predict(path, topk=5), None
        search = partial(self.index.search, k=self.neighbours)  # from the prediction's own forward pass
        return next(self.predictor.iter_predict([path], topk=5, neighbours=search)), None

    def _answer(self, path: str | None, show_cam: bool) -> tuple[tuple, object]:
        """The answer without the gallery, and the prediction (None when there is none)."""
        if not path:
            return (*EMPTY_ANSWER, "Upload a car photo, drop one here, or pick an example."), None
        name = Path(path).name
        size = Path(path).stat().st_size if Path(path).is_file() else 0
        if size > self.max_bytes:
            limit = self.max_bytes / 2**20
            return (*EMPTY_ANSWER, f"**{name}** is {size / 2**20:.1f} MB: the limit is {limit:.0f} MB."), None
        note = ""
        if show_cam and self.predictor.is_onnx:
            note = "Grad-CAM needs a PyTorch model (.safetensors, .pth or .ckpt), not ONNX."
            show_cam = False
        prediction, overlay = self._predict(path, show_cam)
        if not prediction.ok:
            reason = prediction.error.replace(str(path), name)
            return (*EMPTY_ANSWER, f"Cannot use this file: {reason}. Upload a JPEG or PNG photo."), prediction
        if not prediction.known:  # below the model's calibrated unknown threshold: say so, show the closest classes
            return ("", "", "", "", dict(prediction.topk), overlay, unknown_message(prediction, note)), prediction
        year = "" if prediction.year is None else str(prediction.year)
        return (prediction.make, prediction.model, year, f"{prediction.confidence:.1%}", dict(prediction.topk),
                overlay, f"### {prediction.name}\n{note}"), prediction


def unknown_message(prediction, note: str = "") -> str:
    """The demo's answer for a car that is none of the model's classes: that, and which classes are closest."""
    closest = ", ".join(name for name, _ in prediction.topk[:3])
    return (f"### Not one of the {prediction.num_classes} cars I know\nThe closest of them: {closest} (unknown score "
            f"{prediction.unknown_score:.2f}, below the model's threshold).\n{note}")


def _unopened_path(payload) -> str | None:
    """The uploaded file's path (Gradio ``FileData``), without opening it."""
    return None if payload is None or getattr(payload, "path", None) is None else str(payload.path)


def build_app(predictor, *, examples: Sequence[str] = (), max_upload_mb: float = MAX_UPLOAD_MB, title: str = "TwinCar",
              index=None, neighbours: int = NEIGHBOURS):
    """The Gradio Blocks app over ``predictor`` (not launched; see :func:`launch`); with a neighbour ``index``, a
    gallery of the ``neighbours`` nearest training cars of each photo."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    answer = Answerer(predictor, max_upload_mb=max_upload_mb, index=index, neighbours=neighbours)
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"# {title}: which car is it?\nUpload or drop a photo of a car: the model names its make, model "
                    f"and year ({len(predictor.class_names)} classes).")
        with gr.Row():
            with gr.Column():
                photo = gr.Image(type="filepath", label="Car photo", sources=["upload", "clipboard"], elem_id="photo",
                                 height=360)
                # hand the upload's path over unopened: gr.Image would open it with PIL and fail inside Gradio (a
                # server traceback) on a non-image or a decompression bomb; our decoder names the problem instead.
                # (An instance attribute, not a subclass: Gradio writes a .pyi file beside any subclass's module.)
                photo.preprocess = _unopened_path
                # Grad-CAM needs PyTorch weights: not offered for an ONNX model
                show_cam = gr.Checkbox(label="Show Grad-CAM (where the model looks)", value=False, elem_id="gradcam",
                                       visible=not predictor.is_onnx)
            with gr.Column():
                message = gr.Markdown("Upload a car photo, drop one here, or pick an example.", elem_id="message")
                with gr.Row():
                    make = gr.Textbox(label="Make", interactive=False, elem_id="make")
                    model = gr.Textbox(label="Model", interactive=False, elem_id="model")
                with gr.Row():
                    year = gr.Textbox(label="Year", interactive=False, elem_id="year")
                    confidence = gr.Textbox(label="Confidence", interactive=False, elem_id="confidence")
                top5 = gr.Label(num_top_classes=5, label="Top 5", elem_id="top5")
                overlay = gr.Image(label="Grad-CAM (the network's input; red: what drove the answer)",
                                   interactive=False, elem_id="overlay", type="numpy", height=280)
                gallery = [gr.Gallery(label="Nearest training cars (class, cosine similarity)", elem_id="neighbours",
                                      columns=answer.neighbours, height=240, object_fit="contain", interactive=False,
                                      format="png")] if answer.index is not None else []
        outputs = [make, model, year, confidence, top5, overlay, *gallery, message]
        if examples:
            gr.Examples(examples=[[e] for e in examples], inputs=[photo], label="Examples")
        photo.change(answer, [photo, show_cam], outputs, api_name="predict")  # upload, drop, paste, example, clear
        show_cam.change(answer, [photo, show_cam], outputs, api_name=False)
    return app


def launch(app, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           max_upload_mb: float = MAX_UPLOAD_MB, block: bool = True):
    """Start the server: one prediction at a time, at most ``QUEUE_SIZE`` waiting, uploads up to ``max_upload_mb``."""
    app.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    return app.launch(server_name=host, server_port=port, share=share, max_file_size=f"{max_upload_mb}mb",
                      prevent_thread_lock=not block, quiet=True, footer_links=[])


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: a user error prints one sentence and exits 1."""
    parser = argparse.ArgumentParser(prog="python -m twincar.demo", description="TwinCar web demo (Gradio).")
    parser.add_argument("--model", required=True, help="a .ckpt, .pth, .safetensors or .onnx")
    parser.add_argument("--classes", help="classes.txt or classes.csv, when the model file carries no class names")
    parser.add_argument("--examples", help="a folder of example photos shown under the upload box")
    parser.add_argument("--index", help="a neighbour index (python -m twincar.index; default: index/ beside the model, "
                                        "when there is one): shows the nearest training cars")
    parser.add_argument("--neighbours", type=int, default=NEIGHBOURS,
                        help=f"nearest training cars shown with an index (default {NEIGHBOURS}; 0: none)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", type=_bool, default=False, help="true: also a public gradio.live link (network)")
    parser.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB, help="upload size limit in MB")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    from twincar.evaluation.neighbours import find_index
    from twincar.inference.predictor import Predictor

    try:
        predictor = Predictor.load(args.model, args.classes, device=args.device)
        index = None if predictor.is_onnx or args.neighbours < 1 else find_index(
            args.model, args.index, predictor.class_names, predictor.fingerprint)
    except TwinCarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    app = build_app(predictor, examples=example_images(args.examples), max_upload_mb=args.max_upload_mb,
                    index=index, neighbours=args.neighbours)
    print(f"TwinCar demo on http://{args.host}:{args.port} (Ctrl+C to stop)")
    launch(app, host=args.host, port=args.port, share=args.share, max_upload_mb=args.max_upload_mb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
