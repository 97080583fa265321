"""Fine-tuning tools: weight EMA, freeze-then-unfreeze, layer-wise lr decay, compile, the LR finder.

Each is switched on from the config (``model.ema.decay``, ``model.freeze_backbone_epochs``,
``optimizer.layer_decay``, ``model.compile``, ``tune=lr_find``) and kept out of the training step:
the callbacks come from :meth:`CarClassifier.configure_callbacks`, the optimizer groups from
:func:`layer_decay_groups`, the finder from :func:`run_lr_find`.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging
from torch import nn

from twincar.compat.lightning import averaged_model, drop_averaged_model
from twincar.compat.torch import BatchNormBase, foreach_copy_, foreach_lerp_
from twincar.files import write_bytes, write_json

log = logging.getLogger(__name__)


# -- weight EMA -----------------------------------------------------------------------------------
def ema_decay(step: int, *, decay: float, warmup: bool = True, warmup_power: float = 0.75) -> float:
    """Decay of the ``step``-th EMA update (1-based); timm ``ModelEmaV3.get_decay`` with ``warmup_gamma=1``.

    With warmup the decay grows as ``1 - (1 + step) ** -warmup_power`` up to ``decay``, so the average
    forgets the random init quickly in a short run (0.41 after 1 update, 0.90 after 20, 0.99 after 460).
    """
    if not warmup:
        return decay
    return min(decay, 1.0 - (1.0 + step) ** -warmup_power)


def ema_multi_avg_fn(decay: float, warmup: bool = True) -> Callable[[list, list, torch.Tensor], None]:
    """A ``torch.optim.swa_utils.AveragedModel`` ``multi_avg_fn``: one fused lerp per device and dtype.

    Integer buffers (BatchNorm's ``num_batches_tracked``) are copied, not averaged.
    """

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():
            foreach_copy_(averaged, current)
            return
        d = ema_decay(int(num_averaged), decay=decay, warmup=warmup)
        foreach_lerp_(averaged, current, 1.0 - d)

    return update


class EMA(WeightAveraging):
    """Exponential moving average of the weights (and BatchNorm statistics), updated every optimizer step.

    Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging` does the work: during fit, validation
    runs on the averaged weights (so ``val/acc`` and the checkpoint choice are the EMA's), every checkpoint's
    ``state_dict`` holds the averaged weights (the raw ones go to ``current_model_state``, so resuming
    works), and when training ends the averaged weights are copied into the model. This subclass adds
    timm's decay warmup, keeps the copy on the training device, and lets the ``validate``/``test`` calls
    after ``fit`` evaluate the checkpoint they are given, untouched.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"model.ema.decay={decay} must be between 0 and 1 (e.g. 0.999), or null for no EMA")
        super().__init__(use_buffers=True, multi_avg_fn=ema_multi_avg_fn(decay, warmup))
        self.decay, self.warmup = decay, warmup

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The average is created in ``setup``, before the model reaches its device: move it there."""
        average = averaged_model(self)
        if average is not None:
            average.to(pl_module.device)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """After fit the model holds the averaged weights; later validate/test runs use their checkpoint as is."""
        if stage == "fit":
            drop_averaged_model(self)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if averaged_model(self) is not None:  # resuming fit; outside fit, state_dict already holds the EMA
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


# -- freeze then unfreeze ---------------------------------------------------------------------------
def backbone_modules(model: nn.Module) -> list[nn.Module]:
    """Every module of a timm model except its classifier head (found with ``get_classifier()``)."""
    head = set(map(id, model.get_classifier().modules()))
    return [m for m in model.modules() if id(m) not in head]


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze (or unfreeze) the backbone: its parameters' ``requires_grad`` and its BatchNorm statistics.

    Frozen BatchNorm layers are put in eval mode, so they normalise with (and keep) their running
    statistics; unfrozen ones go back to train mode.
    """
    for module in backbone_modules(model):
        for p in module.parameters(recurse=False):
            p.requires_grad_(trainable)
        if isinstance(module, BatchNormBase):
            module.train(trainable)


class FreezeBackbone(Callback):
    """Train only the classifier head for the first ``epochs`` epochs, then the whole network.

    The idea of Lightning's ``BackboneFinetuning`` (and fastai's ``fine_tune``) for a timm model whose
    optimizer already holds every parameter in backbone/head groups (backbone at ``lr``, head at
    ``lr * head_lr_mult``): frozen parameters get no gradient, so the optimizer leaves them (and their
    weight decay) alone, and frozen BatchNorm layers stay in eval mode. The schedule runs on unchanged.
    """

    def __init__(self, epochs: int):
        if epochs < 0:
            raise ValueError(f"model.freeze_backbone_epochs={epochs} must be >= 0")
        self.epochs = epochs

    def _frozen(self, trainer: L.Trainer) -> bool:
        return trainer.current_epoch < self.epochs

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        frozen = self._frozen(trainer)
        set_backbone_trainable(pl_module.model, not frozen)
        if trainer.current_epoch in (0, self.epochs):
            log.info("epoch %d: backbone %s", trainer.current_epoch, "frozen (head only)" if frozen else "trainable")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        if self._frozen(trainer):  # validation restores module modes; make sure BatchNorm stays frozen
            for module in backbone_modules(pl_module.model):
                if isinstance(module, BatchNormBase) and module.training:
                    module.eval()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        set_backbone_trainable(pl_module.model, True)  # a run shorter than the freeze leaves no frozen model


# -- layer-wise learning-rate decay -----------------------------------------------------------------
def layer_decay_groups(
    model: nn.Module, *, lr: float, weight_decay: float, head_lr_mult: float, layer_decay: float
) -> list[dict]:
    """timm's layer-wise lr decay groups (``param_groups_layer_decay``) with explicit learning rates.

    Layer ``i`` of ``n`` (stem first, head last, from the model's ``group_matcher``) learns at
    ``lr * layer_decay ** (n - 1 - i)``; the head at ``lr * head_lr_mult``. No weight decay on 1-d tensors.
    """
    from timm.optim import param_groups_layer_decay

    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"optimizer.layer_decay={layer_decay} must be in (0, 1] (e.g. 0.75), or null for none")
    head = set(map(id, model.get_classifier().parameters()))
    groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay)
    for i, g in enumerate(groups):
        is_head = all(id(p) in head for p in g["params"])
        g["lr"] = lr * g.pop("lr_scale", 1.0) * (head_lr_mult if is_head else 1.0)
        g["name"] = f"{'head' if is_head else f'backbone_{i:02d}'}{'_no_decay' if g['weight_decay'] == 0 else ''}"
    return groups


# -- compile ----------------------------------------------------------------------------------------
class CompiledForward:
    """``torch.compile(model)`` called in place of ``model``; falls back to eager, saying why, if it fails.

    The network's module (and so the state dict keys, checkpoints and ``model.pth``) is unchanged: only
    the call is compiled. Compilation happens on the first call; a backend that is not available (no C++
    compiler for inductor on CPU, no Triton on GPU, an unsupported platform) logs one warning and the run
    goes on uncompiled.
    """

    def __init__(self, model: nn.Module, **compile_kwargs: Any):
        self.model = model
        self.compiled: Callable | None = None
        self.failed: str | None = None
        try:
            self.compiled = torch.compile(model, **compile_kwargs)
        except Exception as e:  # torch raises RuntimeError on unsupported Python/platforms
            self._fallback(e)

    def _fallback(self, error: Exception) -> None:
        self.compiled, self.failed = None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        log.warning("model.compile=true but torch.compile is unavailable here (%s): training uncompiled", self.failed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except Exception as e:  # a backend failure surfaces at the first compiled call
                self._fallback(e)
        return self.model(x)

    def __deepcopy__(self, memo: dict) -> None:  # weight averaging copies the module; the copy runs eager
        return None


# -- LR finder --------------------------------------------------------------------------------------
def run_lr_find(
    trainer: L.Trainer, model: L.LightningModule, datamodule: L.LightningDataModule, tune: dict, out_dir: Path
) -> dict[str, float]:
    """Lightning's ``Tuner.lr_find`` on the configured model and data: no training, a plot and a suggestion.

    Writes ``lr_find.png`` (loss against learning rate, suggestion marked) and ``lr_find.json`` (the
    curve) in ``out_dir``, logs the override to train with, and returns ``{"lr_find/suggestion": lr}``.
    The finder sweeps every parameter group at the same rate; ``head_lr_mult`` applies on top when training.
    """
    import matplotlib

    matplotlib.use("Agg")
    from lightning.pytorch.tuner import Tuner

    model.tuning = True  # no EMA or backbone freezing while the finder runs
    options = ("min_lr", "max_lr", "num_training", "mode", "early_stop_threshold")
    kwargs = {k: v for k, v in tune.items() if k in options}
    # the finder stops after num_training steps; let it cross epochs when an epoch is shorter (limit_train_batches)
    trainer.fit_loop.max_epochs = max(trainer.max_epochs or 1, kwargs.get("num_training", 100))
    finder = Tuner(trainer).lr_find(model, datamodule=datamodule, update_attr=False, **kwargs)
    model.tuning = False
    if finder is None:  # fast_dev_run and the like skip the finder
        raise RuntimeError("the LR finder did not run (trainer.fast_dev_run set?): run tune=lr_find without debug=")
    out_dir.mkdir(parents=True, exist_ok=True)
    fig = finder.plot(suggest=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    write_bytes(out_dir / "lr_find.png", buf.getvalue())
    suggestion = finder.suggestion()
    write_json(out_dir / "lr_find.json", {"suggestion": suggestion, "lr": finder.results["lr"],
                                          "loss": finder.results["loss"]})
    if suggestion is None:
        log.warning("LR finder: no suggestion (the loss curve has no clear descent); see %s", out_dir / "lr_find.png")
        return {}
    log.info("LR finder suggestion: %.3g; train with:\n  python -m twincar.train optimizer.lr=%.3g  (plot: %s)",
             suggestion, suggestion, out_dir / "lr_find.png")
    print(f"Suggested learning rate: {suggestion:.3g}\nTrain with: optimizer.lr={suggestion:.3g}")
    return {"lr_find/suggestion": float(suggestion)}
