"""Serve predictions over HTTP: ``python -m twincar.serve --model MODEL [--port 8000]`` (also ``twincar-serve``).

A LitServe server over the one :class:`~twincar.inference.predictor.Predictor`, so its answers are predict's:
``POST /predict`` takes one photo (the raw body, a multipart field ``image``, or JSON ``{"image": BASE64}``) and
answers predict's JSON record of it (:func:`twincar.inference.writers.json_record`) with ``served_by`` (the model
file, its architecture and the TwinCar that exported it). ``GET /health`` is 200 once the model is loaded, ``GET
/info`` gives the model card (classes, input contract, calibration) and the server's settings, ``/docs`` the
OpenAPI page. Concurrent requests are put together in batches of up to ``--max-batch-size`` (waiting at most
``--batch-timeout`` seconds for one to fill); ``--devices`` and ``--workers-per-device`` run more model copies.

The body is read and checked where it arrives (content type 415, size 413, empty or unreadable form 400, more than
``--max-queue`` requests in flight 503); the inference worker decodes it with the one decoder
(:func:`twincar.data.images.decode_rgb_bytes`: a bomb is 413, anything unreadable 400, each request of a batch on
its own) and runs the batch. Every refusal is one sentence (``{"detail": ...}``) and the server keeps serving. It
never fetches a URL it is given. A model that cannot be loaded is one sentence before the port opens. With an
``.onnx`` model no process imports torch.
"""
# No ``from __future__ import annotations``: LitServe and FastAPI read decode_request's annotation at run time.

import argparse
import base64
import binascii
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated

import numpy as np

from twincar.errors import TwinCarError

try:
    import litserve as ls
    from fastapi import Depends, HTTPException, Request
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, Response
except ImportError as e:  # the serve extra is not installed
    raise SystemExit("error: python -m twincar.serve needs LitServe: pip install 'twincar[serve]'") from e

log = logging.getLogger(__name__)

BODY = "<request body>"  # how an image sent without a file name is named in answers and errors
DEFAULT_MAX_BODY_MB = 20.0
DEFAULT_MAX_QUEUE = 128
FORMS = "the raw body (image/* or application/octet-stream), multipart/form-data with a file field named image, " \
        "or application/json {\"image\": BASE64}"


@dataclass(frozen=True)
class Upload:
    """One request's image bytes (read and checked by :func:`read_upload` where the request arrives) and its name."""

    data: bytes
    name: str = BODY


@dataclass(frozen=True)
class Decoded:
    """What :meth:`TwinCarAPI.decode_request` makes of an upload: the prepared (S, S, 3) ``uint8`` pixels, or the
    sentence and HTTP status of why it cannot be read."""

    name: str
    pixels: np.ndarray | None = None
    error: str | None = None
    status: int = 200


# -- the request body, read where it arrives --------------------------------------------------------------------
async def read_upload(request: Request) -> Upload:
    """The image of a ``POST /predict`` (a FastAPI dependency, run in the HTTP process): the raw body, a multipart
    file field ``image`` or JSON ``{"image": BASE64}``. An unsupported content type is 415, a body over the size
    limit 413, an empty or unreadable one 400, each with one sentence."""
    limit = request.app.state.max_body_bytes
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (kind.startswith("image/") or kind in ("application/octet-stream", "application/json",
                                                  "multipart/form-data")):
        raise HTTPException(415, f"unsupported content type {kind or '(none)'}: send the image as {FORMS}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _too_large(limit)
    except ClientDisconnect as e:
        raise HTTPException(400, "the client disconnected before the whole request body arrived") from e
    if kind == "multipart/form-data":
        upload = await _multipart_image(request, bytes(body))
    elif kind == "application/json":
        upload = _json_image(bytes(body))
    else:
        upload = Upload(bytes(body))
    if not upload.data:
        raise HTTPException(400, f"the image {upload.name} is empty (0 bytes): send the bytes of a photo")
    return upload


def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"the request body is over the {limit / 2**20:g} MB limit (--max-body-mb): send a "
                              "smaller image")


async def _multipart_image(request: Request, body: bytes) -> Upload:
    async def stream():
        yield body

    try:
        form = await MultiPartParser(request.headers, stream()).parse()
    except MultiPartException as e:
        raise HTTPException(400, f"the multipart form cannot be read: {e}") from e
    field = form.get("image")
    if not isinstance(field, UploadFile):
        await form.close()
        raise HTTPException(400, "the multipart form has no file field named image (curl -F image=@car.jpg ...)")
    data = await field.read()
    name = Path(field.filename or "").name[:200] or BODY
    await form.close()
    return Upload(data, name)


