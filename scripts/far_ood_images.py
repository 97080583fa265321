#!/usr/bin/env python
"""Write far out-of-distribution images: pictures of no car at all, for ``python -m twincar.eval ood=DIR``.

    python scripts/far_ood_images.py OUT [--count 60] [--size 128] [--seed 0]

A third each of colour noise, smooth gradients and flat shapes on a plain ground, as JPEGs, the same for the same
seed. The embedded dataset's own unknown classes (``ood=synthetic``) are near out-of-distribution: cars from the
same renderer. These are the far end: a model should find them least like its classes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from twincar.files import atomic_path

KINDS = ("noise", "gradient", "shapes")


def far_ood_image(kind: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One ``size`` x ``size`` RGB image of ``kind`` (one of :data:`KINDS`)."""
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    if kind == "gradient":
        t = np.linspace(0, 1, size)
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        ramp = t[None, :, None] if rng.random() < 0.5 else t[:, None, None]
        return Image.fromarray((a + (b - a) * np.broadcast_to(ramp, (size, size, 1))).astype(np.uint8))
    image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 5))):
        x0, y0 = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
        x1, y1 = x0 + int(rng.integers(size // 8, size // 2)), y0 + int(rng.integers(size // 8, size // 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    return image


def write_far_ood(out: str | Path, count: int = 60, size: int = 128, seed: int = 0) -> list[Path]:
    """Write ``count`` images (:func:`far_ood_image`, the kinds in turn) into ``out``; their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        path = out / f"{kind}_{i:04d}.jpg"
        with atomic_path(path) as tmp:  # temp file beside it, fsync, rename
            far_ood_image(kind, rng, size).save(tmp, "JPEG", quality=90)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the images into")
    parser.add_argument("--count", type=int, default=60, help="how many images (default 60)")
    parser.add_argument("--size", type=int, default=128, help="side in pixels (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed writes the same images")
    args = parser.parse_args(argv)
    paths = write_far_ood(args.out, args.count, args.size, args.seed)
    print(f"{len(paths)} images of no car -> {args.out}")


if __name__ == "__main__":
    main()
