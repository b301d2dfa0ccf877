"""Encoder presets and other plain data shared by the commands (no torch import, so ``--help`` stays instant)."""
from __future__ import annotations

from collections.abc import Sequence

# Presets are data: every encoder is built from one of these plus in_channels / pos-embed options. ``kind`` names the
# encoder class (ENCODERS); a preset without it, and every checkpoint written before Primus existed, is a ViT.
PRESETS: dict[str, dict] = {
    "vit_tiny": dict(embed_dim=96, depth=4, num_heads=4, token_size=16),  # CPU tests and the demo
    "vit_b16": dict(embed_dim=768, depth=12, num_heads=12, token_size=16),
    "vit_l16": dict(embed_dim=1536, depth=12, num_heads=16, token_size=16),
    "vit_l12": dict(embed_dim=1536, depth=12, num_heads=16, token_size=12),  # the released Hi-End-MAE model
    # Primus (Wald et al. 2025): dynamic-network-architectures' _PRIMUS_CONFIGS S/B/M/L, 8^3 tokens
    "primus_tiny": dict(kind="primus", embed_dim=48, depth=4, num_heads=4, token_size=8),  # CPU tests
    "primus_s": dict(kind="primus", embed_dim=396, depth=12, num_heads=6, token_size=8),
    "primus_b": dict(kind="primus", embed_dim=792, depth=12, num_heads=12, token_size=8),
    "primus_m": dict(kind="primus", embed_dim=864, depth=16, num_heads=12, token_size=8),
    "primus_l": dict(kind="primus", embed_dim=1056, depth=24, num_heads=16, token_size=8),
}

# The fine-tuning network of the ViT, as nnU-Net's plans name it (pydoc.locate resolves it; a test checks that it does).
NETWORK_CLASS = "nnunetv2_hiendmae.network.HiEndUNETR"

# Each encoder kind: its class (``module:Class``), the constructor arguments its presets share, its default position
# embedding, and its fine-tuning network with the plans' arguments besides the encoder.
ENCODERS: dict[str, dict] = {
    "vit": dict(cls="nnunetv2_hiendmae.vit:ViTEncoder3D", defaults=dict(mlp_ratio=4.0), pos_embed="sincos",
                network=NETWORK_CLASS, network_kwargs=dict(feature_size=16)),
    # LayerScale 0.1 and drop-path 0.2: nnssl's Primus MAE (BaseEvaMAETrainer.py) and dna's PrimusV3 defaults
    "primus": dict(cls="nnunetv2_hiendmae.primus:PrimusEncoder",
                   defaults=dict(mlp_ratio=8 / 3, init_values=0.1, drop_path_rate=0.2), pos_embed="learned",
                   network="nnunetv2_hiendmae.primus_network.PrimusNetwork", network_kwargs={}),
    # a residual CNN read from nnssl (ResEnc-L): probed and embedded, never pretrained or fine-tuned here
    "resenc": dict(cls="nnunetv2_hiendmae.resenc:ResEncFeatures", defaults={}, pos_embed=None, network=None,
                   network_kwargs={}),
}
NETWORK_CLASSES = tuple(e["network"] for e in ENCODERS.values() if e["network"])

REFERENCE_PATCH = 96  # the reference pretrains (and its UNETR fine-tunes) on 96^3 crops only

# The linear probe's defaults (nnunetv2_hiendmae.probe): its seed is the pretraining's default --seed, so that
# random:ARCH is the initial encoder of a run with default settings.
PROBE_SEED = 41
PROBE_CROPS_PER_CASE = 4
PROBE_MAX_CASES = 16

PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # auto: bf16/fp16 on CUDA, fp32 elsewhere (nnunetv2_hiendmae.precision)

CHECKPOINT_FORMAT = "nnunetv2_hiendmae.pretrain/1"  # the "format" entry of every pretraining checkpoint

Grid = tuple[int, int, int]


def token_size_3d(token_size: int | Sequence[int]) -> Grid:
    """A token size as stored in presets, checkpoints and plans (one int or three) as a 3-tuple."""
    if isinstance(token_size, int):
        return (token_size,) * 3
    size = tuple(int(t) for t in token_size)
    if len(size) != 3:
        raise ValueError(f"a token size is one integer or three, got {list(token_size)}")
    return size  # type: ignore[return-value]


def ct_window_statistics(low: float, high: float) -> dict:
    """nnU-Net intensity properties under which its ``CTNormalization`` (clip to the 0.5 / 99.5 percentiles, then
    ``(x - mean) / std``) maps HU [low, high] to [0, 1]; (-175, 250) is the released Hi-End-MAE weights' mapping."""
    return {"max": high, "mean": low, "median": (low + high) / 2, "min": low, "percentile_00_5": low,
            "percentile_99_5": high, "std": high - low}


def encoder_kind(config: dict) -> str:
    """``vit``, ``primus`` or ``resenc``: the encoder class of a preset or of an :func:`encoder_config` dict."""
    return config.get("kind", "vit")


def default_pos_embed(arch: str) -> str:
    """The position embedding of a preset unless asked otherwise: sin-cos for the ViT, learned for Primus (the only
    one it has)."""
    return ENCODERS[encoder_kind(PRESETS[arch])]["pos_embed"]


def encoder_config(arch: str, in_channels: int = 1, pos_embed: str | None = None,
                   pos_embed_grid: Sequence[int] | None = None) -> dict:
    """Every constructor argument of an encoder built from a preset: stored in checkpoints and plans.
    ``pos_embed`` None: the preset's default; a learned one needs ``pos_embed_grid`` (the pretraining token grid)."""
    if arch not in PRESETS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(PRESETS)}")
    cfg = dict(ENCODERS[encoder_kind(PRESETS[arch])]["defaults"], **PRESETS[arch], in_channels=in_channels,
               pos_embed=pos_embed or default_pos_embed(arch),
               pos_embed_grid=list(pos_embed_grid) if pos_embed_grid is not None else None)
    return {"arch": arch, **cfg}


def encoder_config_for_patch(arch: str, patch_size: Sequence[int], in_channels: int = 1) -> dict:
    """:func:`encoder_config` with the preset's default position embedding; a learned one (Primus) on the token grid of
    ``patch_size``, as a pretraining run on that patch builds it."""
    token = token_size_3d(PRESETS[arch]["token_size"])
    learned = default_pos_embed(arch) == "learned"
    return encoder_config(arch, in_channels, pos_embed_grid=[p // t for p, t in zip(patch_size, token)] if learned
                          else None)