def _json_image(body: bytes) -> Upload:
    try:
        payload = json.loads(body)
    except ValueError as e:
        raise HTTPException(400, f"the JSON body is not valid JSON: {e}") from e
    text = payload.get("image") if isinstance(payload, dict) else None
    if not isinstance(text, str):
        raise HTTPException(400, 'the JSON body must be {"image": BASE64}: the bytes of the photo, base64-encoded')
    if text.split(":", 1)[0].lower() in ("http", "https", "ftp", "file", "s3", "gs"):
        raise HTTPException(400, "the server never fetches a URL: send the bytes of the photo, base64-encoded")
    if text.startswith("data:") and "," in text:  # a data URL: data:image/jpeg;base64,...
        text = text.split(",", 1)[1]
    try:
        return Upload(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError) as e:
        raise HTTPException(400, f"the image field is not base64: {e}") from e


class QueueLimit:
    """An ASGI middleware that answers 503 (and ``Retry-After``) to a request on ``path`` while ``limit`` others are
    in flight in this HTTP process: memory stays bounded under a flood instead of growing with the queue."""

    def __init__(self, app, *, limit: int, path: str = "/predict"):
        self.app, self.limit, self.path, self.active = app, limit, path, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            busy = JSONResponse({"detail": f"the server is busy ({self.limit} requests in flight, --max-queue): "
                                           "try again shortly"}, status_code=503, headers={"Retry-After": "1"})
            return await busy(scope, receive, send)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


# -- the model, in each inference worker ------------------------------------------------------------------------
def load_predictor(model: str, *, device: str = "cpu", classes: str | None = None, precision: str = "auto",
                   tta: str | None = None, unknown: str = "auto", threads: int | None = None, neighbours: int = 0,
                   index: str | None = None):
    """The :class:`~twincar.inference.predictor.Predictor` of ``model`` as predict loads it, and the neighbour search
    of ``neighbours`` > 0 (the index beside the model, or ``index``; PyTorch models only), else None."""
    from twincar.inference.predictor import Predictor

    if neighbours and str(model).endswith(".onnx"):
        raise TwinCarError("--neighbours needs the PyTorch weights (.pth, .safetensors or .ckpt): an ONNX model "
                           "computes no embeddings")
    predictor = Predictor.load(model, classes, device=device, precision=precision, tta=tta, unknown=unknown,
                               threads=threads)
    if not neighbours:
        return predictor, None
    from twincar.evaluation.neighbours import NeighbourIndex

    folder = Path(index) if index else Path(model).expanduser().parent / "index"
    return predictor, partial(NeighbourIndex.load(folder, predictor.class_names).search, k=neighbours)


class TwinCarAPI(ls.LitAPI):
    """The LitServe API: ``setup`` loads the model in each worker, ``decode_request`` decodes one upload,
    ``predict`` runs a batch of them through the Predictor, ``encode_response`` answers predict's JSON record."""

    def __init__(self, model: str, *, load: dict, topk: int = 5, served_by: dict | None = None,
                 max_batch_size: int = 16, batch_timeout: float = 0.01):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.model, self.load, self.topk, self.served_by = str(model), dict(load), topk, dict(served_by or {})

    def setup(self, device) -> None:
        """Load the model on this worker's ``device`` (``cpu``, ``cuda:0``...)."""
        threads = self.load.get("threads")
        if threads and not self.model.endswith(".onnx"):
            import torch  # a PyTorch model: torch is here anyway

            torch.set_num_threads(threads)
        self.predictor, self.search = load_predictor(self.model, device=device, **self.load)
        self.open_set = self.predictor.unknown_threshold is not None
        side = self.predictor.preprocess.image_size  # one warm-up pass: /health is ok once answers are quick
        self.predictor.batch_outputs(([0], np.zeros((1, side, side, 3), np.uint8), {}),
                                     embeddings=self.search is not None)

    def decode_request(self, request: Annotated[Upload, Depends(read_upload)]) -> Decoded:
        """The upload decoded by the one decoder and prepared (resize, crop) as predict prepares a file; an image
        that cannot be read is kept as its sentence (413 for a decompression bomb, else 400), so the rest of its
        batch goes on."""
        from twincar.data.images import ImageReadError, decode_rgb_bytes

        try:
            pixels = decode_rgb_bytes(request.data, request.name, min_side=self.predictor.preprocess.decode_min_side)
            return Decoded(request.name, self.predictor.prepare(pixels))
        except ImageReadError as e:
            return Decoded(request.name, error=str(e), status=413 if e.reason == "too large" else 400)

    def batch(self, inputs: list[Decoded]) -> list[Decoded]:
        """The decoded requests as they are: :meth:`predict` stacks the readable ones."""
        return list(inputs)

    def predict(self, x):
        """One forward pass over the readable images of a batch (one request when batching is off); a list of
        ``(Prediction, status, batch size)``, one per request."""
        items = x if self.max_batch_size > 1 else [x]
        good = [i for i, d in enumerate(items) if d.error is None]
        batch = (good, np.stack([items[i].pixels for i in good]) if good else None,
                 {i: d.error for i, d in enumerate(items) if d.error is not None})
        out = self.predictor.batch_outputs(batch, embeddings=self.search is not None)
        answers = self.predictor.batch_predictions(out, [d.name for d in items], self.topk, self.search)
        results = [(p, d.status, len(items)) for p, d in zip(answers, items, strict=True)]
        return results if self.max_batch_size > 1 else results[0]

    def encode_response(self, output) -> Response:
        """Predict's JSON record of the image (200), or ``{"detail": sentence}`` with its status; the header
        ``X-Batch-Size`` says how many requests the forward pass served."""
        from twincar.inference.writers import json_record

        p, status, size = output
        headers = {"X-Batch-Size": str(size)}
        if not p.ok:
            return JSONResponse({"detail": p.error}, status_code=status, headers=headers)
        record = json_record(p, self.open_set, len(p.neighbours))
        return JSONResponse({**record, "served_by": self.served_by}, headers=headers)


