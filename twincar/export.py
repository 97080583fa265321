"""Export a trained model: ``python -m twincar.export ckpt=PATH format=pth|safetensors|onnx|hf [out=DIR]``.

Writes the weights (``model.pth``, ``model.safetensors`` or a single-file ``model.onnx`` with a dynamic batch
dimension) plus ``model_card.json``: class names, preprocessing (input size, resize mode, mean/std),
architecture, the run's metrics and config choices. ``Predictor.load``, ``twincar.predict --model`` and the
demo read the card back. ``export_model`` is the pure function; ``main`` the thin Hydra entry point.

``format=onnx quantize=int8 int8_images=IMAGES`` writes ``model.int8.onnx`` instead: onnxruntime's static
int8 quantisation (weights per channel, activation ranges measured on ``int8_count`` of the given images,
prepared exactly as predict prepares them), about 3x faster than fp32 on a CPU with VNNI; its top-1
agreement with the fp32 model on other images of the set is logged and kept in the model card. (The options were
``calibration=`` and ``calibration_images=``; "calibration" now names only a model's temperature and unknown
threshold, :mod:`twincar.evaluation.calibration`.)
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from twincar.data.images import NoImagesError, find_images
from twincar.errors import TwinCarError, exit_on_user_error, run_hydra_tool
from twincar.files import atomic_path, check_writable_dir, write_json, write_text
from twincar.inference.engines import FEATURES_OUTPUT
from twincar.models.card import (
    CALIBRATION,
    FINGERPRINT,
    MODEL_CARD,
    build_model_card,
    read_unknown_stats,
    write_model_card,
    write_unknown_stats,
)
from twincar.models.checkpoint import export_safetensors, export_state_dict
from twincar.models.hub import HUB_CONFIG, HUB_README, hub_config, hub_readme
from twincar.models.loading import load_model
from twincar.runs import resolve_launch_paths, run_record

log = logging.getLogger(__name__)

FORMATS = ("pth", "safetensors", "onnx", "hf")  # hf: the timm / Hugging Face hub folder
QUANTIZATIONS = ("int8",)
ONNX_OPSET = 18  # >= 17: LayerNormalization and friends as single ops; onnxruntime >= 1.14 runs it
AGREEMENT_IMAGES = 128  # at most this many other int8 images for the int8 vs fp32 agreement check
RENAMED = {"calibration": "int8_images", "calibration_images": "int8_count"}  # export option -> its new name


class ExportError(TwinCarError, ValueError):
    """An export option is wrong or the model cannot be exported; the message says which."""


class LogitsAndFeatures(nn.Module):
    """A timm model's logits and its pre-logit features (``forward_head(forward_features(x), pre_logits=True)``) of
    one pass: the two outputs of an ONNX export, so the ONNX runtime has the feature unknown scores too."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(x)
        return self.model.forward_head(features), self.model.forward_head(features, pre_logits=True).flatten(1)


