"""Grad-CAM on a :class:`~twincar.inference.predictor.Predictor`: what the model looks at, and whether it matters.

>>> from twincar import Predictor
>>> from twincar.gradcam.explainer import Explainer
>>> explainer = Explainer(Predictor.load("run/checkpoints/last.ckpt"), method="finercam")  # build once
>>> e = explainer.explain("car.jpg")             # target="pred" | "true" (with labels=) | a class name | an index
>>> e.prediction.name, e.cam.shape, e.overlay.shape, e.faithfulness

The CAM methods are pytorch-grad-cam's (``gradcam``, ``gradcam++``, ``eigencam``, ``finercam``); FinerCAM
explains the prediction *against its nearest classes* (the twins of a fine-grained label). Images go through
the predictor's own preprocessing, so the map lies over exactly the pixels the model saw.

The command line is :mod:`twincar.explain`.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from twincar.compat.gradcam import attach_hooks, cam_hooks
from twincar.data.classes import name_key
from twincar.data.images import ImageReadError
from twincar.errors import TwinCarError
from twincar.inference.batches import source_name
from twincar.inference.predictor import Predictor
from twincar.inference.preprocess import ImageInput
from twincar.inference.results import Prediction

log = logging.getLogger(__name__)

METHODS = ("gradcam", "gradcam++", "eigencam", "finercam")
FAITHFULNESS_REMOVED = 0.2  # faithfulness: confidence drop when this top share of the CAM's pixels is removed
FINER_COMPARISONS = 3  # FinerCAM: contrast the target with this many nearest classes (by logit)


class ExplainError(TwinCarError, ValueError):
    """A bad explain option (method, target layer, target class); the message says what to pass."""


@dataclass
class Explanation:
    """One image's explanation. When ``prediction.error`` is set (unreadable image) the arrays are None."""

    prediction: Prediction  # what the model predicts for the image (same as Predictor.predict)
    cam: np.ndarray | None  # (S, S) float32 in 0..1 over the prepared (resized/cropped) input
    image: np.ndarray | None  # (S, S, 3) uint8, the prepared input
    overlay: np.ndarray | None  # (S, S, 3) uint8, CAM heat map over the image
    faithfulness: float | None  # confidence drop (0..1) when the top 20% of the CAM is removed; None if off
    target: int = -1  # index of the class the CAM explains
    target_name: str = ""  # its name
    method: str = ""  # the CAM method

    @property
    def ok(self) -> bool:
        return self.prediction.ok


def default_target_layer(model: nn.Module) -> str:
    """The last convolutional stage: ``layer4`` for ResNets, else timm's last ``feature_info`` module
    (``blocks.N.norm1`` for ViTs)."""
    names = dict(model.named_modules())
    if "layer4" in names:
        return "layer4"
    info = getattr(model, "feature_info", None)
    if info:
        last = info[-1] if isinstance(info, list) else info.get_dicts()[-1]
        name = last.get("module")
        if name in names:
            # a transformer block's output reaches the head only through the class token: explain its
            # input norm instead (the usual ViT Grad-CAM layer), where every patch token has a gradient
            return f"{name}.norm1" if f"{name}.norm1" in names else name
    raise ExplainError(
        f"no default Grad-CAM layer for {type(model).__name__}: pass target_layer= (--target-layer) naming one of "
        f"its modules, e.g. {list(names)[-3]}"
    )


def tokens_to_grid(x: torch.Tensor) -> torch.Tensor:
    """Reshape transform for transformer blocks: (B, N, C) tokens -> (B, C, h, w), prefix tokens dropped.

    4-d activations (CNN stages) pass through unchanged.
    """
    if x.ndim != 3:
        return x
    side = math.isqrt(x.shape[1])
    grid = x[:, x.shape[1] - side * side:, :]
    return grid.reshape(x.shape[0], side, side, x.shape[2]).permute(0, 3, 1, 2)


def _cam_class(method: str):
    from pytorch_grad_cam import EigenCAM, FinerCAM, GradCAM, GradCAMPlusPlus

    return {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM, "finercam": FinerCAM}[method]


