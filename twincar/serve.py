"""Serve predictions over HTTP: ``python -m twincar.serve --model MODEL [--port 8000]`` (also ``twincar-serve``).

A LitServe server (:class:`twincar.inference.serving.TwinCarAPI`) over the one
:class:`~twincar.inference.predictor.Predictor`, so its answers are predict's:
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
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from functools import partial

from twincar.errors import TwinCarError

try:
    import litserve as ls

    from twincar.inference.serving import (
        DEFAULT_MAX_BODY_MB,
        DEFAULT_MAX_QUEUE,
        QueueLimit,
        TwinCarAPI,
        load_predictor,
        model_info,
    )
except ImportError as e:  # the serve extra is not installed
    raise SystemExit("error: python -m twincar.serve needs LitServe: pip install 'twincar[serve]'") from e

log = logging.getLogger(__name__)



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
            "threads": max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers > 1 else None}
    if args.neighbours and onnx:
        raise TwinCarError("--neighbours needs the PyTorch weights (.pth, .safetensors or .ckpt): an ONNX model "
                           "computes no embeddings")
    predictor = load_predictor(args.model, device="cpu", **load)  # fails here, in one sentence, or not at all
    index = None
    if args.neighbours:
        from twincar.evaluation.neighbours import find_index, index_folder

        index = partial(find_index, args.model, index_folder(args.model, args.index), predictor.class_names,
                        predictor.fingerprint, required=True)  # loaded by each worker
        index()  # a missing or foreign index is one sentence here
    info = model_info(predictor, args.model, args.topk, args.neighbours)
    del predictor
    served_by = {k: info[k] for k in ("file", "architecture", "twincar_version")}
    api = TwinCarAPI(args.model, load=load, topk=args.topk, served_by=served_by, max_batch_size=args.max_batch_size,
                     batch_timeout=args.batch_timeout, neighbours=args.neighbours, index=index)
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
    """SIGTERM (docker stop, kubernetes) or Ctrl+C in the main process: LitServe's graceful shutdown. A forked HTTP
    process that inherited this handler ends as the signal ends it (uvicorn raises the signal again once it stopped);
    the inference workers ignore Ctrl+C and are stopped by the main process."""
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
    signal.signal(signal.SIGINT, _stop)  # Ctrl+C: every process of the terminal's group gets it
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
