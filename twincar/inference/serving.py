"""The HTTP inference API's LitServe side (:class:`TwinCarAPI`), over the one
:class:`~twincar.inference.predictor.Predictor`: where a request's body is read and checked (:func:`read_upload`), the
per-process queue limit (:class:`QueueLimit`) and what ``GET /info`` says (:func:`model_info`). The command line that
builds and starts the server is :mod:`twincar.serve`.
"""
# No ``from __future__ import annotations``: LitServe and FastAPI read decode_request's annotation at run time.

import base64
import binascii
import json
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import litserve as ls
import numpy as np
from fastapi import Depends, HTTPException, Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

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
                   tta: str | None = None, unknown: str = "auto", threads: int | None = None):
    """The :class:`~twincar.inference.predictor.Predictor` of ``model`` as predict loads it."""
    from twincar.inference.predictor import Predictor

    return Predictor.load(model, classes, device=device, precision=precision, tta=tta, unknown=unknown,
                          threads=threads)


class TwinCarAPI(ls.LitAPI):
    """The LitServe API: ``setup`` loads the model in each worker, ``decode_request`` decodes one upload,
    ``predict`` runs a batch of them through the Predictor, ``encode_response`` answers predict's JSON record."""

    def __init__(self, model: str, *, load: dict, topk: int = 5, served_by: dict | None = None,
                 max_batch_size: int = 16, batch_timeout: float = 0.01, neighbours: int = 0,
                 index: Callable[[], Any] | None = None):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.model, self.load, self.topk, self.served_by = str(model), dict(load), topk, dict(served_by or {})
        self.neighbours, self.index = neighbours, index  # index(): the neighbour index, loaded in each worker

    def setup(self, device) -> None:
        """Load the model on this worker's ``device`` (``cpu``, ``cuda:0``...)."""
        # Ctrl+C reaches every process of the terminal's group: the main process stops this worker
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        threads = self.load.get("threads")
        if threads and not self.model.endswith(".onnx"):
            import torch  # a PyTorch model: torch is here anyway

            torch.set_num_threads(threads)
        self.predictor = load_predictor(self.model, device=device, **self.load)
        self.search = self.index().searcher(self.neighbours) if self.index and self.neighbours else None
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


