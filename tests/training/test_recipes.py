"""The modern-backbone recipes (experiment=recipe_convnext_448 | recipe_eva02_448 | recipe_clip_vit_336)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import SMALL_SPEC

# recipe -> (its architecture, resolution and timm tag; a small sibling of the same timm family and its input size)
RECIPES = {
    "recipe_convnext_448": ("convnext_base", 448, "convnext_base.fb_in22k_ft_in1k_384", "test_convnext", 32),
    "recipe_eva02_448": ("eva02_large_patch14_448", 448, "eva02_large_patch14_448.mim_m38m_ft_in22k_in1k",
                         "eva02_tiny_patch14_224", 224),
    "recipe_clip_vit_336": ("vit_large_patch14_clip_336", 336, "vit_large_patch14_clip_336.openai", "test_vit", 160),
}


def compose_recipe(name: str, *overrides: str):
    from hydra import compose, initialize_config_module

    with initialize_config_module("twincar.conf", version_base="1.3"):
        return compose("train", overrides=[f"experiment={name}", *overrides])


@pytest.mark.parametrize("name", RECIPES)
def test_each_recipe_is_adamw_with_layer_decay_drop_path_ema_at_its_published_resolution(name):
    import timm

    arch, size, tag, _, _ = RECIPES[name]
    cfg = compose_recipe(name, "paths.output_dir=run")
    assert (cfg.model.name, cfg.model.pretrained, cfg.data.image_size) == (arch, tag, size)
    assert cfg.optimizer.opt == "adamw" and 0.7 <= cfg.optimizer.layer_decay < 1.0
    assert cfg.model.drop_path_rate > 0 and cfg.model.ema.decay is not None
    assert cfg.trainer.precision == "bf16-mixed"
    assert tag in timm.list_pretrained(arch + "*")  # a tag timm can fetch


@pytest.mark.parametrize("name", RECIPES)
def test_the_recipes_share_one_base(name):
    from omegaconf import OmegaConf

    base, cfg = compose_recipe("recipe_base", "paths.output_dir=run"), compose_recipe(name, "paths.output_dir=run")
    for key in ("augmentation.scale", "model.label_smoothing", "model.ema.decay", "optimizer.opt",
                "optimizer.head_lr_mult", "optimizer.weight_decay", "scheduler.name", "scheduler.warmup_epochs",
                "scheduler.min_lr_ratio", "trainer.precision", "data.eval_crop_pct", "data.num_workers"):
        assert OmegaConf.select(cfg, key) == OmegaConf.select(base, key), key
    assert (base.model.label_smoothing, base.optimizer.opt, base.trainer.precision) == (0.1, "adamw", "bf16-mixed")


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_each_recipe_trains_one_step_at_a_tiny_size(name, tmp_path, data_dir):
    from twincar.train import train

    _, _, _, small, size = RECIPES[name]
    cfg = compose_recipe(name, f"model.name={small}", "model.pretrained=false", f"data.image_size={size}",
                         "++trainer.max_steps=1", "++trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
                         "trainer.accelerator=cpu", "data.batch_size=4", "data.eval_batch_size=4",
                         "data.num_workers=0", "test=false", "export=false", "~callbacks.rich_progress_bar",
                         f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}", f"paths.output_dir={tmp_path}/run",
                         *[f"data.synthetic.{k}={v}" for k, v in SMALL_SPEC.items()])
    metrics = train(cfg)
    assert math.isfinite(metrics["val/loss"])
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    hp = ckpt["hyper_parameters"]
    assert hp["name"] == small and hp["drop_path_rate"] == cfg.model.drop_path_rate
    assert hp["optimizer"]["layer_decay"] == cfg.optimizer.layer_decay and ckpt["global_step"] == 1
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert len({round(g["lr"], 12) for g in groups}) > 2  # layer-wise rates, not one backbone and one head rate
