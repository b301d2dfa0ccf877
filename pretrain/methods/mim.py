"""MiM: mask in mask (Zhuang et al., IEEE TMI 2025), on the shared plain ViT encoder and the MAE decoder.

One region of twice the patch size per case (192^3 for 96^3), reconstructed at three nested levels, all through the
same encoder and decoder (:class:`~pretrain.methods.mae.MAE`):

* **coarse ("up")**: the whole region downsampled to the patch size; whole **octants** of its token grid are masked
  (``mask_ratio_up`` of the 8);
* **middle**: ``mid_samples`` of the masked octants, cut from the region at native resolution (each the patch size),
  each masked at random (``mask_ratio_mid``);
* **fine ("down")**: in each middle volume, ``down_samples`` of its masked tokens, each token's voxels upsampled
  to the patch size and masked at random (``mask_ratio_down``).

Decoder features (after the decoder norm, before the head) are mean-pooled per volume and compared across adjacent
levels through small MLP heads: a middle volume with the coarse features of *its octant* (detached), a fine volume
with the middle features of *its token* (detached); ``byol``: ``2 - 2 cos``, ``ce``: cross-entropy of the cosine
logits over all octants / all tokens of the middle volume.

    loss = rec_up + rec_mid + rec_down + align_weight * (align_up_mid + align_mid_down)

Fixed against the reference code (JiaxinZhuang/MiM, ``Pretrain/models_convmae3d_v4.py``; docs/method.md lists
each): coarse groups are true octants (the reference's 27 consecutive raster tokens are slabs); the up<->mid alignment
really uses the coarse-level features (the reference compares mid features with themselves); the ce alignment has as
many classes as candidates (the reference's crashes); the model can be built. Choices: the byol mid<->down target is
the middle feature at the fine volume's own token (the reference's running code takes the mean of the whole middle
volume, which is the same target for every fine volume of it; its commented-out line takes the token, as here); the
patch is the same number of tokens on every axis, so a token upsampled to the patch is not stretched. Deviation: the
reference's hybrid conv+ViT backbone is replaced by the shared plain ViT encoder.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_hiendmae.presets import Grid
from nnunetv2_hiendmae.vit import init_linear_and_norm, patchify, take_tokens, unpatchify
from pretrain.methods.mae import MAE
from pretrain.methods.masked import in_raster_order, pairwise_cosine, token_features


def token_octants(grid: Grid) -> torch.Tensor:
    """``[L]``: octant (0..7, bits x y z high to low) of each token of an even ``grid``, in raster order."""
    axes = torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij")
    bits = [(a >= g // 2).long().flatten() for a, g in zip(axes, grid)]
    return bits[0] * 4 + bits[1] * 2 + bits[2]


def octant_volumes(x: torch.Tensor, octants: torch.Tensor) -> torch.Tensor:
    """Octants ``[B, m]`` of the volumes ``x [B, C, *2S]`` -> ``[B*m, C, *S]`` at native resolution."""
    b, c = x.shape[:2]
    half = [s // 2 for s in x.shape[2:]]
    # [B, C, 2, hx, 2, hy, 2, hz] -> [B, 8, C, hx, hy, hz] with octant index = 4 * ix + 2 * iy + iz
    split = x.reshape(b, c, 2, half[0], 2, half[1], 2, half[2]).permute(0, 2, 4, 6, 1, 3, 5, 7)
    split = split.reshape(b, 8, c, *half)
    return take_tokens(split, octants).flatten(0, 1)


def token_volumes(x: torch.Tensor, tokens: torch.Tensor, token_size: Grid) -> torch.Tensor:
    """The voxels of tokens ``[N, k]`` of the volumes ``x [N, C, *S]`` -> ``[N*k, C, *token_size]``."""
    picked = take_tokens(patchify(x, token_size), tokens)  # [N, k, p³C]
    return unpatchify(picked.flatten(0, 1)[:, None], token_size, (1, 1, 1), x.shape[1])


def mlp_head(dim: int) -> nn.Sequential:
    """The reference's alignment MLP: Linear - GELU - Linear at the decoder width."""
    head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
    init_linear_and_norm(head)
    return head


