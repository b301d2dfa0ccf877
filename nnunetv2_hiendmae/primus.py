"""The Primus encoder (Wald et al. 2025, "Primus: Enforcing Attention Usage for 3D Medical Image Segmentation") for
pretraining with every method, built from dynamic-network-architectures' own pieces under Primus's key names.

``down_projection.proj`` (the ``Conv3d(kernel = stride = 8)`` stem) and ``eva`` (dynamic-network-architectures'
``building_blocks.eva.Eva``: timm ``EvaBlock`` with separate q/k/v, SwiGLU MLP with its own LayerNorm, LayerScale,
rotary plus learned absolute position embedding, final ``norm``) are the modules of
``dynamic_network_architectures.architectures.primus.Primus``, so this encoder's state dict loads unchanged into a
``Primus``'s ``down_projection.*`` and ``eva.*`` (tested, token for token).

What ``Eva.forward`` cannot do and :class:`PrimusEncoder` adds, without touching the blocks:

* **any token grid**: ``Eva`` adds its construction grid's position embedding and takes its rotary table from
  timm's ``RotaryEmbeddingCat``, which, built with a ``feat_shape``, returns that grid's table for any other grid
  without a word. Here the learned embedding is resized trilinearly to each input's grid and the rotary table is
  built for the grid (integer token positions, as a ``Primus`` constructed for that input size has them);
* **masked image modelling**: only the kept tokens enter the blocks, each with its own position embedding and rotary
  row (MAE, Hi-End-MAE), or replaced tokens take a mask token before the position embedding (SimMIM-style);
* **every block's output** for the methods that read intermediate tokens (Hi-End-MAE's decoder).

There is no CLS token (``num_prefix_tokens = 0``): where a method or a command reads one from the ViT, it takes the
mean of the encoder's normed tokens here (:meth:`PrimusEncoder.pooled`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from dynamic_network_architectures.building_blocks.eva import Eva
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from timm.layers import build_rotary_pos_embed

from nnunetv2_hiendmae.presets import Grid, token_size_3d
from nnunetv2_hiendmae.vit import PatchEmbed3D, TokenGridEncoder, interpolate_pos_embed, take_tokens, tap_indices


def primus_group_matcher(prefix: str = "") -> dict:
    """Layer ids for layer-wise lr decay (timm's convention) under Primus's names: stem and position embedding are
    layer 0, block i is layer i+1; the final norm, like anything outside the encoder, falls into the last layer."""
    return {"stem": rf"^{prefix}(?:down_projection|eva\.pos_embed)", "blocks": rf"^{prefix}eva\.blocks\.(\d+)"}


class PrimusEncoder(TokenGridEncoder):
    """Primus's patch embedding and EVA encoder with the interface of :class:`~nnunetv2_hiendmae.vit.ViTEncoder3D`.

    ``forward`` returns ``(normed, hidden)``: the final normed tokens ``[B, N, E]`` (no CLS) and the raw residual
    stream after every block (``depth`` tensors ``[B, N, E]``); ``keep``, ``replace`` and ``mask_token`` as for the
    ViT. ``pos_embed_grid`` is the token grid of the learned position embedding (the pretraining patch / token;
    ValueError without it);
    ``init_values`` is LayerScale's initial value (None: no LayerScale), ``drop_path_rate`` the deepest block's
    stochastic-depth rate. Parameters are initialised as ``Primus`` initialises them.
    """

    num_prefix_tokens = 0
    pos_embed_type = "learned"
    stem_weight_key, pos_embed_key = "down_projection.proj.weight", "eva.pos_embed"  # what fine-tuning adapts

    def __init__(self, in_channels: int, embed_dim: int, depth: int, num_heads: int,
                 pos_embed_grid: Sequence[int] | None, token_size: int | Sequence[int] = 8, mlp_ratio: float = 8 / 3,
                 init_values: float | None = 0.1, drop_path_rate: float = 0.0, pos_embed: str = "learned"):
        super().__init__()
        if pos_embed != "learned":
            raise ValueError(f"Primus has a learned position embedding (with rotary embeddings), got {pos_embed!r}")
        if pos_embed_grid is None:
            raise ValueError("Primus's learned position embedding needs pos_embed_grid (the pretraining token grid)")
        self.token_size: Grid = token_size_3d(token_size)
        self.embed_dim, self.depth, self.in_channels = embed_dim, depth, in_channels
        self.pos_embed_grid: Grid = tuple(int(g) for g in pos_embed_grid)  # type: ignore[assignment]
        self.down_projection = PatchEmbed3D(in_channels, embed_dim, self.token_size)
        self.eva = Eva(embed_dim=embed_dim, depth=depth, num_heads=num_heads, ref_feat_shape=self.pos_embed_grid,
                       mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate, init_values=init_values,
                       scale_attn_inner=True)
        self.down_projection.apply(InitWeights_He(1e-2))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay besides biases and norms: the position embedding."""
        return {"eva.pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False, prefix: str = "") -> dict:
        return primus_group_matcher(prefix)

    @property
    def taps(self) -> tuple[int, int, int]:
        return tap_indices(self.depth)

    def pos_embed_for(self, grid: Grid, device: torch.device | None = None) -> torch.Tensor:
        """``[1, L, E]``: the learned absolute embedding resized trilinearly to ``grid`` (``device``: unused, the
        embedding lives on the module's device; kept for the ViT's signature)."""
        return interpolate_pos_embed(self.eva.pos_embed, self.pos_embed_grid, grid)

    def rope_for(self, grid: Grid) -> torch.Tensor:
        """``[L, 2 * head_dim]``: timm's concatenated sin/cos rotary table for ``grid`` with integer token
        positions, built from the rotary module's own settings (its cached table belongs to the construction grid)."""
        rope = self.eva.rope
        sin, cos = build_rotary_pos_embed(list(grid), dim=rope.dim, max_res=rope.max_res,
                                          temperature=rope.temperature, linear_bands=rope.linear_bands,
                                          in_pixels=rope.in_pixels, ref_feat_shape=list(grid),
                                          grid_offset=rope.grid_offset, grid_indexing=rope.grid_indexing,
                                          device=self.eva.pos_embed.device)
        return torch.cat([sin, cos], dim=-1)

    def pooled(self, normed: torch.Tensor) -> torch.Tensor:
        """``[B, N, E]`` -> ``[B, E]``: the mean of the normed tokens, what stands in for the ViT's CLS token."""
        return normed.mean(dim=1)

    def forward_patches(self, patches: torch.Tensor, grid: Grid, keep: torch.Tensor | None = None,
                        replace: torch.Tensor | None = None,
                        mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The same from :func:`~nnunetv2_hiendmae.vit.patchify` output ``[B, L, p³C]`` of a volume whose token
        grid is ``grid``."""
        self.check_masking(keep, replace, mask_token)
        pos, rope = self.pos_embed_for(grid), self.rope_for(grid)[None]  # [1, L, E], [1, L, 2 hd]
        if keep is not None:  # visible tokens only: [B, N, ...]
            patches, pos, rope = take_tokens(patches, keep), take_tokens(pos, keep), take_tokens(rope, keep)
        tokens = self.down_projection(patches)  # [B, N, E]
        if replace is not None:
            tokens = torch.where(replace[..., None], mask_token.to(tokens.dtype), tokens)
        x = self.eva.pos_drop(tokens + pos)
        rope = rope[:, None]  # [B or 1, 1, N, 2 hd]: broadcast over the heads
        hidden = []
        for blk in self.eva.blocks:
            x = blk(x, rope=rope)
            hidden.append(x)
        return self.eva.norm(x), hidden
