"""``python -m twincar.synthetic --out DIR [...]`` (``twincar-synthetic``): generate, or reuse, the embedded
synthetic dataset in the Stanford Cars devkit layout (:mod:`twincar.data.synthetic`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from twincar.data.synthetic import SyntheticSpec, generate, is_complete


def main(argv: list[str] | None = None) -> int:
    """``python -m twincar.synthetic --out DIR [...]``: generate (or reuse) a dataset."""
    default = SyntheticSpec()
    parser = argparse.ArgumentParser(prog="python -m twincar.synthetic", description=(
        "Write a synthetic fine-grained car dataset in the Stanford Cars devkit layout "
        "(devkit/*.mat, cars_train/, cars_test/). Reuses DIR if it already holds the same spec."))
    parser.add_argument(
        "--out", required=True, type=Path, help="dataset root to create (must be new, empty, or hold the same spec)"
    )
    parser.add_argument(
        "--num-classes", type=int, default=default.num_classes,
        help=f"number of real Stanford Cars classes, 1-196; year-sibling pairs first (default {default.num_classes})",
    )
    parser.add_argument(
        "--train-per-class", type=int, default=default.train_per_class,
        help=f"training images per class (default {default.train_per_class})",
    )
    parser.add_argument(
        "--test-per-class", type=int, default=default.test_per_class,
        help=f"test images per class (default {default.test_per_class})",
    )
    parser.add_argument(
        "--width", type=int, default=default.width, help=f"image width in pixels (default {default.width})"
    )
    parser.add_argument(
        "--height", type=int, default=default.height, help=f"image height in pixels (default {default.height})"
    )
    parser.add_argument(
        "--difficulty", type=float, default=default.difficulty,
        help="nuisance strength in [0, 1]: pose range, background clutter, blur, lighting, noise, smaller year "
        f"details (default {default.difficulty})",
    )
    parser.add_argument(
        "--seed", type=int, default=default.seed,
        help=f"random seed, >= 0; the same spec gives byte-identical files (default {default.seed})",
    )
    args = parser.parse_args(argv)
    try:
        spec = SyntheticSpec(num_classes=args.num_classes, train_per_class=args.train_per_class,
                             test_per_class=args.test_per_class, width=args.width, height=args.height,
                             difficulty=args.difficulty, seed=args.seed)
    except ValueError as e:
        parser.error(str(e))
    cached = is_complete(args.out, spec)
    try:
        root = generate(args.out, spec)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n_train, n_test = spec.num_classes * spec.train_per_class, spec.num_classes * spec.test_per_class
    print(f"{'reused' if cached else 'wrote'} synthetic Stanford Cars ({spec.num_classes} classes, {n_train} train + "
          f"{n_test} test images, {spec.width}x{spec.height}, fingerprint {spec.fingerprint()}) at {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
