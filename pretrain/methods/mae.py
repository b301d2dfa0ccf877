"""MAE (He et al., CVPR 2022) on the shared 3D ViT encoder: K masked crops per volume, a plain Transformer decoder.

The steps (masking, encoding the visible tokens, decoding in shuffled order, the per-patch normalised MSE) are the
shared :class:`~pretrain.methods.masked.MaskedAutoencoder`'s; this file adds MAE's decoder and its ``forward``.

Decoder per encoder preset (data, below): MAE's decoder is 512 wide, 8 blocks, 16 heads for every ViT size; a 3D
sin-cos position embedding needs a width divisible by 6, so we take 576 (MiM's decoder width, 16 heads of 36), for
the Primus presets too.
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from nnunetv2_hiendmae.vit import init_linear_and_norm
from pretrain.methods.masked import MaskedAutoencoder, norm_layer

DECODER_PRESETS: dict[str, dict] = {
    "vit_tiny": dict(embed_dim=48, depth=2, num_heads=4),
    "vit_b16": dict(embed_dim=576, depth=8, num_heads=16),
    "vit_l16": dict(embed_dim=576, depth=8, num_heads=16),
    "vit_l12": dict(embed_dim=576, depth=8, num_heads=16),
    "primus_tiny": dict(embed_dim=48, depth=2, num_heads=4),
    "primus_s": dict(embed_dim=576, depth=8, num_heads=16),
    "primus_b": dict(embed_dim=576, depth=8, num_heads=16),
    "primus_m": dict(embed_dim=576, depth=8, num_heads=16),
    "primus_l": dict(embed_dim=576, depth=8, num_heads=16),
}


class MAEDecoder(nn.Module):
    """Pre-norm Transformer blocks, a final LayerNorm and a linear head to the voxels of one token."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, out_dim: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, qkv_bias=True, norm_layer=norm_layer)
                                    for _ in range(depth))
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class MAE(MaskedAutoencoder):
    """Shared encoder + ``decoder_embed`` + ``mask_token`` + :class:`MAEDecoder`; ``forward`` on K masked crops."""

    decoder_presets = DECODER_PRESETS
    decay_tokens = True  # MAE's main_pretrain.py: optim_factory.add_weight_decay(model, wd), no skip list

    def build_decoder(self) -> None:
        d = self.decoder_config
        self.decoder_embed = nn.Linear(self.encoder.embed_dim, self.dec_dim)
        self.decoder = MAEDecoder(self.dec_dim, d["depth"], d["num_heads"], self.out_dim)
        init_linear_and_norm(self.decoder_embed)
        init_linear_and_norm(self.decoder)

    def embed_for_decoder(self, normed: torch.Tensor) -> torch.Tensor:
        return self.decoder_embed(normed)

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``views['crops'] [B, K, C, *patch]`` -> ``{'loss'}``: the masked-patch MSE over all crops."""
        x = views["crops"].flatten(0, 1)
        return {"loss": self.autoencode(x, self.settings.mask_ratio).loss.mean()}

    def figure_input(self, views: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[1, C, *patch]``: the volume the reconstruction figure shows."""
        return views["crops"][:1, 0]