def export_onnx(model: nn.Module, path: Path, image_size: int) -> tuple[float, list[str]]:
    """A single-file ONNX model (opset ``ONNX_OPSET``, dynamic batch), its outputs ``logits`` and, for a timm model,
    ``features`` (:class:`LogitsAndFeatures`); returns the largest absolute difference of its outputs from the eager
    model's on a random batch, measured with onnxruntime, and the output names."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError("format=onnx needs the onnx extra: pip install 'twincar[onnx]'") from e
    model = model.eval().float()
    names = ["logits"]
    if hasattr(model, "forward_head"):
        model, names = LogitsAndFeatures(model).eval(), ["logits", FEATURES_OUTPUT]
    example = torch.randn(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    check = torch.randn(3, 3, image_size, image_size)
    with torch.inference_mode():
        expected = model(check)
    expected = expected if isinstance(expected, tuple) else (expected,)
    with atomic_path(path) as tmp:
        torch.onnx.export(
            model, (example,), str(tmp), input_names=["images"], output_names=names, opset_version=ONNX_OPSET,
            dynamo=True, external_data=False, dynamic_shapes=({0: batch},),
        )
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run(names, {"images": check.numpy()})
    return max(float((torch.from_numpy(g) - e).abs().max()) for g, e in zip(got, expected, strict=True)), names


def _int8_image_files(int8_images: Sequence[str | Path] | str | Path) -> list[Path]:
    """The image files named by ``int8_images`` (files, folders, glob patterns, as ``--images`` takes them)."""
    try:
        return find_images([int8_images] if isinstance(int8_images, (str, Path)) else list(int8_images))
    except NoImagesError as e:
        raise ExportError(f"int8_images={int8_images}: {str(e).split(': ', 1)[-1]}") from e


def _int8_split(images: Sequence[Path], count: int) -> tuple[list[Path], list[Path]]:
    """``count`` images evenly spread over ``images`` to measure the activation ranges on, and up to
    ``AGREEMENT_IMAGES`` of the others (evenly spread too) to check the quantised model against."""
    if count < 1:
        raise ExportError(f"int8_count={count} must be at least 1")
    step = max(1.0, len(images) / count)
    chosen = sorted({int(i * step) for i in range(min(count, len(images)))})
    taken = set(chosen)
    rest = [p for i, p in enumerate(images) if i not in taken]
    held_out = rest[:: max(1, len(rest) // AGREEMENT_IMAGES)][:AGREEMENT_IMAGES]
    return [images[i] for i in chosen], held_out


def quantize_onnx(fp32: Path, out: Path, predictor, images: Sequence[Path], held_out: Sequence[Path]) -> dict:
    """Static int8 quantisation of the ONNX model ``fp32`` (run by ``predictor``) into ``out``, its activation ranges
    measured on ``images`` (prepared and normalised by ``predictor``, exactly as for prediction).

    Weights are int8 per output channel, activations uint8 per tensor (min/max ranges), in the QDQ
    format that onnxruntime fuses into integer kernels. The classifier head (Gemm/MatMul) stays fp32: a
    negligible share of the work, and its rounding would move the logits directly (measured: 0.969 -> 0.979
    top-1 agreement on the benchmark's 512 images). Returns the quantisation record for the model card, with
    the top-1 agreement between the int8 and fp32 models on ``held_out``.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from twincar.inference.predictor import Predictor

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = _prepared_batches(predictor, images)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {predictor.engine.input_name: batch}

    prepared = out.with_name(out.stem + ".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(prepared))  # shape inference + graph clean-up before quantising
        head = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type in ("Gemm", "MatMul")]
        with atomic_path(out) as tmp:
            quantize_static(str(prepared), str(tmp), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=head)
    finally:
        prepared.unlink(missing_ok=True)
    agreement = None
    if held_out:
        int8 = Predictor.load(out, predictor.class_names, preprocess=predictor.preprocess, device="cpu",
                              precision="fp32")
        same = total = 0
        for batch in _prepared_batches(predictor, held_out, normalise=False):
            same += int((predictor.logits(batch).argmax(1) == int8.logits(batch).argmax(1)).sum())
            total += len(batch)
        agreement = round(same / total, 4) if total else None
        log.info("int8 model: top-1 agreement with fp32 on %d other images of int8_images: %s", total, agreement)
    return {"type": "int8", "method": "onnxruntime static QDQ, per-channel weights, min/max activations, fp32 head",
            "images": len(images), "top1_agreement_with_fp32": agreement,
            "agreement_images": len(held_out)}


def _prepared_batches(predictor, images: Sequence[Path], batch_size: int = 16, normalise: bool = True):
    """Batches of ``images`` as ``predictor`` feeds its network (normalised floats; ``normalise=False``: the
    ``uint8`` prepared images); unreadable images are named in the log and left out."""
    import numpy as np

    from twincar.inference.preprocess import normalise as normalise_batch

    for _, batch, errors in predictor.prepared_batches(images, batch_size=batch_size):
        for message in errors.values():
            log.warning("int8 images: skipping %s", message)
        if batch is not None:
            yield normalise_batch(np.asarray(batch), predictor.preprocess) if normalise else batch


def export_model(
    ckpt: str | Path,
    fmt: str = "pth",
    out: str | Path = ".",
    *,
    quantize: str | None = None,
    int8_images: Sequence[str | Path] | str | Path | None = None,
    int8_count: int = 256,
    classes: str | Path | None = None,
    license: str = "other",
    push_to_hub: str | None = None,
) -> Path:
    """Export the model of a TwinCar checkpoint to ``out/model.<fmt>`` with ``out/model_card.json``; returns
    the weights' path. ``ckpt`` may also be exported weights with their card (to convert between formats).

    ``quantize="int8"`` (``fmt="onnx"`` only) writes ``out/model.int8.onnx``, its activation ranges measured on
    ``int8_count`` of ``int8_images`` (image files, folders or glob patterns; images like those the model will see,
    e.g. its training folder).

    ``fmt="hf"`` writes timm's hub layout: ``config.json`` (architecture, ``label_names``, a ``pretrained_cfg``
    whose timm eval transform is the model's own), ``model.safetensors`` (with metadata), a Hugging Face
    ``README.md`` model card (``license`` in its front matter) and ``model_card.json``; ``push_to_hub="USER/REPO"``
    then uploads the folder. ``classes``: the class list of weights that carry none (the original TwinCars
    ``.pth``)."""
    if fmt not in FORMATS:
        raise ExportError(f"format={fmt} is not one of {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ExportError(f"quantize={quantize} is not one of {', '.join(QUANTIZATIONS)} (or null)")
    if quantize and fmt != "onnx":
        raise ExportError(f"quantize={quantize} needs format=onnx (onnxruntime runs the quantised model)")
    if push_to_hub and fmt != "hf":
        raise ExportError(f"push_to_hub={push_to_hub} needs format=hf (the hub layout timm loads)")
    if quantize and not int8_images:
        raise ExportError(f"quantize={quantize} needs int8_images=PATH: images like those the model will see "
                          "(files, folders or glob patterns, e.g. the training folder)")
    image_files = _int8_image_files(int8_images) if quantize else []  # before any work: a wrong path fails fast
    check_writable_dir(out, "out")
    ckpt = Path(ckpt).expanduser()
    loaded = load_model(ckpt, classes)
    if not isinstance(loaded.model, nn.Module) or not list(loaded.model.parameters()):
        raise ExportError(f"ckpt={ckpt} is not a PyTorch model: export from the .ckpt, .pth or .safetensors")
    out = Path(out)
    calibration = _calibration_kept(out, loaded, ckpt)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / ("model.safetensors" if fmt == "hf" else f"model.{fmt}")
    if fmt == "hf":
        export_safetensors(loaded.model, weights, metadata={"format": "pt", "architecture": loaded.architecture,
                                                            "num_classes": str(len(loaded.class_names)),
                                                            "exported_by": "twincar"})
        write_json(out / HUB_CONFIG, hub_config(loaded.model, loaded.class_names, loaded.preprocess,
                                                loaded.architecture))
    elif fmt == "pth":
        export_state_dict(loaded.model, weights)
    elif fmt == "safetensors":
        export_safetensors(loaded.model, weights)
    else:
        diff, outputs = export_onnx(loaded.model, weights, loaded.preprocess.image_size)
        log.info("ONNX model checked with onnxruntime: max |difference| from PyTorch %.2e", diff)
        if diff > 1e-3:
            raise ExportError(f"{weights} differs from the PyTorch model by up to {diff:.2e}: the export is wrong")
    quantization = None
    if quantize:
        from twincar.inference.predictor import Predictor
        chosen, held_out = _int8_split(image_files, int8_count)
        fp32 = Predictor.load(weights, loaded.class_names, preprocess=loaded.preprocess, device="cpu",
                              precision="fp32")
        quantized = out / f"model.{quantize}.onnx"
        quantization = quantize_onnx(weights, quantized, fp32, chosen, held_out)
        weights.unlink()
        weights = quantized
    if ckpt.suffix == ".ckpt":
        metrics, config = run_record(ckpt)
    else:  # converting exported weights: keep what their card says
        metrics, config = loaded.card.get("metrics"), loaded.card.get("config")
    # the statistics file a calibration names is beside the model it came with: ckpt's, or out's own card's
    stats_beside = loaded.source if calibration is loaded.calibration else out / MODEL_CARD
    stats = read_unknown_stats(stats_beside, calibration, len(loaded.class_names))
    if stats is not None:  # the unknown-score statistics travel beside the weights, fingerprinted anew
        calibration = {**calibration, "features": write_unknown_stats(weights, stats)}
    card = build_model_card(loaded.class_names, loaded.preprocess, loaded.architecture, metrics=metrics,
                            config=config, source=ckpt.name, calibration=calibration, fingerprint=loaded.fingerprint)
    if fmt == "onnx" and FEATURES_OUTPUT in outputs:  # int8 quantisation keeps the output names
        card["output"]["features"] = {"name": FEATURES_OUTPUT, "shape": ["N", "D"], "dtype": "float32",
                                      "meaning": "pre-logit features of the same pass; L2-normalised they are the "
                                                 "embeddings of the feature unknown scores"}
    if quantization:
        card["quantization"] = quantization
    write_model_card(out, card)
    if fmt == "hf":
        write_text(out / HUB_README, hub_readme(card, repo=push_to_hub, license=license))
    log.info("wrote %s and %s", weights, out / MODEL_CARD)
    if push_to_hub:
        upload_to_hub(out, push_to_hub)
    return weights


def _calibration_kept(out: Path, loaded, ckpt: Path) -> dict | None:
    """The calibration the export's card carries: the model's own; else, when ``out`` already holds this model's
    card (the same fingerprint), that card's. A card of another model in ``out`` (a run folder's, say: the only
    place its ``model.pth`` keeps its calibration) is never replaced: one sentence. An uncalibrated export is one
    line of warning saying how to calibrate it."""
    import json

    calibration = loaded.calibration
    existing = out / MODEL_CARD
    if existing.is_file():
        try:
            card = json.loads(existing.read_text("utf-8"))
        except (OSError, ValueError):
            card = None
        recorded = card.get(FINGERPRINT) if isinstance(card, dict) else None
        own_card = recorded is None and ckpt.suffix != ".ckpt" and out.resolve() == ckpt.parent.resolve()
        if recorded != loaded.fingerprint and not own_card:  # own_card: the weights' own card, before fingerprints
            raise ExportError(f"out={out} already holds the {MODEL_CARD} of another model (fingerprint "
                              f"{recorded or 'not recorded'}; ckpt={ckpt} is {loaded.fingerprint}): exporting there "
                              "would replace it, and with it that model's calibration; pass another folder as out=")
        if calibration is None and isinstance(card, dict) and isinstance(card.get(CALIBRATION), dict):
            calibration = card[CALIBRATION]  # this model's, fitted on its export: kept
    if calibration is None:
        log.warning("ckpt=%s carries no calibration: the export names every car, never 'unknown' (export the run's "
                    "model.pth or its best checkpoint, which training calibrates, or run python -m twincar.calibrate "
                    "ckpt=%s first)", ckpt, ckpt)
    return calibration


def upload_to_hub(folder: Path, repo: str) -> str:
    """Upload a ``format=hf`` export folder to the Hugging Face Hub repository ``repo`` (created when missing,
    with the token of ``huggingface-cli login`` or ``HF_TOKEN``); returns the repository's URL. No network,
    ``HF_HUB_OFFLINE=1`` or a refused token is one sentence."""
    try:
        from huggingface_hub import create_repo, upload_folder
    except ImportError as e:
        raise ExportError("push_to_hub needs huggingface_hub: pip install huggingface_hub") from e
    try:
        url = create_repo(repo, repo_type="model", exist_ok=True)
        upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                      commit_message="Upload TwinCar export (timm format)")
    except Exception as e:  # offline mode, network, auth and hub errors come in many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"push_to_hub={repo}: could not upload {folder} to the Hugging Face Hub ({first}); the "
                          "export itself is complete there: upload it later with hf upload") from e
    log.info("uploaded %s to %s", folder, url)
    return str(url)


