#!/usr/bin/env python
"""Benchmark: the cost of an explanation relative to a plain prediction, per CAM method.

    python scripts/bench_explain.py [--model resnet50] [--size 224] [--images 8] [--batch-size 8] [--device cpu]

Reference: ``Predictor.logits`` on the same prepared batch (one forward pass, inference mode). Each method:
``Explainer.explain`` on the same uint8 images (forward + backward + CAM + overlay), with and without the
faithfulness score. Random weights (the cost does not depend on them). Prints images/s and the ratio to
the reference, measured in this process, so the ratio holds on a shared machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import timm
import torch

from twincar.data.classes import stanford_cars_class_names
from twincar.data.preprocess import Preprocess
from twincar.gradcam.explainer import METHODS, Explainer
from twincar.inference.predictor import Predictor


def seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="timm architecture")
    parser.add_argument("--size", type=int, default=224, help="input side, pixels")
    parser.add_argument("--images", type=int, default=8, help="images per measurement")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward/backward pass")
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    names = stanford_cars_class_names()
    predictor = Predictor(timm.create_model(args.model, num_classes=len(names)), names,
                          Preprocess(image_size=args.size), device=args.device)
    images = [torch.randint(0, 256, (3, args.size + 32, args.size + 64), dtype=torch.uint8) for _ in range(args.images)]
    batch = np.stack([predictor.prepare(im) for im in images])
    ref = seconds(lambda: predictor.logits(batch), args.repeats)
    print(f"{args.model} at {args.size} px, {args.images} images, batch {args.batch_size}, {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'prediction (reference)':<32} {args.images / ref:8.1f} img/s   1.0x the time")
    for method in METHODS:
        for faith in (False, True):
            ex = Explainer(predictor, method, faithfulness=faith)
            t = seconds(lambda ex=ex: ex.explain(images, batch_size=args.batch_size), args.repeats)
            label = f"{method}{' + faithfulness' if faith else ''}"
            print(f"{label:<32} {args.images / t:8.1f} img/s {t / ref:5.1f}x the time")


if __name__ == "__main__":
    main()
