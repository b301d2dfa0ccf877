"""Hi-End-MAE: hierarchical encoder-driven masked autoencoder (Tang et al., MedIA 2025), as the reference code does it.

It is :class:`~pretrain.methods.mae.MAE` with another decoder (same masking, views and loss). The query stream is
the encoder's final normed output (through ``encoder_to_decoder[3]``) plus one shared mask token per masked position,
with a sin-cos decoder position embedding; it runs 2 self-attention blocks, then 3 cross-attention blocks whose
keys/values are the raw outputs of encoder blocks d//4, 2d//4, 3d//4 (3, 6, 9 of 12, 0-based) taken deep to shallow,
each through its own ``encoder_to_decoder`` projection and not layer-normed. Parameter names are the reference's, so
released checkpoints import by a plain key mapping.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, Block
from torch import nn

from nnunetv2_hiendmae.vit import init_linear_and_norm
from pretrain.methods.mae import MAE
from pretrain.methods.masked import norm_layer

# Decoder width/heads per encoder preset (reference: 384/12 for ViT-B, 528/16 for the 1536-wide models); for Primus,
# half the encoder's width as for ViT-B, with the encoder's heads (a width divisible by 6 for the sin-cos position).
DECODER_PRESETS: dict[str, dict] = {
    "vit_tiny": dict(embed_dim=48, num_heads=4, self_depth=2, cross_depth=3),
    "vit_b16": dict(embed_dim=384, num_heads=12, self_depth=2, cross_depth=3),
    "vit_l16": dict(embed_dim=528, num_heads=16, self_depth=2, cross_depth=3),
    "vit_l12": dict(embed_dim=528, num_heads=16, self_depth=2, cross_depth=3),
    "primus_tiny": dict(embed_dim=48, num_heads=4, self_depth=2, cross_depth=3),
    "primus_s": dict(embed_dim=198, num_heads=6, self_depth=2, cross_depth=3),
    "primus_b": dict(embed_dim=396, num_heads=12, self_depth=2, cross_depth=3),
    "primus_m": dict(embed_dim=432, num_heads=12, self_depth=2, cross_depth=3),
    "primus_l": dict(embed_dim=528, num_heads=16, self_depth=2, cross_depth=3),
}


class CrossAttention(nn.Module):
    """Multi-head attention of decoder queries ``x`` over encoder memory ``y`` (not layer-normed, as the reference)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, c // h).transpose(1, 2)  # [B, h, N, c/h]
        k, v = self.kv(y).reshape(b, y.shape[1], 2, h, c // h).permute(2, 0, 3, 1, 4)  # 2 x [B, h, Ny, c/h]
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class CrossAttentionBlock(nn.Module):
    """Pre-norm: x += SA(LN0 x); x += CA(LN1 x, y); x += MLP(LN2 x)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm0 = norm_layer(dim)
        self.self_attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm1 = norm_layer(dim)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), y)
        return x + self.mlp(self.norm2(x))


class HiEndDecoder(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, out_dim: int, self_depth: int = 2, cross_depth: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, qkv_bias=True, norm_layer=norm_layer)
                                    for _ in range(self_depth))
        self.cross_attention_blocks = nn.ModuleList(CrossAttentionBlock(embed_dim, num_heads)
                                                    for _ in range(cross_depth))
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, out_dim)

    def forward(self, x: torch.Tensor, memories: Sequence[torch.Tensor]) -> torch.Tensor:
        """Features after the final norm; ``memories`` deep to shallow, one per cross-attention block."""
        for blk in self.blocks:
            x = blk(x)
        for blk, y in zip(self.cross_attention_blocks, memories):
            x = blk(x, y)
        return self.norm(x)


class HiEndMAE(MAE):
    """Encoder + four encoder->decoder projections + mask token + hierarchical decoder."""

    decoder_presets = DECODER_PRESETS
    decay_tokens = False  # the groups Hi-End-MAE's main.py builds but does not apply (docs/method.md)

    def build_decoder(self) -> None:
        d = self.decoder_config
        if d["cross_depth"] != len(self.encoder.taps):
            raise ValueError("the decoder needs one cross-attention block per encoder tap")
        self.decoder = HiEndDecoder(self.dec_dim, d["num_heads"], self.out_dim, d["self_depth"], d["cross_depth"])
        self.encoder_to_decoder = nn.ModuleList(nn.Linear(self.encoder.embed_dim, self.dec_dim) for _ in range(4))
        init_linear_and_norm(self.decoder)
        for lin in self.encoder_to_decoder:
            nn.init.xavier_uniform_(lin.weight)

    def embed_for_decoder(self, normed: torch.Tensor) -> torch.Tensor:
        return self.encoder_to_decoder[3](normed)

    def decode(self, queries: torch.Tensor, hidden: list[torch.Tensor]) -> torch.Tensor:
        memories = [proj(hidden[t]) for proj, t in zip(self.encoder_to_decoder, self.encoder.taps)]
        return self.decoder(queries, memories[::-1])  # deep to shallow