# -- the server -------------------------------------------------------------------------------------------------
def model_info(predictor, model: str, topk: int, neighbours: int) -> dict:
    """What ``GET /info`` says of the model: its card's facts (architecture, classes, preprocessing, the input
    contract, metrics), its calibration and the unknown threshold and score in use."""
    from twincar.models.card import input_contract, read_model_card

    card = read_model_card(model) if Path(model).expanduser().is_file() else {}
    return {
        "file": Path(model).name, "engine": predictor.engine.kind, "architecture": card.get("architecture"),
        "twincar_version": card.get("twincar_version"), "num_classes": len(predictor.class_names),
        "class_names": predictor.class_names, "preprocess": predictor.preprocess.to_dict(),
        "input": input_contract(predictor.preprocess), "metrics": card.get("metrics", {}),
        "calibration": predictor.calibration, "unknown_threshold": predictor.unknown_threshold,
        "unknown_score": predictor.score, "tta": predictor.tta, "topk": topk, "neighbours": neighbours,
    }


def onnx_accelerator(accelerator: str) -> str:
    """``auto`` for an ONNX model, without torch: ``cuda`` when onnxruntime has its CUDA provider and nvidia-smi
    lists a GPU, else ``cpu``."""
    if accelerator != "auto":
        return accelerator
    import onnxruntime as ort
    from litserve.connector import check_cuda_with_nvidia_smi

    cuda = "CUDAExecutionProvider" in ort.get_available_providers() and check_cuda_with_nvidia_smi() > 0
    return "cuda" if cuda else "cpu"


def check_port(host: str, port: int) -> None:
    """One sentence when the server cannot listen on ``host:port`` (LitServe's own hosts and ports only)."""
    if host not in ("127.0.0.1", "0.0.0.0", "::"):
        raise TwinCarError(f"--host {host}: use 127.0.0.1 (this machine), 0.0.0.0 or :: (every interface)")
    if not 1024 <= port <= 65535:
        raise TwinCarError(f"--port {port}: use a port from 1024 to 65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise TwinCarError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port") from e


