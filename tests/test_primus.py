"""The Primus encoder: its weights are dynamic-network-architectures' ``Primus`` weights (same keys, same tokens at
the pretraining grid and at another grid), its position embeddings follow each input's token grid, and its masking
keeps every token's own positions."""
from __future__ import annotations

import pytest
import torch
from dynamic_network_architectures.architectures.primus import Primus
from einops import rearrange

from nnunetv2_hiendmae.encoders import build_encoder
from nnunetv2_hiendmae.presets import PRESETS, encoder_config
from nnunetv2_hiendmae.primus import PrimusEncoder
from nnunetv2_hiendmae.vit import interpolate_pos_embed, take_tokens

PRETRAIN_GRID = (4, 4, 4)  # a 32^3 patch of 8^3 tokens


def trained_like_encoder(seed: int = 0) -> PrimusEncoder:
    """primus_tiny with every parameter moved off its initial value (LayerScale, biases and the position embedding
    start at constants, which would hide a mix-up between them)."""
    torch.manual_seed(seed)
    enc = build_encoder(encoder_config("primus_tiny", 1, pos_embed_grid=PRETRAIN_GRID)).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return enc


def dna_primus(shape: tuple[int, int, int], encoder: PrimusEncoder) -> Primus:
    """dynamic-network-architectures' Primus for an input ``shape``, with the encoder's weights (its learned position
    embedding resized to the input's token grid, as fine-tuning does)."""
    p = PRESETS["primus_tiny"]
    net = Primus(1, p["embed_dim"], (8, 8, 8), 2, eva_depth=p["depth"], eva_numheads=p["num_heads"],
                 input_shape=shape, init_values=0.1, scale_attn_inner=True).eval()
    state = encoder.state_dict()
    grid = tuple(s // 8 for s in shape)
    state["eva.pos_embed"] = interpolate_pos_embed(state["eva.pos_embed"], PRETRAIN_GRID, grid)
    result = net.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert {k.split(".")[0] for k in result.missing_keys} == {"up_projection", "mask_token"}  # the decoder only
    return net


@pytest.mark.parametrize("shape", [(32, 32, 32), (16, 64, 32)], ids=["pretraining grid", "another grid"])
def test_tokens_equal_those_of_dna_primus_with_the_same_weights(shape):
    """(16, 64, 32) has as many tokens as the pretraining grid, so a position embedding or rotary table of the
    construction grid (what timm's rotary module returns for any grid) would run and give other tokens."""
    enc = trained_like_encoder()
    net = dna_primus(shape, enc)
    x = torch.randn(2, 1, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, _ = net.eva(rearrange(net.down_projection(x), "b c w h d -> b (w h d) c"))
        normed, hidden = enc(x)
    assert normed.shape == (2, 64, 48) and len(hidden) == 4
    torch.testing.assert_close(normed, expected, rtol=1e-5, atol=2e-5)


def test_rotary_table_follows_the_grid_and_matches_the_cached_one_at_the_construction_grid():
    enc = trained_like_encoder()
    torch.testing.assert_close(enc.rope_for(PRETRAIN_GRID), enc.eva.rope.get_embed(), rtol=0, atol=0)
    other = enc.rope_for((2, 8, 4))
    assert other.shape == enc.eva.rope.get_embed().shape and not torch.allclose(other, enc.eva.rope.get_embed())


def test_kept_tokens_keep_their_own_positions():
    """Keeping every token in a random order gives the full pass's tokens in that order: the position embedding and
    rotary rows travel with their tokens."""
    enc = trained_like_encoder()
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    keep = torch.stack([torch.randperm(64, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    with torch.no_grad():
        full, _ = enc(x)
        shuffled, _ = enc(x, keep=keep)
        visible, _ = enc(x, keep=keep[:, :16])
    torch.testing.assert_close(shuffled, take_tokens(full, keep), rtol=1e-5, atol=1e-5)
    assert visible.shape == (2, 16, 48)


def test_replaced_tokens_take_the_mask_token_before_their_position():
    enc = trained_like_encoder()
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(5))
    replace = torch.zeros(1, 64, dtype=torch.bool)
    replace[0, ::3] = True
    mask_token = torch.randn(1, 1, 48)
    with torch.no_grad():
        out, _ = enc(x, replace=replace, mask_token=mask_token)
        other, _ = enc(x + torch.randn_like(x) * replace.view(1, 1, 4, 4, 4).repeat_interleave(8, 2)
                       .repeat_interleave(8, 3).repeat_interleave(8, 4), replace=replace, mask_token=mask_token)
    torch.testing.assert_close(out, other)  # what lies under a replaced token does not matter
    with torch.no_grad():
        plain, _ = enc(x)
    assert not torch.allclose(out, plain)


def test_presets_are_dna_primus_configurations():
    from dynamic_network_architectures.architectures.primus import _PRIMUS_CONFIGS

    for size, conf in _PRIMUS_CONFIGS.items():
        preset = PRESETS[f"primus_{size.lower()}"]
        assert (preset["embed_dim"], preset["depth"], preset["num_heads"], preset["token_size"]) == \
            (conf["embed_dim"], conf["eva_depth"], conf["eva_numheads"], 8)


def test_a_primus_has_no_cls_token_and_pools_by_the_mean():
    enc = trained_like_encoder()
    tokens = torch.randn(3, 64, 48)
    assert enc.num_prefix_tokens == 0
    torch.testing.assert_close(enc.pooled(tokens), tokens.mean(1))
    with pytest.raises(ValueError, match="learned"):
        build_encoder({**encoder_config("primus_tiny", pos_embed_grid=PRETRAIN_GRID), "pos_embed": "sincos"})
    with pytest.raises(ValueError, match="needs pos_embed_grid"):
        build_encoder(encoder_config("primus_tiny"))
