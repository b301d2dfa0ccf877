"""Pretraining settings of a Primus: each method's Primus recipe (nnssl's Primus MAE) and the learned position
embedding as defaults, a sin-cos request refused in one line, the ViT's defaults unchanged, and ``--estimate``."""
from __future__ import annotations

import json

import pytest
from conftest import pretrain_args, run_cli

from nnunetv2_hiendmae.errors import UserError
from pretrain import methods
from pretrain.config import PretrainConfig


@pytest.mark.parametrize("method", list(methods.METHODS))
def test_every_method_takes_the_primus_recipe_on_a_primus(method):
    cfg = PretrainConfig(datasets=["1"], output_dir="x", method=method, arch="primus_m")
    assert (cfg.lr, cfg.warmup_epochs, cfg.epochs, cfg.recipe().betas) == (3e-4, 50, 1000, (0.9, 0.98))
    assert cfg.pos_embed == "learned"
    vit = PretrainConfig(datasets=["1"], output_dir="x", method=method, arch="vit_b16")
    recipe = methods.METHODS[method].recipe
    assert (vit.warmup_epochs, vit.epochs, vit.recipe().betas, vit.pos_embed) == \
        (recipe.warmup_epochs, recipe.epochs, (0.9, 0.95), "sincos")


def test_a_sincos_primus_is_one_clear_error():
    with pytest.raises(UserError, match="primus_s has a learned position embedding"):
        PretrainConfig(datasets=["1"], output_dir="x", arch="primus_s", pos_embed="sincos")


def test_the_estimate_of_a_primus_run(preprocessed_dataset, tmp_path):
    out = tmp_path / "never"
    args = pretrain_args(preprocessed_dataset, out, 2, 1, "--arch", "primus_tiny", method="mae")
    e = json.loads(run_cli(*args, "--estimate", "--json", check=True).stdout.strip().splitlines()[-1])
    assert e["arch"] == "primus_tiny" and e["model_crops_per_s"] > 0 and e["peak_memory_bytes"] > 0
    assert not out.exists()
