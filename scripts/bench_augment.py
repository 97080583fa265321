#!/usr/bin/env python
"""Benchmark: photometric augmentation per batch on the device vs the same work per image.

    python scripts/bench_augment.py [--device cuda] [--batch-size 64] [--size 224] [--batches 10]

Reference: torchvision v2 ColorJitter + GaussianBlur + ToDtype + Normalize applied image by image,
as a DataLoader worker would. TwinCar: ``BatchTransform`` (kornia, per-sample parameters) on a
uint8 batch already on ``--device``. Both use the seed augmentation settings and run in this
process; the script prints images/s of each and their ratio. On a CPU-only machine the two share
the same cores, so the ratio says little about a GPU run: run it where training runs.
"""

from __future__ import annotations

import argparse
import time

import torch
from torchvision.transforms import v2

from twincar.data.preprocess import Preprocess
from twincar.data.transforms import Augmentation, BatchTransform


def images_per_second(fn, batch: torch.Tensor, batches: int, device: torch.device) -> float:
    fn(batch)  # warm-up (kernel selection, allocations)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        fn(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batches * len(batch) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device for TwinCar's batch work")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--batches", type=int, default=10, help="timed batches per method")
    args = parser.parse_args(argv)

    aug = Augmentation(color_jitter=(0.3, 0.3, 0.3, 0.02), color_jitter_prob=0.8, blur_prob=0.2,
                       blur_sigma=(0.1, 1.5))  # the seed augmentation
    pre = Preprocess(image_size=args.size)
    per_image = v2.Compose([
        v2.RandomApply([v2.ColorJitter(*aug.color_jitter)], p=aug.color_jitter_prob),
        v2.RandomApply([v2.GaussianBlur(2 * int(3 * aug.blur_sigma[1]) + 1, aug.blur_sigma)], p=aug.blur_prob),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(pre.mean, pre.std),
    ])
    device = torch.device(args.device)
    batch_tf = BatchTransform(pre, aug, num_classes=10)
    images = torch.randint(0, 256, (args.batch_size, 3, args.size, args.size), dtype=torch.uint8)
    labels = torch.zeros(args.batch_size, dtype=torch.long)

    reference = images_per_second(lambda b: [per_image(img) for img in b], images, args.batches, torch.device("cpu"))
    on_device = images.to(device)
    twincar = images_per_second(lambda b: batch_tf(b, labels.to(device)), on_device, args.batches, device)
    print(f"per image, CPU (reference): {reference:9.1f} images/s")
    print(f"per batch, {device.type:<15} {twincar:9.1f} images/s")
    print(f"ratio (per batch / per image): {twincar / reference:.2f}x")


if __name__ == "__main__":
    main()
