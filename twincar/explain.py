"""Explain predictions: ``python -m twincar.explain --images DIR_OR_FILES... --model PATH [--classes PATH]
[--method M] [--target pred|true|CLASS_NAME] [--out DIR]``.

Writes one overlay PNG per image, ``<method>_grid.png`` and ``explain.csv`` (prediction and faithfulness per
image). The Grad-CAM work is :class:`twincar.gradcam.explainer.Explainer`'s; ``explain_files`` is the pure function.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from twincar.data.classes import name_key
from twincar.errors import TwinCarError
from twincar.evaluation.figures import cam_figure, cam_grid
from twincar.files import check_writable_dir, write_csv
from twincar.gradcam.explainer import METHODS, Explainer, ExplainError, Explanation

log = logging.getLogger(__name__)


# -- the command line ---------------------------------------------------------------------------------
def label_from_folder(path: Path, class_names: Sequence[str]) -> str:
    """The true class of an image in a class-named folder (``.../BMW M3 Coupe 2012/001.jpg``), for --target true."""
    keys = [name_key(n) for n in class_names]
    folder = name_key(path.parent.name.replace("_", " "))
    if folder not in keys:
        raise ExplainError(
            f"--target true: the folder of {path} ({path.parent.name!r}) is not a class name: put each image in a "
            "folder named after its class, or use --target pred"
        )
    return class_names[keys.index(folder)]


def explain_files(
    explainer: Explainer, images: Sequence[Path], out_dir: Path, *, target: str = "pred", batch_size: int = 8
) -> list[Explanation]:
    """Explain ``images`` and write per image an overlay PNG, ``<method>_grid.png`` and ``explain.csv``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = explainer.predictor.class_names
    labels = [label_from_folder(p, names) for p in images] if target == "true" else None
    results = explainer.explain(list(images), target=target, labels=labels, batch_size=batch_size)
    slug = explainer.method.replace("+", "p")
    rows = []
    for i, (path, e) in enumerate(zip(images, results, strict=True)):
        png = ""
        if e.ok:
            png = cam_figure(e, out_dir / f"{slug}_{i:03d}_{path.stem}.png").name
        else:
            log.warning("skipping unreadable image: %s", e.prediction.error)
        p = e.prediction
        rows.append({
            "path": str(path), "pred_name": p.name, "make": p.make, "model": p.model, "year": p.year or "",
            "confidence": round(p.confidence, 6) if e.ok else "", "target_name": e.target_name,
            "method": e.method, "faithfulness": "" if e.faithfulness is None else round(e.faithfulness, 6),
            "overlay": png, "error": p.error or "",
        })
    if any(e.ok for e in results):
        cam_grid(results, out_dir / f"{slug}_grid.png")
    write_csv(out_dir / "explain.csv", rows, list(rows[0]))
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m twincar.explain",
        description="Grad-CAM overlays of a trained model's predictions, with a faithfulness score per image.",
    )
    parser.add_argument("--images", nargs="+", required=True, help="image files, folders (recursive) or globs")
    parser.add_argument("--model", required=True, help="a TwinCar .ckpt, an exported model.pth, or the original "
                        "TwinCars resnet50 .pth (then --classes)")
    parser.add_argument("--classes", help="classes.txt (one name per line, label order) for a bare .pth")
    parser.add_argument("--method", default="gradcam", choices=METHODS, help="CAM method (default gradcam; "
                        "finercam contrasts the prediction with its nearest twin classes)")
    parser.add_argument("--target", default="pred", help="pred (default), true (class = the image's folder "
                        "name) or a class name: the class whose evidence is shown")
    parser.add_argument("--target-layer", help="module to explain (default layer4 for ResNets)")
    parser.add_argument("--out", default="outputs/explain", help="output folder (default outputs/explain)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward/backward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--no-faithfulness", action="store_true", help="skip the faithfulness score (faster)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; a user error is printed as one sentence and exits with 1."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = parse_args(argv)
    try:
        from twincar.data.images import find_images
        from twincar.inference.predictor import Predictor

        check_writable_dir(args.out, "--out")  # before any work
        images = find_images(args.images)  # the predict CLI's rules: files, folders, globs
        predictor = Predictor.load(args.model, args.classes, device=args.device)
        explainer = Explainer(predictor, args.method, args.target_layer, faithfulness=not args.no_faithfulness)
        explainer.resolve_target(args.target if args.target != "true" else None, 0, None)  # check a name early
        results = explain_files(explainer, images, Path(args.out), target=args.target, batch_size=args.batch_size)
    except TwinCarError as e:
        log.error("%s", e)
        return 1
    done = [e for e in results if e.ok]
    faith = [e.faithfulness for e in done if e.faithfulness is not None]
    log.info("explained %d of %d images with %s on %s%s; wrote %s", len(done), len(results), args.method,
             explainer.target_layer, f", mean faithfulness {np.mean(faith):.3f}" if faith else "",
             Path(args.out) / "explain.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
