"""Integrity scan of a Stanford Cars copy (any layout): ``python -m twincar.check ROOT``.

Decodes every image of both splits with the training decoder and reports each problem, on screen
and as one CSV row per problem (``--report report.csv``; ``.json`` for JSON):

* errors (exit code 1): missing, empty (0 bytes), not an image, too large (a decompression bomb,
  refused from the header before decoding), truncated, corrupt;
* warnings: the same file content in train and test (content hash), a box outside the image;
* info: grayscale and CMYK images (fine: they are converted to RGB when loaded).

:func:`find_unreadable` is the quick header-only pass that training runs first (``data.on_corrupt``).
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from twincar.data.formats import Sample, load_dataset
from twincar.data.formats.parquet import image_bytes
from twincar.data.images import (
    ImageReadError,
    decode_rgb_bytes,
    oriented_box,
    read_error,
    read_header,
    sample_header,
    sample_label,
)
from twincar.files import write_csv, write_json

ERROR, WARNING, INFO = "error", "warning", "info"
MODE_INFO = {"L": "grayscale", "I;16": "grayscale", "LA": "grayscale", "CMYK": "CMYK"}


@dataclass(frozen=True)
class Finding:
    """One problem with one image: ``severity`` is error, warning or info."""

    split: str
    path: str
    severity: str
    problem: str
    detail: str = ""


@dataclass(frozen=True)
class Inspection:
    """What decoding one sample found: its problems and its content hash (None when unreadable)."""

    findings: tuple[Finding, ...]
    digest: str | None


def _read_bytes(sample: Sample) -> bytes:
    if sample.index is not None:
        return image_bytes(sample.path, sample.index)
    try:
        return sample.path.read_bytes()
    except OSError as e:  # no such file, permission denied, a symlink loop: named as load_rgb names them
        raise read_error(sample.path, e) from e


def inspect(sample: Sample, split: str = "") -> Inspection:
    """Decode one sample (header first) and list its problems."""
    name = sample_label(sample)
    try:
        data = _read_bytes(sample)
        header = read_header(data, name)
        img = decode_rgb_bytes(data, name)  # exactly as training decodes it
    except ImageReadError as e:
        return Inspection((Finding(split, name, ERROR, e.reason, str(e)),), None)
    findings = []
    if header.mode in MODE_INFO:
        findings.append(Finding(split, name, INFO, MODE_INFO[header.mode],
                                f"{header.mode} image, converted to RGB when loaded"))
    h, w = img.shape[:2]
    if sample.bbox is not None:
        x1, y1, x2, y2 = oriented_box(sample.bbox, header)  # boxes are in stored pixels
        if not (1 <= x1 < x2 <= w and 1 <= y1 < y2 <= h):
            findings.append(Finding(split, name, WARNING, "box outside image",
                                    f"box {sample.bbox} vs a {w}x{h} image (clamped when cropping)"))
    return Inspection(tuple(findings), hashlib.sha1(data).hexdigest())


def _map(fn: Callable, items: Sequence, workers: int, description: str) -> list:
    """``fn`` over ``items`` in threads (decoding and header parsing release the GIL), with a rich
    progress bar when stderr is a terminal."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(fn, items)
        if sys.stderr.isatty():
            try:
                from rich.console import Console
                from rich.progress import track
            except ImportError:
                pass
            else:
                results = track(results, description, total=len(items), transient=True, console=Console(stderr=True))
        return list(results)


def check(root: str | Path, format: str = "auto", splits: Sequence[str] = ("train", "test"),
          workers: int = 8) -> dict:
    """Scan the copy at ``root``: ``{"root", "format", "splits": {split: counts}, "findings": [Finding, ...]}``."""
    data = load_dataset(root, format)
    report: dict = {"root": str(data.root), "format": data.format, "splits": {}, "findings": []}
    digests: dict[str, dict[str, str]] = {}
    for split in splits:
        samples = data.train if split == "train" else data.test
        results = _map(lambda s, sp=split: inspect(s, sp), samples, workers, f"checking {split}")
        findings = [f for r in results for f in r.findings]
        kinds = Counter(f.problem for f in findings)
        report["splits"][split] = {
            "images": len(samples),
            "errors": sum(f.severity == ERROR for f in findings),
            "warnings": sum(f.severity == WARNING for f in findings),
            "grayscale": kinds.get("grayscale", 0),
            "cmyk": kinds.get("CMYK", 0),
        }
        report["findings"] += findings
        digests[split] = {r.digest: sample_label(s) for s, r in zip(samples, results, strict=True) if r.digest}
    if "train" in digests and "test" in digests:
        for digest, test_name in digests["test"].items():
            if digest in digests["train"]:
                report["findings"].append(Finding("test", test_name, WARNING, "also in train",
                                                  f"same content as {digests['train'][digest]}"))
                report["splits"]["test"]["warnings"] += 1
    return report


def find_unreadable(samples: Sequence[Sample], workers: int = 8) -> list[tuple[Sample, ImageReadError]]:
    """The quick pass before training: samples whose file is missing, empty, not an image or too large
    (header only, nothing decoded), with the error naming each."""
    def header(sample: Sample):
        try:
            sample_header(sample)
        except ImageReadError as e:
            return sample, e
        return None

    return [r for r in _map(header, samples, workers, "checking image headers") if r is not None]


def write_report(report: dict, path: Path) -> None:
    """One CSV row per finding (``split,path,severity,problem,detail``), or the whole report as ``.json``;
    written atomically."""
    if path.suffix.lower() == ".json":
        write_json(path, {**report, "findings": [asdict(f) for f in report["findings"]]})
        return
    fields = ["split", "path", "severity", "problem", "detail"]
    write_csv(path, ({k: getattr(x, k) for k in fields} for x in report["findings"]), fields)


def format_table(report: dict) -> str:
    """The findings (errors first) and per-split counts as a plain-text table."""
    order = {ERROR: 0, WARNING: 1, INFO: 2}
    findings = sorted(report["findings"], key=lambda f: order[f.severity])
    rows = [(f.severity, f.split, f.problem, f.path) for f in findings]
    lines = []
    if rows:
        widths = [max(len(r[i]) for r in rows + [("severity", "split", "problem", "")]) for i in range(3)]
        header = ("severity", "split", "problem", "path")
        lines += ["  ".join(c.ljust(w) for c, w in zip(header, widths + [0], strict=True)).rstrip()]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths + [0], strict=True)).rstrip() for r in rows]
    for split, s in report["splits"].items():
        lines.append(f"{split}: {s['images']} images, {s['errors']} errors, {s['warnings']} warnings, "
                     f"{s['grayscale']} grayscale, {s['cmyk']} CMYK (converted to RGB when loaded)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit("python -m twincar.data.check is now python -m twincar.check")
