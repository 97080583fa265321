"""pytorch-grad-cam's hook object (``activations_and_grads``): detached between explanations, re-attached for
one, so the model runs without hooks the rest of the time."""

from __future__ import annotations

from torch import nn

from twincar.compat import require

SUPPORTED = ">=1.5.7,<1.6"
require("grad-cam", SUPPORTED, "Grad-CAM hook handling")


def cam_hooks(cam) -> object:
    """The activation/gradient hook holder of a pytorch-grad-cam CAM object (FinerCAM wraps a base CAM)."""
    return getattr(cam, "base_cam", cam).activations_and_grads


def attach_hooks(hooks, layer: nn.Module) -> None:
    """Register ``hooks``' forward hooks on ``layer`` (they were released after the last explanation)."""
    hooks.handles = [layer.register_forward_hook(hooks.save_activation),
                     layer.register_forward_hook(hooks.save_gradient)]
