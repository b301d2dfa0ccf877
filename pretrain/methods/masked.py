"""The masked-autoencoder steps every method here is built from (MAE, He et al. CVPR 2022; the Hi-End-MAE reference
code ``hi_end_mae.py``), on the shared 3D ViT encoder. A method subclasses :class:`MaskedAutoencoder`, gives it a
decoder (``build_decoder``, optionally ``embed_for_decoder`` and ``decode``) and writes its ``forward``.

``mask``: a per-sample random permutation of the tokens; the first ``n_visible`` are kept.
``encode``: only the visible tokens are embedded and pass the encoder (:meth:`ViTEncoder3D.forward_patches`).
``decode``: the encoder output is projected to the decoder width, one shared mask token is appended per masked
position, every token gets the decoder's sin-cos position embedding *of its own grid position*, and the decoder runs
over all tokens. The sequence stays in the shuffled order (visible, then masked): attention is permutation
equivariant, so this equals MAE's un-shuffle (``ids_restore``) without the gathers.
``loss``: MSE between the predictions of the masked tokens and their voxels, normalised per patch (MAE's
``norm_pix_loss``; biased variance with eps 1e-6 inside the root, as Hi-End-MAE), per sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_hiendmae.encoders import build_encoder
from nnunetv2_hiendmae.presets import Grid
from nnunetv2_hiendmae.vit import patchify, sincos_pos_embed_3d, take_tokens, unpatchify

norm_layer = partial(nn.LayerNorm, eps=1e-6)


@dataclass
class Masked:
    """One masked-autoencoding pass over a batch of ``N`` volumes."""

    loss: torch.Tensor  # [N] reconstruction loss per volume
    pred: torch.Tensor  # [N, n_masked, p³C] predicted (normalised) voxels of the masked tokens
    shuffle: torch.Tensor  # [N, L] token permutation; the first L - n_masked are the visible tokens
    features: torch.Tensor  # [N, P+L, D] decoder features after its final norm, the encoder's P prefix tokens (the
    # ViT's CLS; none for Primus) first, then the tokens in shuffled order
    pooled: torch.Tensor  # [N, E] the encoder's summary of the view: its normed CLS token, for Primus the mean token


def per_patch_mse(pred: torch.Tensor, patches: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """``[N]``: MSE between ``pred [N, M, P]`` and the per-patch normalised voxels of the ``masked [N, M]`` tokens."""
    target = take_tokens(patches, masked).detach().float()
    target = F.layer_norm(target, target.shape[-1:], eps=1e-6)
    return (pred.float() - target).pow(2).mean(dim=(1, 2))


def pairwise_cosine(query: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``[N, k, n]``: cosine of every ``query [N, k, D]`` with every ``candidates [N, n, D]`` of the same sample, in
    float32 with autocast off: under bf16 autocast the matmul would round the cosines to 3 digits, and losses of the
    form ``2 - 2 cos`` near their minimum lose most of their value and gradient."""
    with torch.autocast(query.device.type, enabled=False):
        q, c = F.normalize(query.float(), dim=-1), F.normalize(candidates.float(), dim=-1)
        return torch.einsum("nkd,ncd->nkc", q, c)


def token_features(features: torch.Tensor, shuffle: torch.Tensor) -> torch.Tensor:
    """Decoder features ``[N, P+L, D]`` -> ``[N, L, D]``: the tokens' (shuffled order), prefix tokens dropped."""
    return features[:, features.shape[1] - shuffle.shape[1]:]


def in_raster_order(features: torch.Tensor, shuffle: torch.Tensor) -> torch.Tensor:
    """Decoder features ``[N, P+L, D]`` in shuffled order -> ``[N, L, D]`` in raster token order (prefix dropped)."""
    return take_tokens(token_features(features, shuffle), shuffle.argsort(dim=1))