def refuse_renamed_overrides(overrides: Sequence[str]) -> None:
    """An :class:`ExportError` naming the new option when a command-line override uses a renamed one
    (:data:`RENAMED`): checked before Hydra composes the config, where it would only be "not in struct"."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in RENAMED:
            raise ExportError(f"{key}= was renamed to {RENAMED[key]}=: use {RENAMED[key]}={value or '...'} "
                              "(calibration now names only a model's temperature and unknown threshold)")


def main() -> None:
    """Command-line entry point: a renamed option (``calibration=``) is one sentence naming the new one, before
    Hydra composes the config; then :func:`hydra_main`."""
    run_hydra_tool(hydra_main, log, refuse_renamed_overrides)


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra entry point: a user error prints one sentence and exits 1."""
    if not cfg.get("ckpt"):
        log.error("pass ckpt=PATH to a TwinCar .ckpt (e.g. outputs/runs/RUN/checkpoints/last.ckpt)")
        sys.exit(1)
    resolve_launch_paths(cfg)
    with exit_on_user_error(log):
        images = OmegaConf.to_container(cfg.int8_images) if OmegaConf.is_list(cfg.int8_images) else cfg.int8_images
        export_model(cfg.ckpt, cfg.format, cfg.out, quantize=cfg.quantize, int8_images=images,
                     int8_count=cfg.int8_count, classes=cfg.get("classes"),
                     license=cfg.get("license") or "other", push_to_hub=cfg.get("push_to_hub"))


if __name__ == "__main__":
    main()