def build_server(args: argparse.Namespace) -> ls.LitServer:
    """The LitServer of the parsed arguments. The model is loaded here once (on the CPU) so that one that cannot
    be loaded is one sentence before any worker starts or the port opens."""
    for flag, value, least in (("--max-batch-size", args.max_batch_size, 1), ("--workers-per-device",
                               args.workers_per_device, 1), ("--topk", args.topk, 1), ("--neighbours",
                               args.neighbours, 0), ("--max-queue", args.max_queue, 1)):
        if value < least:
            raise TwinCarError(f"{flag} must be at least {least}, got {value}")
    if args.batch_timeout < 0 or args.max_body_mb <= 0 or args.timeout <= 0:
        raise TwinCarError("--batch-timeout must be >= 0, --max-body-mb and --timeout > 0")
    check_port(args.host, args.port)
    onnx = str(args.model).endswith(".onnx")
    accelerator = onnx_accelerator(args.accelerator) if onnx else args.accelerator
    devices = args.devices if args.devices == "auto" else int(args.devices)
    if onnx and accelerator == "cuda" and devices not in ("auto", 1):
        raise TwinCarError("an ONNX model serves on one GPU: serve the PyTorch weights (.pth) on several")
    cpu_workers = args.workers_per_device if accelerator == "cpu" else 0
    load = {"classes": args.classes, "precision": args.precision, "tta": args.tta, "unknown": args.unknown,
            "neighbours": args.neighbours, "index": args.index,
            "threads": max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers > 1 else None}
    predictor, _ = load_predictor(args.model, device="cpu", **load)  # fails here, in one sentence, or not at all
    info = model_info(predictor, args.model, args.topk, args.neighbours)
    del predictor
    served_by = {k: info[k] for k in ("file", "architecture", "twincar_version")}
    api = TwinCarAPI(args.model, load=load, topk=args.topk, served_by=served_by, max_batch_size=args.max_batch_size,
                     batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator=accelerator, devices=devices, workers_per_device=args.workers_per_device,
                          timeout=args.timeout, model_metadata=info,
                          middlewares=[(QueueLimit, {"limit": args.max_queue, "path": "/predict"})])
    server.app.state.max_body_bytes = int(args.max_body_mb * 2**20)
    return server


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twincar-serve",
        description="Serve car predictions over HTTP (LitServe): POST /predict, GET /health, GET /info, /docs.",
    )
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="what predict takes: a .ckpt, an exported .pth/.safetensors/.onnx (no torch), "
                             "local-dir:DIR or hf-hub:USER/REPO")
    parser.add_argument("--classes", metavar="PATH", help="classes.txt, when the model file carries no class names")
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default: this machine only), 0.0.0.0 or ::")
    parser.add_argument("--port", type=int, default=8000, help="default 8000")
    parser.add_argument("--max-batch-size", type=int, default=16, metavar="N",
                        help="requests put together in one forward pass (default 16; 1: no batching)")
    parser.add_argument("--batch-timeout", type=float, default=0.01, metavar="S",
                        help="seconds a batch waits to fill (default 0.01)")
    parser.add_argument("--accelerator", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the GPUs when there are any")
    parser.add_argument("--devices", default="auto", metavar="N|auto", help="GPUs to serve on (default: all)")
    parser.add_argument("--workers-per-device", type=int, default=1, metavar="N",
                        help="model copies per device (on the CPU they share the cores)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="as predict: bf16 autocast where the hardware computes it natively (PyTorch models)")
    parser.add_argument("--tta", choices=("flip",), help="average the logits with the mirror image's")
    parser.add_argument("--topk", type=int, default=5, help="classes per answer (default 5)")
    parser.add_argument("--unknown", default="auto", metavar="auto|off|VALUE",
                        help="as predict: the model's calibrated unknown threshold (auto), none (off) or a value")
    parser.add_argument("--neighbours", type=int, default=0, metavar="K",
                        help="add the K nearest training images (an index built by python -m twincar.index)")
    parser.add_argument("--index", metavar="DIR", help="the neighbour index folder (default: index/ beside the model)")
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB, metavar="MB",
                        help=f"the largest request body (default {DEFAULT_MAX_BODY_MB:g} MB; larger: 413)")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, metavar="N",
                        help=f"requests in flight per HTTP process before 503 (default {DEFAULT_MAX_QUEUE})")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S",
                        help="seconds a request may wait for a worker before 504 (default 30)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    return parser


_MAIN_PID = os.getpid()


def _stop(signum, frame):
    """SIGTERM (docker stop, kubernetes) in the main process: LitServe's graceful shutdown, as Ctrl+C. A forked HTTP
    process that inherited this handler ends as SIGTERM ends it (uvicorn raises the signal again once it stopped)."""
    if os.getpid() == _MAIN_PID:
        raise KeyboardInterrupt
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: serve until stopped (Ctrl+C or SIGTERM); a user error is one sentence and exit 1."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        server = build_server(args)
    except (TwinCarError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _stop)
    print(f"serving {args.model} on http://{args.host}:{args.port} (POST /predict, GET /health, GET /info, /docs)",
          file=sys.stderr, flush=True)
    try:
        server.run(host=args.host, port=args.port, log_level=args.log_level, generate_client_file=False)
    except RuntimeError as e:  # a worker failed to load the model (it logged why): nothing was served
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from twincar.serve import main as serve_main  # the module's own name: its classes pickle for the workers

    sys.exit(serve_main())