class MaskedAutoencoder(nn.Module):
    """Shared encoder + ``mask_token`` + a decoder (``build_decoder``) with a ``head`` to the voxels of one token.

    Subclasses set :attr:`decoder_presets` (decoder dimensions per encoder preset), build ``self.decoder`` and write
    ``forward`` and ``figure_input`` (see :class:`~pretrain.methods.contract.PretrainingModel`)."""

    decoder_presets: dict[str, dict] = {}
    # AdamW decays the CLS and mask tokens: the reference's groups (timm's add_weight_decay, no skip list) exempt only
    # biases and 1-D parameters; False exempts them too (Hi-End-MAE's intended groups, timm ViT's convention)
    decay_tokens: bool = False

    def __init__(self, encoder: dict, settings, decoder: dict | None = None):
        super().__init__()
        self.settings = settings
        self.encoder = build_encoder(encoder)
        self.token_size, self.channels = self.encoder.token_size, self.encoder.in_channels
        self.decoder_config = dict(decoder or self.decoder_presets[encoder["arch"]])
        self.dec_dim = self.decoder_config["embed_dim"]
        self.out_dim = self.channels * self.token_size[0] * self.token_size[1] * self.token_size[2]
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.dec_dim))
        self.build_decoder()
        nn.init.normal_(self.mask_token, std=0.02)

    def build_decoder(self) -> None:
        """Create ``self.decoder`` (a module with a ``head``) and the projections it needs."""
        raise NotImplementedError

    def embed_for_decoder(self, normed: torch.Tensor) -> torch.Tensor:
        """The encoder's normed output ``[B, P+N, E]`` projected to the decoder width."""
        raise NotImplementedError

    def decode(self, queries: torch.Tensor, hidden: list[torch.Tensor]) -> torch.Tensor:
        """Decoder features ``[B, P+L, D]`` after the decoder's final norm (``hidden``: the encoder's block outputs)."""
        return self.decoder(queries)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = {f"encoder.{name}" for name in self.encoder.no_weight_decay()} | {"mask_token"}
        return names - {"encoder.cls_token", "mask_token"} if self.decay_tokens else names

    # ---- the steps ---------------------------------------------------------------------------------------------
    @staticmethod
    def num_visible(num_tokens: int, mask_ratio: float) -> int:
        return int(num_tokens * (1 - mask_ratio))

    @staticmethod
    def random_shuffle(batch: int, num_tokens: int, device: torch.device) -> torch.Tensor:
        """Per-sample random permutation ``[B, L]`` (the reference's argsort of uniform noise)."""
        return torch.rand(batch, num_tokens, device=device).argsort(dim=1)

    def decoder_queries(self, normed: torch.Tensor, shuffle: torch.Tensor, grid: Grid) -> torch.Tensor:
        """``[B, P+L, D]``: the projected prefix (the ViT's CLS; Primus has none) and visible tokens, then mask
        tokens; decoder sin-cos position added to every token but the prefix, taken in shuffled order (each token gets
        its own position)."""
        p = self.encoder.num_prefix_tokens
        b, n_masked = normed.shape[0], shuffle.shape[1] - (normed.shape[1] - p)
        query = torch.cat([self.embed_for_decoder(normed), self.mask_token.expand(b, n_masked, -1)], dim=1)
        pos = take_tokens(sincos_pos_embed_3d(grid, self.dec_dim, device=normed.device).to(query.dtype), shuffle)
        return torch.cat([query[:, :p], query[:, p:] + pos], dim=1)

    def masked_autoencode(self, x: torch.Tensor, shuffle: torch.Tensor, n_visible: int) -> Masked:
        """Encode the first ``n_visible`` tokens of ``shuffle`` of the volumes ``x [N, C, *S]``, decode all, and
        score the predictions of the others."""
        grid = self.encoder.grid(x.shape[2:])
        patches = patchify(x, self.token_size)  # [N, L, p³C]
        normed, hidden = self.encoder.forward_patches(patches, grid, shuffle[:, :n_visible])
        features = self.decode(self.decoder_queries(normed, shuffle, grid), hidden)
        n_masked = shuffle.shape[1] - n_visible
        pred = self.decoder.head(features[:, -n_masked:])  # the head only where the loss reads
        return Masked(per_patch_mse(pred, patches, shuffle[:, n_visible:]), pred, shuffle, features,
                      self.encoder.pooled(normed))

    def autoencode(self, x: torch.Tensor, mask_ratio: float) -> Masked:
        """:meth:`masked_autoencode` with a fresh random mask of ``mask_ratio`` per volume."""
        grid = self.encoder.grid(x.shape[2:])
        num_tokens = grid[0] * grid[1] * grid[2]
        shuffle = self.random_shuffle(x.shape[0], num_tokens, x.device)
        return self.masked_autoencode(x, shuffle, self.num_visible(num_tokens, mask_ratio))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(masked input, reconstruction)`` ``[B, C, *S]`` for a figure: visible patches kept, masked ones predicted
        and de-normalised with the true patch statistics (the target's own mean/variance, so it inverts exactly)."""
        out = self.autoencode(x, self.figure_mask_ratio())
        grid = self.encoder.grid(x.shape[2:])
        patches = patchify(x, self.token_size).float()
        masked = out.shuffle[:, out.shuffle.shape[1] - out.pred.shape[1]:]
        true = take_tokens(patches, masked)
        mean, var = true.mean(-1, keepdim=True), true.var(-1, unbiased=False, keepdim=True)
        idx = masked[..., None].expand(-1, -1, patches.shape[-1])
        masked_in, recon = patches.clone(), patches.clone()
        masked_in.scatter_(1, idx, torch.zeros_like(true))
        recon.scatter_(1, idx, out.pred.float() * (var + 1e-6).sqrt() + mean)
        return (unpatchify(masked_in, self.token_size, grid, self.channels),
                unpatchify(recon, self.token_size, grid, self.channels))

    def figure_mask_ratio(self) -> float:
        return self.settings.mask_ratio

    def step_done(self, progress: float) -> None:
        """Called after every optimiser step with the fraction of the run done (for momentum teachers)."""
