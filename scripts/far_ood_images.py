#!/usr/bin/env python
"""Write far out-of-distribution images: pictures of no car at all, for ``python -m twincar.eval ood=DIR``.

    python scripts/far_ood_images.py OUT [--count 60] [--size 128] [--seed 0]

A third each of colour noise, smooth gradients and flat shapes on a plain ground, as JPEGs, the same for the same
seed: :func:`twincar.evaluation.unknown.write_far_images`, the images calibration also chooses the default unknown
score on. The embedded dataset's own unknown classes (``ood=synthetic``) are near out-of-distribution: cars from the
same renderer. These are the far end: a model should find them least like its classes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from twincar.evaluation.unknown import FAR_COUNT, FAR_SIZE, write_far_images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the images into")
    parser.add_argument("--count", type=int, default=FAR_COUNT, help=f"how many images (default {FAR_COUNT})")
    parser.add_argument("--size", type=int, default=FAR_SIZE, help=f"side in pixels (default {FAR_SIZE})")
    parser.add_argument("--seed", type=int, default=0, help="the same seed writes the same images")
    args = parser.parse_args(argv)
    paths = write_far_images(args.out, args.count, args.size, args.seed)
    print(f"{len(paths)} images of no car -> {args.out}")


if __name__ == "__main__":
    main()
