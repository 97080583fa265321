"""CarClassifier: a timm backbone with a K-way head, its loss, metrics, optimizer and schedule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch import nn
from torchmetrics import MaxMetric

from twincar.models.factory import create_model
from twincar.models.finetune import EMA, CompiledForward, FreezeBackbone, layer_decay_groups
from twincar.models.metrics import classification_metrics


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, head_lr_mult: float) -> list[dict]:
    """Four optimizer groups: backbone/head x decayed/not decayed.

    The head (timm's ``get_classifier()``) learns at ``lr * head_lr_mult``. Weight decay applies to
    weight matrices and kernels only, never to biases or normalisation parameters (1-d tensors).
    """
    head = {id(p) for p in model.get_classifier().parameters()}
    groups: dict[tuple[bool, bool], dict] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        is_head, no_decay = id(p) in head, p.ndim <= 1
        group = groups.setdefault((is_head, no_decay), {
            "name": f"{'head' if is_head else 'backbone'}{'_no_decay' if no_decay else ''}",
            "params": [],
            "lr": lr * (head_lr_mult if is_head else 1.0),
            "weight_decay": 0.0 if no_decay else weight_decay,
        })
        group["params"].append(p)
    return list(groups.values())


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR factor: linear warmup from 0 to 1 over ``warmup_steps``, then cosine to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class CarClassifier(L.LightningModule):
    """Fine-grained car classifier; class names and preprocessing travel in its checkpoints.

    Args:
        class_names: one name per output, in label order.
        name: timm architecture (``resnet50``).
        pretrained: False, True (timm's default tag) or a hub tag such as ``resnet50.a1_in1k``.
        weights: local weights file (.pth/.safetensors/.ckpt) used instead of ``pretrained``.
        drop_rate: dropout before the classifier head.
        drop_path_rate: stochastic depth (timm's ``drop_path_rate``), 0 = off.
        label_smoothing: label smoothing of the training loss (applies to Mixup targets too).
        channels_last: run convolutions in channels-last memory format (faster with AMP on GPUs).
        ema: weight EMA options, ``{"decay": 0.999, "warmup": True}``; ``decay`` None (or no mapping) = off.
        freeze_backbone_epochs: train only the head (backbone and its BatchNorm statistics frozen) for
            this many epochs, then everything.
        compile: ``torch.compile`` the network (not the LightningModule); falls back to eager if unavailable.
        optimizer: ``opt`` (timm optimizer name), ``lr``, ``weight_decay``, ``head_lr_mult``, ``layer_decay``
            (timm's layer-wise lr decay, None = off) and extra optimizer kwargs (e.g. ``momentum``).
        scheduler: ``name`` (``cosine``, ``step`` or ``none``) and its options.
        preprocess: the input the model expects (:class:`twincar.data.preprocess.Preprocess` as a dict).
        calibration: the temperature and unknown threshold fitted after training
        (:mod:`twincar.evaluation.calibration`, as a
            dict); carried in checkpoints for inference, unused by training.
    """

    def __init__(
        self,
        class_names: list[str],
        *,
        name: str = "resnet50",
        pretrained: bool | str = False,
        weights: str | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        ema: Mapping | None = None,
        freeze_backbone_epochs: int = 0,
        compile: bool = False,
        optimizer: Mapping | None = None,
        scheduler: Mapping | None = None,
        preprocess: Mapping | None = None,
        calibration: Mapping | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.class_names = list(class_names)
        self.model = create_model(
            name, len(self.class_names), pretrained=pretrained, weights=weights, drop_rate=drop_rate,
            **({"drop_path_rate": drop_path_rate} if drop_path_rate else {}),  # not every timm model takes it
        )
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._compiled = CompiledForward(self.model) if compile else None  # not a module: no new state keys
        self.tuning = False  # set by the LR finder: no fine-tuning callbacks while it runs
        metrics = classification_metrics(len(self.class_names), class_names=self.class_names)  # + make/year, ECE
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # best-so-far is saved in checkpoints and restored on resume

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._compiled(x) if self._compiled is not None else self.model(x)

    # -- steps ----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, labels, targets = batch  # targets: labels, or soft targets when the batch was mixed
        logits = self(x)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        self.train_metrics.update(logits.detach(), labels)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(x))
        return loss

    def _eval_step(self, batch, stage: str) -> None:
        x, labels = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, labels), on_epoch=True, sync_dist=True,
                 prog_bar=stage == "val", batch_size=len(x))
        getattr(self, f"{stage}_metrics").update(logits, labels)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_epoch(self, stage: str) -> dict[str, torch.Tensor]:
        metrics = getattr(self, f"{stage}_metrics")
        values = metrics.compute()  # synchronised across processes by torchmetrics: equal on every rank
        metrics.reset()
        self.log_dict(values, sync_dist=True)
        return values

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        values = self._log_epoch("val")
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(values["val/acc"])
            self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True, prog_bar=True)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Checkpoints written before val_acc_best was saved: start its maximum afresh.
        for name, value in self.val_acc_best.state_dict(prefix="val_acc_best.").items():
            checkpoint["state_dict"].setdefault(name, value)

    # -- fine-tuning callbacks (twincar.models.finetune) -----------------------------------------
    def configure_callbacks(self) -> list[L.Callback]:
        """Weight EMA and freeze-then-unfreeze, from ``model.ema`` and ``model.freeze_backbone_epochs``."""
        if self.tuning:
            return []
        callbacks: list[L.Callback] = []
        ema = self.hparams.ema or {}
        if ema.get("decay") is not None:
            callbacks.append(EMA(decay=ema["decay"], warmup=ema.get("warmup", True)))
        if self.hparams.freeze_backbone_epochs:
            callbacks.append(FreezeBackbone(self.hparams.freeze_backbone_epochs))
        return callbacks

    # -- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = dict(self.hparams.optimizer or {"opt": "adam", "lr": 1e-3})
        opt_name, lr = cfg.pop("opt"), cfg.pop("lr")
        weight_decay, head_lr_mult = cfg.pop("weight_decay", 0.0), cfg.pop("head_lr_mult", 1.0)
        layer_decay = cfg.pop("layer_decay", None)
        if layer_decay is not None:
            groups = layer_decay_groups(self.model, lr=lr, weight_decay=weight_decay, head_lr_mult=head_lr_mult,
                                        layer_decay=layer_decay)
        else:
            groups = param_groups(self.model, lr=lr, weight_decay=weight_decay, head_lr_mult=head_lr_mult)
        optimizer = create_optimizer_v2(groups, opt=opt_name, lr=lr, weight_decay=weight_decay, **cfg)

        sched = dict(self.hparams.scheduler or {"name": "none"})
        name = sched.pop("name")
        if name == "none":
            return optimizer
        if name == "cosine":
            total = int(self.trainer.estimated_stepping_batches)
            per_epoch = max(1, total // max(1, self.trainer.max_epochs))
            warmup = int(sched.get("warmup_epochs", 0) * per_epoch)
            factor = partial(warmup_cosine, warmup_steps=warmup, total_steps=total,
                             min_lr_ratio=sched.get("min_lr_ratio", 0.0))
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        if name == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=sched["step_epochs"], gamma=sched["gamma"])
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        raise ValueError(f"unknown scheduler.name={name!r}: use cosine, step or none")
