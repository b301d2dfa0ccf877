"""The plain 3D Vision Transformer encoder shared by every pretraining method and by nnU-Net fine-tuning.

Parameter names follow the Hi-End-MAE reference encoder (``patch_embed.proj``, ``cls_token``, ``blocks.N.*``,
``norm``) so that released reference checkpoints load by a plain key mapping. Blocks are timm's pre-norm ``Block``
(fused qkv with bias, GELU MLP, attention through ``F.scaled_dot_product_attention``).

The patch embedding keeps the reference's ``Conv3d(kernel = stride = token)`` parameter but is computed as one GEMM
on flattened patches: a pretraining step embeds only the visible quarter of the patches (masking happens before the
embedding, as in the reference), and the GEMM avoids the convolution's layout conversions.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from nnunetv2_hiendmae.presets import Grid, token_size_3d


def sincos_pos_embed_3d(grid: Sequence[int], dim: int, temperature: float = 10000.0,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Fixed 3D sin-cos embedding ``[1, gh*gw*gd, dim]`` in raster (h, w, d) order, as in the reference.

    Layout per token: [sin(h w), cos(h w), sin(w w), cos(w w), sin(d w), cos(d w)] with F = dim/6 frequencies.
    Built on ``device`` from the grid alone (no state), so ``torch.compile`` traces it once and never recompiles.
    """
    if dim % 6:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 6, got {dim}")
    f = dim // 6
    omega = 1.0 / temperature ** (torch.arange(f, dtype=torch.float32, device=device) / f)
    axes = torch.meshgrid(*[torch.arange(g, dtype=torch.float32, device=device) for g in grid], indexing="ij")
    parts = []
    for a in axes:
        out = a.flatten()[:, None] * omega[None]  # [L, F]
        parts += [torch.sin(out), torch.cos(out)]
    return torch.cat(parts, dim=1)[None]