class MiM(MAE):
    decay_tokens = True  # MiM's main_pretrain.py: timm's add_weight_decay with no skip list, as MAE

    def __init__(self, encoder: dict, settings, decoder: dict | None = None):
        super().__init__(encoder, settings, decoder)
        d = self.dec_dim
        self.align_up, self.align_mid = mlp_head(d), mlp_head(d)  # coarse octant targets, middle volumes
        self.align_mid_tokens, self.align_down = mlp_head(d), mlp_head(d)  # middle token targets, fine volumes

    def octant_shuffle(self, batch: int, grid: Grid, device: torch.device) -> tuple[torch.Tensor, int, torch.Tensor]:
        """A coarse-level mask of whole octants: ``(shuffle [B, L], n_visible, masked octants [B, n] in random
        order)``; the visible tokens are those of the kept octants."""
        n_masked = round(8 * self.settings.mask_ratio_up)
        order = torch.rand(batch, 8, device=device).argsort(dim=1)  # [B, 8]: kept octants first
        octant = token_octants(grid).to(device)  # [L]
        rank = order.argsort(dim=1)  # position of each octant in ``order``
        # sort tokens by the rank of their octant, ties broken at random: kept octants' tokens come first
        key = take_tokens(rank, octant.expand(batch, -1)).float() + torch.rand(batch, octant.numel(), device=device)
        shuffle = key.argsort(dim=1)
        n_visible = octant.numel() * (8 - n_masked) // 8
        return shuffle, n_visible, order[:, 8 - n_masked:]

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``views['region'] [B, 1, C, *2patch]``."""
        s = self.settings
        x = views["region"][:, 0]
        b, patch = x.shape[0], [n // 2 for n in x.shape[2:]]
        coarse = F.interpolate(x.float(), size=patch, mode="trilinear", align_corners=False).to(x.dtype)
        grid = self.encoder.grid(patch)
        shuffle, n_visible, masked_octants = self.octant_shuffle(b, grid, x.device)
        up = self.masked_autoencode(coarse, shuffle, n_visible)

        chosen = masked_octants[:, :s.mid_samples]  # [B, m]
        mid_x = octant_volumes(x, chosen)  # [B*m, C, *patch]
        mid = self.autoencode(mid_x, s.mask_ratio_mid)
        n_masked_mid = mid.pred.shape[1]
        picked = mid.shuffle[:, mid.shuffle.shape[1] - n_masked_mid:][:, :s.down_samples]  # [B*m, k] masked tokens
        fine_x = F.interpolate(token_volumes(mid_x, picked, self.token_size).float(), size=patch, mode="trilinear",
                               align_corners=False).to(x.dtype)  # [B*m*k, C, *patch]
        down = self.autoencode(fine_x, s.mask_ratio_down)

        up_groups = self.octant_means(in_raster_order(up.features, up.shuffle).detach(), grid)  # [B, 8, D]
        mid_means = token_features(mid.features, mid.shuffle).mean(1)  # [B*m, D]
        align_up_mid = self.align(self.align_mid(mid_means).view(b, -1, self.dec_dim), self.align_up(up_groups), chosen)
        mid_tokens = self.align_mid_tokens(in_raster_order(mid.features, mid.shuffle).detach())  # [B*m, L, D]
        down_means = token_features(down.features, down.shuffle).mean(1)
        align_mid_down = self.align(self.align_down(down_means).view(b * chosen.shape[1], -1, self.dec_dim),
                                    mid_tokens, picked)
        rec_up, rec_mid, rec_down = up.loss.mean(), mid.loss.mean(), down.loss.mean()
        loss = rec_up + rec_mid + rec_down + s.align_weight * (align_up_mid + align_mid_down)
        return {"loss": loss, "rec_up": rec_up, "rec_mid": rec_mid, "rec_down": rec_down,
                "align_up_mid": align_up_mid, "align_mid_down": align_mid_down}

    @staticmethod
    def octant_means(features: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Raster-order token features ``[B, L, D]`` averaged per octant -> ``[B, 8, D]``."""
        octant = token_octants(grid).to(features.device)
        sums = features.new_zeros(features.shape[0], 8, features.shape[2]).index_add_(1, octant, features)
        return sums / (octant.numel() // 8)

    def align(self, query: torch.Tensor, candidates: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Embeddings ``query [N, k, D]`` vs ``candidates [N, n, D]``; ``target [N, k]`` indexes each query's own
        candidate. byol: 2 - 2 cos with it; ce: cross-entropy over all candidates of the cosine logits."""
        cos = pairwise_cosine(query, candidates)  # [N, k, n] float32
        if self.settings.alignment == "byol":
            return (2 - 2 * cos.gather(2, target[..., None])).mean()
        return F.cross_entropy((cos / self.settings.ce_temperature).flatten(0, 1), target.flatten())

    def figure_input(self, views: dict[str, torch.Tensor]) -> torch.Tensor:
        x = views["region"][:1, 0]
        return F.interpolate(x.float(), size=[n // 2 for n in x.shape[2:]], mode="trilinear", align_corners=False)

    def figure_mask_ratio(self) -> float:
        return self.settings.mask_ratio_mid
