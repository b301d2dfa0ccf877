"""Parameter groups come from what the models declare (timm's convention) and equal the rules they replaced."""
from __future__ import annotations

import pytest

from nnunetv2_hiendmae.network import HiEndUNETR
from nnunetv2_hiendmae.optim import param_groups
from nnunetv2_hiendmae.presets import encoder_config
from pretrain.methods import MaskedCropsSettings
from pretrain.methods.hiend_mae import HiEndMAE


def by_name(model, groups) -> dict[str, tuple[float, float]]:
    """``name -> (weight_decay, lr_scale)``; every trainable parameter in exactly one group."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in groups:
        for p in g["params"]:
            assert names[id(p)] not in out
            out[names[id(p)]] = (g["weight_decay"], g["lr_scale"])
    assert out.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    return out


def test_pretraining_groups_decay_all_but_biases_norms_tokens_and_position_embeddings():
    model = HiEndMAE(encoder_config("vit_tiny", pos_embed="learned", pos_embed_grid=(2, 2, 2)), MaskedCropsSettings())
    got = by_name(model, param_groups(model, 0.05))
    for name, p in model.named_parameters():
        exempt = (p.ndim <= 1 or name.endswith(".bias")
                  or any(k in name for k in ("cls_token", "mask_token", "pos_embed")))
        assert got[name] == ((0.0 if exempt else 0.05), 1.0), name
    assert got["encoder.pos_embed"][0] == got["mask_token"][0] == got["encoder.cls_token"][0] == 0.0


@pytest.mark.parametrize("name, decayed", [("hiend_mae", False), ("gl_mae", False), ("mae", True), ("mim", True)])
def test_each_method_decays_the_cls_and_mask_tokens_as_its_reference(name, decayed):
    """MAE's and MiM's main_pretrain.py use timm's add_weight_decay without a skip list: their (1, 1, E) tokens are
    decayed; Hi-End-MAE's intended groups (and GL-MAE, which follows it) exempt them. Biases and norms never decay."""
    from pretrain.methods import make_settings, model_class

    model = model_class(name)(encoder_config("vit_tiny"), make_settings(name, {}))
    got = by_name(model, param_groups(model, 0.05))
    assert got["encoder.cls_token"][0] == got["mask_token"][0] == (0.05 if decayed else 0.0)
    assert got["encoder.norm.weight"][0] == got["encoder.blocks.0.attn.qkv.bias"][0] == 0.0
    assert got["encoder.blocks.0.attn.qkv.weight"][0] == 0.05


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_finetuning_groups_scale_the_lr_by_encoder_layer(pos_embed):
    """BEiT/MAE layer ids: 0 for the embedding, CLS and position, i+1 for block i, depth+1 for the final norm and
    everything outside the encoder; lr scale ``decay ** (depth + 1 - layer)``."""
    enc = encoder_config("vit_tiny", pos_embed=pos_embed, pos_embed_grid=(2, 2, 2) if pos_embed == "learned" else None)
    net = HiEndUNETR(1, 3, (32, 32, 32), enc, feature_size=4)
    depth, decay = net.encoder.depth, 0.75
    groups = param_groups(net, 0.05, layer_decay=decay)
    got = by_name(net, groups)
    for name, p in net.named_parameters():
        if name.startswith(("encoder.patch_embed.", "encoder.cls_token", "encoder.pos_embed")):
            layer = 0
        elif name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        else:
            layer = depth + 1
        exempt = p.ndim <= 1 or name.endswith(".bias") or name.rsplit(".", 1)[-1] in ("cls_token", "pos_embed")
        assert got[name] == (pytest.approx(0.0 if exempt else 0.05), pytest.approx(decay ** (depth + 1 - layer))), name
    assert groups[0]["lr_scale"] == 1.0  # nnU-Net logs param_groups[0]['lr']: the base lr


def test_no_layer_decay_gives_one_lr():
    net = HiEndUNETR(1, 3, (32, 32, 32), encoder_config("vit_tiny"), feature_size=4)
    assert {g["lr_scale"] for g in param_groups(net, 0.05, layer_decay=1.0)} == {1.0}
