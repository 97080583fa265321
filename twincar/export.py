"""Export a trained model: ``python -m twincar.export ckpt=PATH format=pth|safetensors|onnx [out=DIR]``.

Writes the weights (``model.pth``, ``model.safetensors`` or a single-file ``model.onnx`` with a dynamic batch
dimension) plus ``model_card.json``: class names, preprocessing (input size, resize mode, mean/std),
architecture, the run's metrics and config choices. ``Predictor.load``, ``twincar.predict --model`` and the
demo read the card back. ``export_model`` is the pure function; ``main`` the thin Hydra entry point.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch import nn

from twincar import __version__
from twincar.data.transforms import Preprocess
from twincar.errors import TwinCarError
from twincar.models.io import MODEL_CARD, export_state_dict, load_model

log = logging.getLogger(__name__)

FORMATS = ("pth", "safetensors", "onnx")
ONNX_OPSET = 18  # >= 17: LayerNormalization and friends as single ops; onnxruntime >= 1.14 runs it


class ExportError(TwinCarError, ValueError):
    """An export option is wrong or the model cannot be exported; the message says which."""


def build_model_card(
    class_names: Sequence[str],
    preprocess: Preprocess,
    architecture: str,
    *,
    metrics: dict | None = None,
    config: dict | None = None,
    source: str | None = None,
) -> dict:
    """What a consumer of exported weights needs (class names, preprocessing, architecture) and what the run was
    (metrics such as ``test/acc``, config group choices and overrides)."""
    return {
        "architecture": architecture,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "preprocess": preprocess.to_dict(),
        "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))},
        "config": config or {},
        "source": source,
        "twincar_version": __version__,
    }


def write_model_card(directory: str | Path, card: dict) -> Path:
    """Write ``model_card.json`` into ``directory`` (beside the weights it describes)."""
    path = Path(directory) / MODEL_CARD
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(card, indent=1) + "\n", "utf-8")
    return path


def hydra_run_config() -> dict:
    """The running Hydra job's group choices and command-line overrides (``{}`` outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra") and v is not None}
    return {"choices": choices, "overrides": list(hc.overrides.task)}


def run_record(ckpt: Path) -> tuple[dict, dict]:
    """Metrics and config choices of the run a checkpoint came from (``RUN/checkpoints/x.ckpt`` -> ``RUN/``)."""
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    metrics: dict = {}
    config: dict = {}
    if (run / "metrics.json").is_file():
        try:
            metrics = json.loads((run / "metrics.json").read_text("utf-8"))
        except ValueError:
            log.warning("%s is not valid JSON: metrics left out of the model card", run / "metrics.json")
    hydra_yaml = run / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        hc = OmegaConf.load(hydra_yaml).hydra
        choices = OmegaConf.to_container(hc.runtime.choices)
        config = {
            "choices": {k: v for k, v in choices.items() if not k.startswith("hydra") and v is not None},
            "overrides": list(hc.overrides.task),
        }
    return metrics, config


def export_onnx(model: nn.Module, path: Path, image_size: int) -> float:
    """A single-file ONNX model (opset ``ONNX_OPSET``, dynamic batch); returns its largest absolute difference
    from the eager model on a random batch, measured with onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError("format=onnx needs the onnx extra: pip install 'twincar[onnx]'") from e
    model = model.eval().float()
    example = torch.randn(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        model, (example,), str(path), input_names=["images"], output_names=["logits"], opset_version=ONNX_OPSET,
        dynamo=True, external_data=False, dynamic_shapes=({0: batch},),
    )
    check = torch.randn(3, 3, image_size, image_size)
    with torch.inference_mode():
        expected = model(check)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": check.numpy()})
    return float((torch.from_numpy(got) - expected).abs().max())


def export_model(ckpt: str | Path, fmt: str = "pth", out: str | Path = ".") -> Path:
    """Export the model of a TwinCar checkpoint to ``out/model.<fmt>`` with ``out/model_card.json``; returns
    the weights' path. ``ckpt`` may also be exported weights with their card (to convert between formats)."""
    if fmt not in FORMATS:
        raise ExportError(f"format={fmt} is not one of {', '.join(FORMATS)}")
    ckpt = Path(ckpt).expanduser()
    loaded = load_model(ckpt)
    if not isinstance(loaded.model, nn.Module) or not list(loaded.model.parameters()):
        raise ExportError(f"ckpt={ckpt} is not a PyTorch model: export from the .ckpt, .pth or .safetensors")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"model.{fmt}"
    if fmt == "pth":
        export_state_dict(loaded.model, weights)
    elif fmt == "safetensors":
        save_file({k: v.detach().cpu().contiguous() for k, v in loaded.model.state_dict().items()}, str(weights))
    else:
        diff = export_onnx(loaded.model, weights, loaded.preprocess.image_size)
        log.info("ONNX model checked with onnxruntime: max |difference| from PyTorch %.2e", diff)
        if diff > 1e-3:
            raise ExportError(f"{weights} differs from the PyTorch model by up to {diff:.2e}: the export is wrong")
    if ckpt.suffix == ".ckpt":
        metrics, config = run_record(ckpt)
    else:  # converting exported weights: keep what their card says
        metrics, config = loaded.card.get("metrics"), loaded.card.get("config")
    card = build_model_card(loaded.class_names, loaded.preprocess, loaded.architecture, metrics=metrics,
                            config=config, source=ckpt.name)
    write_model_card(out, card)
    log.info("wrote %s and %s", weights, out / MODEL_CARD)
    return weights


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: a user error prints one sentence and exits 1."""
    if not cfg.get("ckpt"):
        log.error("pass ckpt=PATH to a TwinCar .ckpt (e.g. outputs/runs/RUN/checkpoints/last.ckpt)")
        sys.exit(1)
    try:
        export_model(cfg.ckpt, cfg.format, cfg.out)
    except TwinCarError as e:
        log.error("%s", e)
        sys.exit(1)


if __name__ == "__main__":
    main()
