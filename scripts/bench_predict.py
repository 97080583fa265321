"""Predict speed and bf16 agreement: the original per-image loop vs TwinCar's batched Predictor, fp32 vs bf16.

    python scripts/bench_predict.py --model RUN/checkpoints/last.ckpt --images data/synthetic/<hash>/cars_test

Prints images/s of each path and its ratio to the reference measured in the same run (the original TwinCars
loop: PIL + torchvision transforms, one image at a time, fp32), and the top-1 agreement of bf16 (and of an ONNX
export, with --onnx) with fp32 on the same images. Use trained weights: a random network predicts one class for
everything, which makes any agreement meaningless.
"""

from __future__ import annotations

import argparse
import time

import torch
from PIL import Image
from torchvision import transforms as T

from twincar import Predictor
from twincar.inference import resolve_precision
from twincar.predict import find_images


def original_loop(predictor: Predictor, files: list) -> tuple[float, list[int]]:
    """The original project's predict.py: per image, PIL decode, Resize/ToTensor/Normalize, batch of one."""
    pre = predictor.preprocess
    squash = pre.resize_mode == "squash"
    size = (pre.image_size, pre.image_size) if squash else round(pre.image_size / pre.eval_crop_pct)
    tf = T.Compose([T.Resize(size), T.CenterCrop(pre.image_size), T.ToTensor(), T.Normalize(pre.mean, pre.std)])
    model = predictor.model
    start = time.perf_counter()
    labels = []
    with torch.no_grad():
        for f in files:
            x = tf(Image.open(f).convert("RGB")).unsqueeze(0).contiguous().to(predictor.device)
            labels.append(int(model(x).argmax(1)))
    return time.perf_counter() - start, labels


def batched(predictor: Predictor, files: list, batch_size: int, workers: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    results = predictor.predict(files, batch_size=batch_size, num_workers=workers)
    return time.perf_counter() - start, [r.label for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--classes")
    parser.add_argument("--images", nargs="+", required=True)
    parser.add_argument("--onnx", help="an ONNX export of the same model, for its agreement and speed")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the best time of each is kept")
    args = parser.parse_args()
    files = find_images(args.images)
    fp32 = Predictor.load(args.model, args.classes, device="cpu", precision="fp32")
    bf16 = Predictor.load(args.model, args.classes, device="cpu", precision="bf16")
    fp32.predict(files[: args.batch_size], batch_size=args.batch_size)  # warm-up (oneDNN kernels, caches)
    bf16.predict(files[: args.batch_size], batch_size=args.batch_size)
    runs = {
        "original loop (per image, fp32)": lambda: original_loop(fp32, files),
        "Predictor fp32 (batched, channels_last)": lambda: batched(fp32, files, args.batch_size, args.workers),
        "Predictor bf16 autocast": lambda: batched(bf16, files, args.batch_size, args.workers),
    }
    if args.onnx:
        onnx = Predictor.load(args.onnx, args.classes, device="cpu")
        onnx.predict(files[: args.batch_size], batch_size=args.batch_size)
        runs["Predictor ONNX Runtime (fp32)"] = lambda: batched(onnx, files, args.batch_size, args.workers)
    best: dict[str, tuple[float, list[int]]] = {}
    for _ in range(args.repeat):  # interleaved rounds, best time of each: a shared machine's load hits all alike
        for name, run in runs.items():
            seconds, labels = run()
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, labels)
    rows = [(name, *best[name]) for name in runs]
    ref_s = rows[0][1]
    n = len(files)
    auto = resolve_precision("auto", torch.device("cpu"))
    print(f"{n} images, {torch.get_num_threads()} threads, --precision auto picks {'bf16' if auto else 'fp32'} here")
    fp32_labels = rows[1][2]
    for name, seconds, labels in rows:
        agree = sum(a == b for a, b in zip(labels, fp32_labels, strict=True)) / n
        print(f"{name:42s} {n / seconds:8.1f} img/s  x{ref_s / seconds:5.2f}  top-1 agreement with fp32 {agree:.4f}")


if __name__ == "__main__":
    main()
