"""Hi-End-MAE: hierarchical encoder-driven masked autoencoder (Tang et al., MedIA 2025), as the reference code does it.

The encoder sees only the visible tokens. The decoder's query stream is the encoder's final normed output plus one
shared mask token per masked position, with a sin-cos decoder position embedding; it runs 2 self-attention blocks,
then 3 cross-attention blocks whose keys/values are the raw outputs of encoder blocks d//4, 2d//4, 3d//4 taken
deep to shallow (3, 6, 9 of 12, 0-based). The loss is the MSE between the predictions at the masked positions and
the per-patch normalised voxels. The token sequence stays in shuffled order throughout (attention is permutation
equivariant), exactly like the reference.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, Block
from torch import nn

from nnunetv2_hiendmae.vit import build_encoder, init_linear_and_norm, patchify, sincos_pos_embed_3d, take_tokens, unpatchify

# Decoder width/heads per encoder preset (reference: 384/12 for ViT-B, 528/16 for the 1536-wide models).
DECODER_PRESETS: dict[str, dict] = {
    "vit_tiny": dict(embed_dim=48, num_heads=4, self_depth=2, cross_depth=3),
    "vit_b16": dict(embed_dim=384, num_heads=12, self_depth=2, cross_depth=3),
    "vit_l16": dict(embed_dim=528, num_heads=16, self_depth=2, cross_depth=3),
    "vit_l12": dict(embed_dim=528, num_heads=16, self_depth=2, cross_depth=3),
}
_norm = partial(nn.LayerNorm, eps=1e-6)


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
        self.norm0 = _norm(dim)
        self.self_attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm1 = _norm(dim)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = _norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), y)
        return x + self.mlp(self.norm2(x))


class HiEndDecoder(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, out_dim: int, self_depth: int = 2, cross_depth: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, qkv_bias=True, norm_layer=_norm) for _ in range(self_depth))
        self.cross_attention_blocks = nn.ModuleList(CrossAttentionBlock(embed_dim, num_heads) for _ in range(cross_depth))
        self.norm = _norm(embed_dim)
        self.head = nn.Linear(embed_dim, out_dim)

    def forward(self, x: torch.Tensor, memories: Sequence[torch.Tensor], n_out: int) -> torch.Tensor:
        """Predictions for the last ``n_out`` tokens only (the masked ones: the only ones the loss reads; norm and
        head are per token, so this equals slicing the full output, minus a quarter of the head's cost)."""
        for blk in self.blocks:
            x = blk(x)
        for blk, y in zip(self.cross_attention_blocks, memories):  # deep to shallow
            x = blk(x, y)
        return self.head(self.norm(x[:, -n_out:]))


class HiEndMAE(nn.Module):
    """Encoder (shared ViT) + four encoder->decoder projections + mask token + hierarchical decoder."""

    def __init__(self, encoder: dict, decoder: dict, mask_ratio: float = 0.75):
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask ratio must be in (0, 1), got {mask_ratio}")
        self.mask_ratio = mask_ratio
        self.encoder = build_encoder(encoder)
        self.token_size = self.encoder.token_size
        self.channels = self.encoder.in_channels
        dec_dim = decoder["embed_dim"]
        self.dec_dim = dec_dim
        out_dim = self.channels * self.token_size[0] * self.token_size[1] * self.token_size[2]
        self.decoder = HiEndDecoder(dec_dim, decoder["num_heads"], out_dim, decoder["self_depth"], decoder["cross_depth"])
        if decoder["cross_depth"] != len(self.encoder.taps):
            raise ValueError("the decoder needs one cross-attention block per encoder tap")
        self.encoder_to_decoder = nn.ModuleList(nn.Linear(self.encoder.embed_dim, dec_dim) for _ in range(4))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self._init_weights()

    def _init_weights(self) -> None:
        init_linear_and_norm(self.decoder)
        for lin in self.encoder_to_decoder:
            nn.init.xavier_uniform_(lin.weight)
        nn.init.normal_(self.mask_token, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()} | {"mask_token"}

    def num_visible(self, num_tokens: int) -> int:
        return int(num_tokens * (1 - self.mask_ratio))

    def random_shuffle(self, batch: int, num_tokens: int, device: torch.device) -> torch.Tensor:
        """Per-sample random permutation ``[B, L]``; the first :meth:`num_visible` entries are the visible tokens."""
        return torch.rand(batch, num_tokens, device=device).argsort(dim=1)

    def forward(self, x: torch.Tensor, shuffle: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(loss, pred [B, L_mask, p³C], shuffle [B, L])``; pass ``shuffle`` to fix the mask."""
        b = x.shape[0]
        grid = self.encoder.grid(x.shape[2:])
        num_tokens = grid[0] * grid[1] * grid[2]
        n_vis = self.num_visible(num_tokens)
        if shuffle is None:
            shuffle = self.random_shuffle(b, num_tokens, x.device)
        visible, masked = shuffle[:, :n_vis], shuffle[:, n_vis:]

        patches = patchify(x, self.token_size)  # [B, L, p³C]
        normed, hidden = self.encoder.forward_patches(patches, grid, visible)  # [B, 1+n_vis, E], depth x same
        memories = [proj(hidden[t]) for proj, t in zip(self.encoder_to_decoder, self.encoder.taps)]
        query = torch.cat([self.encoder_to_decoder[3](normed), self.mask_token.expand(b, num_tokens - n_vis, -1)], dim=1)
        pos = sincos_pos_embed_3d(grid, self.dec_dim).to(x.device, query.dtype).expand(b, -1, -1)
        pos = pos.gather(1, shuffle[..., None].expand(-1, -1, self.dec_dim))  # decoder pos-embed in shuffled order
        query = torch.cat([query[:, :1], query[:, 1:] + pos], dim=1)  # [B, 1+L, D]; the CLS gets none
        pred = self.decoder(query, memories[::-1], num_tokens - n_vis).float()  # [B, L_mask, p³C]

        target = take_tokens(patches, masked).detach().float()
        target = F.layer_norm(target, target.shape[-1:], eps=1e-6)  # per-patch normalised, as the reference
        return F.mse_loss(pred, target), pred, shuffle

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(masked input, reconstruction)`` images ``[B, C, H, W, D]``: visible patches kept, masked ones predicted
        and de-normalised with the true patch statistics (the target's own mean/variance, so it inverts exactly)."""
        grid = self.encoder.grid(x.shape[2:])
        _, pred, shuffle = self(x)
        n_vis = shuffle.shape[1] - pred.shape[1]
        patches = patchify(x, self.token_size).float()
        idx = shuffle[:, n_vis:, None].expand(-1, -1, patches.shape[-1])
        true = patches.gather(1, idx)
        mean, var = true.mean(-1, keepdim=True), true.var(-1, unbiased=False, keepdim=True)
        masked_in, recon = patches.clone(), patches.clone()
        masked_in.scatter_(1, idx, torch.zeros_like(true))
        recon.scatter_(1, idx, pred * (var + 1e-6).sqrt() + mean)
        return (unpatchify(masked_in, self.token_size, grid, self.channels),
                unpatchify(recon, self.token_size, grid, self.channels))