def interpolate_pos_embed(pos_embed: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int]) -> torch.Tensor:
    """Resize a learned ``[1, L, E]`` embedding from one token grid to another (trilinear)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    e = pos_embed.shape[-1]
    vol = pos_embed.reshape(1, *old_grid, e).permute(0, 4, 1, 2, 3)
    vol = F.interpolate(vol.float(), size=tuple(new_grid), mode="trilinear", align_corners=False)
    return vol.permute(0, 2, 3, 4, 1).reshape(1, -1, e).to(pos_embed.dtype)


def patchify(x: torch.Tensor, token_size: Sequence[int]) -> torch.Tensor:
    """``[B, C, H, W, D]`` -> ``[B, L, ph*pw*pd*C]``: raster token order, per-patch vector ordered (ph, pw, pd, C)
    (the reference's order; the reconstruction target and the patch embedding both read it)."""
    b, c, h, w, d = x.shape
    ph, pw, pd = token_size
    x = x.reshape(b, c, h // ph, ph, w // pw, pw, d // pd, pd)  # [B, C, gh, ph, gw, pw, gd, pd]
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, (h // ph) * (w // pw) * (d // pd), ph * pw * pd * c)


def unpatchify(p: torch.Tensor, token_size: Sequence[int], grid: Sequence[int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, L, ph*pw*pd*C]`` -> ``[B, C, H, W, D]``."""
    b = p.shape[0]
    (gh, gw, gd), (ph, pw, pd) = grid, token_size
    x = p.reshape(b, gh, gw, gd, ph, pw, pd, channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, channels, gh * ph, gw * pw, gd * pd)


def tokens_to_volume(tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """``[B, P+N, E]`` -> ``[B, E, *grid]``: the last N = prod(grid) tokens laid out on the grid; the P prefix tokens
    before them (the ViT's CLS, none for Primus) have no position, so they are dropped."""
    n = grid[0] * grid[1] * grid[2]
    return tokens[:, tokens.shape[1] - n:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], *grid)


def take_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tokens[b, index[b, n]]``: ``[B, L, ...]`` with ``index [B, N]`` -> ``[B, N, ...]``
    (batch-expanded input ok)."""
    return tokens.expand(index.shape[0], *tokens.shape[1:]).gather(
        1, index.reshape(*index.shape, *([1] * (tokens.ndim - 2))).expand(-1, -1, *tokens.shape[2:]))


def tap_indices(depth: int) -> tuple[int, int, int]:
    """Blocks whose raw outputs feed the decoder / UNETR skips: 3, 6, 9 for depth 12 (reference convention)."""
    return depth // 4, 2 * depth // 4, 3 * depth // 4


def init_linear_and_norm(module: nn.Module) -> None:
    """The reference's init: Xavier-uniform Linear weights with zero bias, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PatchEmbed3D(nn.Module):
    """Linear embedding of flattened patches, stored as the reference's ``Conv3d(kernel = stride = token)``.

    ``forward`` takes :func:`patchify` output (any subset of patches) ``[B, N, ph*pw*pd*C]`` -> ``[B, N, E]``; on a
    whole volume it equals the convolution (tested) without its layout conversions.
    """

    def __init__(self, in_channels: int, embed_dim: int, token_size: Grid):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=token_size, stride=token_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight  # [E, C, ph, pw, pd] -> [E, ph*pw*pd*C], the order patchify uses
        return F.linear(patches, w.permute(0, 2, 3, 4, 1).reshape(w.shape[0], -1), self.proj.bias)


def grid_of(spatial_shape: Sequence[int], token_size: Grid) -> Grid:
    """The token grid of an input of ``spatial_shape`` voxels; every axis must be a multiple of ``token_size``
    (ValueError otherwise)."""
    if len(spatial_shape) != 3 or any(s % t for s, t in zip(spatial_shape, token_size)):
        raise ValueError(f"input shape {tuple(spatial_shape)} is not a multiple of the token size {token_size} on "
                         "every axis")
    return tuple(s // t for s, t in zip(spatial_shape, token_size))  # type: ignore[return-value]


class TokenGridEncoder(nn.Module):
    """What every encoder here shares around its own :meth:`forward_patches`: the token grid of an input and the
    call on a whole volume (:class:`ViTEncoder3D`, :class:`~nnunetv2_hiendmae.primus.PrimusEncoder`)."""

    token_size: Grid

    def grid(self, spatial_shape: Sequence[int]) -> Grid:
        """Token grid of an input; every axis must be a multiple of the token size (ValueError otherwise)."""
        return grid_of(spatial_shape, self.token_size)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, replace: torch.Tensor | None = None,
                mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``x [B, C, H, W, D]``; see the class docstring."""
        return self.forward_patches(patchify(x, self.token_size), self.grid(x.shape[2:]), keep, replace, mask_token)

    @staticmethod
    def check_masking(keep: torch.Tensor | None, replace: torch.Tensor | None,
                      mask_token: torch.Tensor | None) -> None:
        """Tokens are dropped (``keep``) or replaced (``replace`` with ``mask_token``), never both (ValueError)."""
        if (replace is None) != (mask_token is None) or (replace is not None and keep is not None):
            raise ValueError("give replace with mask_token (and without keep), or neither")


class ViTEncoder3D(TokenGridEncoder):
    """Pre-norm 3D ViT with a CLS token (zero positional embedding) and a final LayerNorm.

    ``forward`` returns ``(normed, hidden)``: the final normed tokens ``[B, 1+N, E]`` (CLS first) and the raw
    residual stream after every block (list of ``depth`` tensors ``[B, 1+N, E]``). Masked image modelling either
    drops tokens or replaces them: with ``keep`` (``[B, N]`` token indices in raster order) only those tokens are
    embedded and enter the transformer (MAE's visible set); with ``replace`` (``[B, L]`` bool) and ``mask_token``
    (``[1, 1, E]``, owned by the method) the embeddings of the replaced tokens are the mask token, which then gets
    their position embedding, and all tokens enter the transformer (SimMIM's and BEiT's masking).
    """

    num_prefix_tokens = 1  # the CLS token, first
    stem_weight_key, pos_embed_key = "patch_embed.proj.weight", "pos_embed"  # what fine-tuning adapts

    def __init__(
        self,
        in_channels: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        token_size: int | Sequence[int] = 16,
        mlp_ratio: float = 4.0,
        pos_embed: str = "sincos",
        pos_embed_grid: Sequence[int] | None = None,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        self.token_size: Grid = token_size_3d(token_size)
        self.embed_dim, self.depth, self.in_channels = embed_dim, depth, in_channels
        self.pos_embed_type = pos_embed
        self.patch_embed = PatchEmbed3D(in_channels, embed_dim, self.token_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        norm = partial(nn.LayerNorm, eps=1e-6)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth, linear
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[i], norm_layer=norm)
            for i in range(depth)
        )
        self.norm = norm(embed_dim)
        if pos_embed == "learned":
            if pos_embed_grid is None:
                raise ValueError("a learned position embedding needs pos_embed_grid")
            self.pos_embed_grid: Grid | None = tuple(pos_embed_grid)
            self.pos_embed = nn.Parameter(sincos_pos_embed_3d(self.pos_embed_grid, embed_dim))
        else:
            self.pos_embed_grid = None
        self._init_weights()

    def _init_weights(self) -> None:
        init_linear_and_norm(self)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay besides biases and norms (timm's convention)."""
        return {"cls_token", "pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False, prefix: str = "") -> dict:
        """Layer ids for layer-wise lr decay (timm's convention): the embedding is layer 0, block i is layer i+1;
        the final norm, like anything outside the encoder, falls into the last layer."""
        return {"stem": rf"^{prefix}(?:cls_token|pos_embed|patch_embed)", "blocks": rf"^{prefix}blocks\.(\d+)"}

    @property
    def taps(self) -> tuple[int, int, int]:
        return tap_indices(self.depth)

    def pooled(self, normed: torch.Tensor) -> torch.Tensor:
        """``[B, 1+N, E]`` -> ``[B, E]``: the normed CLS token, the summary of a volume the methods project."""
        return normed[:, 0]

    def pos_embed_for(self, grid: Grid, device: torch.device) -> torch.Tensor:
        """``[1, L, E]`` positional embedding for a token grid (sin-cos built for it, learned interpolated)."""
        if self.pos_embed_type == "learned":
            return interpolate_pos_embed(self.pos_embed, self.pos_embed_grid, grid)
        return sincos_pos_embed_3d(grid, self.embed_dim, device=device)

    def forward_patches(self, patches: torch.Tensor, grid: Grid, keep: torch.Tensor | None = None,
                        replace: torch.Tensor | None = None,
                        mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The same from :func:`patchify` output ``[B, L, p³C]`` of a volume whose token grid is ``grid``."""
        self.check_masking(keep, replace, mask_token)
        pos = self.pos_embed_for(grid, patches.device)  # [1, L, E]
        if keep is not None:  # visible tokens only: [B, N, ...]
            patches, pos = take_tokens(patches, keep), take_tokens(pos, keep)
        tokens = self.patch_embed(patches)  # [B, N, E]
        if replace is not None:  # the replaced tokens' embeddings become the mask token
            tokens = torch.where(replace[..., None], mask_token.to(tokens.dtype), tokens)
        tokens = tokens + pos
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)  # CLS has zero pos-embed
        hidden = []
        for blk in self.blocks:
            x = blk(x)
            hidden.append(x)
        return self.norm(x), hidden