def overlay_cam(image: np.ndarray, cam: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """The CAM as a JET heat map blended over an (H, W, 3) uint8 RGB image; uint8 out."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image.astype(np.float32) / 255, cam, use_rgb=True, image_weight=image_weight)


class Explainer:
    """Class activation maps for a :class:`Predictor`'s model. Build once, call :meth:`explain` many times.

    Args:
        predictor: the loaded model, its class names and preprocessing.
        method: ``gradcam``, ``gradcam++``, ``eigencam`` (class-agnostic: ``target`` is ignored) or
            ``finercam`` (the target against its ``FINER_COMPARISONS`` nearest classes).
        target_layer: module name of the layer to explain (``layer4`` for ResNets by default; for other timm
            models the last stage in ``model.feature_info``).
        faithfulness: also score each map by the confidence drop when its top 20% is removed
            (pytorch-grad-cam's confidence-change metric with the most relevant pixels set to the mean colour).

    The CAM object is built once; its hooks are attached only while :meth:`explain` runs, so the predictor
    keeps predicting as before in between. The model's train/eval mode of every module is restored afterwards.
    Gradients are needed: :meth:`explain` turns autograd on even under ``torch.inference_mode``.
    """

    def __init__(
        self,
        predictor: Predictor,
        method: str = "gradcam",
        target_layer: str | None = None,
        *,
        faithfulness: bool = True,
    ):
        if method not in METHODS:
            raise ExplainError(f"unknown CAM method {method!r}: use one of {', '.join(METHODS)}")
        if predictor.is_onnx:
            raise ExplainError("Grad-CAM needs gradients of a PyTorch model: load a .ckpt, .pth or .safetensors "
                               "model, not an ONNX export")
        self.predictor = predictor
        self.method = method
        model = predictor.model
        self.target_layer = target_layer or default_target_layer(model)
        try:
            layer = model.get_submodule(self.target_layer)
        except AttributeError as e:
            raise ExplainError(
                f"the model has no module {self.target_layer!r}: pass a target layer that exists, e.g. "
                f"{default_target_layer(model)!r}"
            ) from e
        self.faithfulness = faithfulness
        self._lock = threading.Lock()  # one explain at a time: hooks and gradients are per model
        with self._modes_restored():
            self.cam = _cam_class(method)(model=model, target_layers=[layer], reshape_transform=tokens_to_grid)
        self._hooks = cam_hooks(self.cam)
        self._hooks.release()  # re-attached around each explain()
        self._layer = layer

    # -- helpers ----------------------------------------------------------------------------------
    def _base_cam(self):
        return getattr(self.cam, "base_cam", self.cam)

    @contextmanager
    def _modes_restored(self) -> Iterator[None]:
        """Eval mode inside; every module's own train/eval flag as it was afterwards."""
        modes = [(m, m.training) for m in self.predictor.model.modules()]
        self.predictor.model.eval()
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training

    def _attach(self) -> None:
        attach_hooks(self._hooks, self._layer)

    def resolve_target(self, target: str | int | None, pred: int, label: str | int | None) -> int:
        """The class index a CAM should explain: ``"pred"``/None, ``"true"`` (needs ``label``), a name, an index."""
        names = self.predictor.class_names
        if target is None or target == "pred":
            return pred
        if target == "true":
            if label is None:
                raise ExplainError("target='true' needs the true label of every image: pass labels=[...]")
            return self.resolve_target(label, pred, None)
        if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
            if not 0 <= int(target) < len(names):
                raise ExplainError(f"target class index {target} is out of range: the model has {len(names)} classes")
            return int(target)
        keys = [name_key(n) for n in names]
        if name_key(str(target)) in keys:
            return keys.index(name_key(str(target)))
        raise ExplainError(
            f"target {target!r} is not one of the model's {len(names)} class names: pass pred, true, an exact "
            "class name (see classes.txt) or an index"
        )

    def _targets(self, logits: torch.Tensor, idx: list[int]) -> list:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget, FinerWeightedTarget

        if self.method != "finercam":
            return [ClassifierOutputTarget(i) for i in idx]
        targets = []
        for row, i in zip(logits, idx, strict=True):
            nearest = [int(j) for j in (row - row[i]).abs().argsort().tolist() if j != i][:FINER_COMPARISONS]
            targets.append(FinerWeightedTarget(i, nearest, 1.0))
        return targets

    def _faithfulness(self, x: torch.Tensor, cams: np.ndarray, idx: list[int], before: torch.Tensor) -> list[float]:
        """Probability of each target class (``before``: from the predictor's logits) minus its probability
        once the top ``FAITHFULNESS_REMOVED`` of the CAM is set to the mean colour (0 after normalisation)."""
        from pytorch_grad_cam.metrics.cam_mult_image import multiply_tensor_with_cam
        from pytorch_grad_cam.metrics.perturbation_confidence import (
            PerturbationConfidenceMetric,
            RemoveMostRelevantFirst,
        )
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

        metric = PerturbationConfidenceMetric(
            RemoveMostRelevantFirst(100 * (1 - FAITHFULNESS_REMOVED), multiply_tensor_with_cam)
        )
        targets = [ClassifierOutputSoftmaxTarget(i) for i in idx]
        after = metric(x.detach(), cams, targets, self.predictor.model, return_diff=False)
        p, after = before.softmax(dim=1), np.asarray(after).reshape(-1)
        return [float(p[j, i]) - float(after[j]) for j, i in enumerate(idx)]

    # -- the one public call ----------------------------------------------------------------------
    def explain(
        self,
        images: ImageInput | Iterable[ImageInput],
        target: str | int | None | Sequence[str | int | None] = "pred",
        *,
        labels: Sequence[str | int] | None = None,
        batch_size: int = 8,
    ) -> Explanation | list[Explanation]:
        """Explain one image (returns an :class:`Explanation`) or many (a list, input order).

        ``target``: ``"pred"`` (default), ``"true"`` (then ``labels`` gives each image's true class name or
        index), a class name, a class index, or a list of these, one per image. An unreadable image gives an
        Explanation whose ``prediction.error`` says why; the others are still explained.
        """
        single = isinstance(images, (str, Path, Image.Image, torch.Tensor))
        items = [images] if single else list(images)
        targets = list(target) if isinstance(target, (list, tuple)) else [target] * len(items)
        if len(targets) != len(items) or (labels is not None and len(labels) != len(items)):
            raise ExplainError(f"{len(items)} images but {len(targets)} targets / labels: pass one per image")
        label_list = list(labels) if labels is not None else [None] * len(items)
        out: list[Explanation] = []
        with self._lock, self._modes_restored(), torch.inference_mode(False), torch.enable_grad():
            self._attach()
            try:
                for start in range(0, len(items), batch_size):
                    stop = start + batch_size
                    out.extend(self._explain_batch(items[start:stop], targets[start:stop], label_list[start:stop]))
            finally:
                self._hooks.release()
                self.predictor.model.zero_grad(set_to_none=True)
        return out[0] if single else out

    def _explain_batch(self, items: list, targets: list, labels: list) -> list[Explanation]:
        p = self.predictor
        prepared, errors = {}, {}
        for i, image in enumerate(items):
            try:
                prepared[i] = p.prepare(image)
            except (ImageReadError, ValueError) as e:
                errors[i] = Explanation(Prediction(source=source_name(image), error=str(e)), None, None, None, None,
                                        method=self.method)
        ok = sorted(prepared)
        if not ok:
            return [errors[i] for i in range(len(items))]
        batch = np.stack([prepared[i] for i in ok])  # uint8 (N, S, S, 3), as Predictor.predict batches them
        # the predictor's own forward (with the embeddings where its unknown score needs them): = Predictor.predict
        raw, logits, *feats = p.outputs_with_embeddings(batch) if p.needs_features else p.outputs(batch)
        scores = p.unknown_scores(raw, *feats) if p.unknown_threshold is not None else None  # "not one of" as predict
        preds = p.results(logits, [source_name(items[i]) for i in ok], scores=scores)
        idx = [self.resolve_target(targets[i], pr.label, labels[i]) for i, pr in zip(ok, preds, strict=True)]
        x = p.engine.input(batch).requires_grad_(True)  # the network's input; input grads work with frozen weights
        logits = torch.from_numpy(logits)
        cams = self.cam(input_tensor=x, targets=self._targets(logits, idx)).astype(np.float32)
        faith = self._faithfulness(x, cams, idx, logits) if self.faithfulness else [None] * len(ok)
        done = {}
        for j, i in enumerate(ok):
            image = batch[j]
            done[i] = Explanation(
                prediction=preds[j], cam=cams[j], image=image, overlay=overlay_cam(image, cams[j]),
                faithfulness=faith[j], target=idx[j], target_name=p.class_names[idx[j]], method=self.method,
            )
        return [done.get(i) or errors[i] for i in range(len(items))]


