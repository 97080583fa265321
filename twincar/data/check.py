"""Integrity scan of a Stanford Cars copy: ``python -m twincar.data.check ROOT``.

Decodes every image of the chosen splits with the training decoder and reports, per file, what is
wrong: missing, unreadable, or a box outside the image. Counts grayscale images (they are fine:
loaders convert them to RGB). Exits 1 when any image is unusable, so it can gate a long run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from torchvision.io import ImageReadMode

from twincar.data.formats import Sample, load_stanford_cars
from twincar.data.transforms import ImageReadError, load_rgb
from twincar.errors import TwinCarError


@dataclass(frozen=True)
class Finding:
    """One problem with one image."""

    path: str
    problem: str


def inspect(sample: Sample) -> tuple[int | None, Finding | None]:
    """(channel count, problem) of one sample; channel count is None when the image is unusable."""
    if not sample.path.is_file():
        return None, Finding(str(sample.path), "missing")
    try:
        img = load_rgb(sample.path, mode=ImageReadMode.UNCHANGED)
    except ImageReadError as e:
        return None, Finding(str(sample.path), f"unreadable: {e.__cause__ or e}")
    h, w = img.shape[-2:]
    if sample.bbox is not None:
        x1, y1, x2, y2 = sample.bbox
        if not (1 <= x1 < x2 <= w and 1 <= y1 < y2 <= h):
            return img.shape[0], Finding(str(sample.path), f"box {sample.bbox} outside the {w}x{h} image")
    return img.shape[0], None


def check(root: str | Path, splits: tuple[str, ...] = ("train", "test"), workers: int = 8) -> dict:
    """Scan ``splits`` of the devkit copy at ``root``; a report with counts and every finding."""
    report: dict = {"root": str(root), "splits": {}, "findings": []}
    for split in splits:
        samples, _ = load_stanford_cars(root, split)
        with ThreadPoolExecutor(max_workers=workers) as pool:  # decoding releases the GIL
            results = list(pool.map(inspect, samples))
        channels = Counter(c for c, _ in results if c is not None)
        findings = [f for _, f in results if f is not None]
        report["splits"][split] = {
            "images": len(samples),
            "unusable": sum(c is None for c, _ in results),
            "grayscale": channels.get(1, 0),
            "findings": len(findings),
        }
        report["findings"] += [{"split": split, **f.__dict__} for f in findings]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twincar.data.check", description=__doc__.splitlines()[0])
    parser.add_argument("root", help="dataset root in the devkit layout (devkit/, cars_train/, cars_test/)")
    parser.add_argument("--splits", nargs="+", default=["train", "test"], choices=["train", "test"],
                        help="official splits to scan (default: both)")
    parser.add_argument("--workers", type=int, default=8, help="decoding threads (default 8)")
    parser.add_argument("--report", type=Path, help="also write the full report as JSON to this file")
    args = parser.parse_args(argv)
    try:
        report = check(args.root, tuple(args.splits), args.workers)
    except TwinCarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for f in report["findings"]:
        print(f"{f['split']}: {f['path']}: {f['problem']}")
    for split, s in report["splits"].items():
        print(f"{split}: {s['images']} images, {s['unusable']} unusable, {s['findings']} with problems, "
              f"{s['grayscale']} grayscale (converted to RGB when loaded)")
    if args.report:
        args.report.write_text(json.dumps(report, indent=1))
        print(f"report written to {args.report}")
    return 1 if any(s["unusable"] for s in report["splits"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
