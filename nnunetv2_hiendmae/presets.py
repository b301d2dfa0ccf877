"""Encoder presets and other plain data shared by the commands (no torch import, so ``--help`` stays instant)."""
from __future__ import annotations

from collections.abc import Sequence

# Presets are data: every encoder is built from one of these plus in_channels / pos-embed options.
PRESETS: dict[str, dict] = {
    "vit_tiny": dict(embed_dim=96, depth=4, num_heads=4, token_size=16),  # CPU tests and the demo
    "vit_b16": dict(embed_dim=768, depth=12, num_heads=12, token_size=16),
    "vit_l16": dict(embed_dim=1536, depth=12, num_heads=16, token_size=16),
    "vit_l12": dict(embed_dim=1536, depth=12, num_heads=16, token_size=12),  # the released Hi-End-MAE model
}

REFERENCE_PATCH = 96  # the reference pretrains (and its UNETR fine-tunes) on 96^3 crops only

# The linear probe's defaults (nnunetv2_hiendmae.probe): its seed is the pretraining's default --seed, so that
# random:ARCH is the initial encoder of a run with default settings.
PROBE_SEED = 41
PROBE_CROPS_PER_CASE = 4
PROBE_MAX_CASES = 16

PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # auto: bf16/fp16 on CUDA, fp32 elsewhere (nnunetv2_hiendmae.precision)

CHECKPOINT_FORMAT = "nnunetv2_hiendmae.pretrain/1"  # the "format" entry of every pretraining checkpoint

# The fine-tuning network, as nnU-Net's plans name it (pydoc.locate resolves it; a test checks that it does).
NETWORK_CLASS = "nnunetv2_hiendmae.network.HiEndUNETR"

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


def encoder_config(arch: str, in_channels: int = 1, pos_embed: str = "sincos",
                   pos_embed_grid: Sequence[int] | None = None) -> dict:
    """Every constructor argument of an encoder built from a preset: stored in checkpoints and plans."""
    if arch not in PRESETS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(PRESETS)}")
    cfg = dict(PRESETS[arch], in_channels=in_channels, mlp_ratio=4.0, pos_embed=pos_embed,
               pos_embed_grid=list(pos_embed_grid) if pos_embed_grid is not None else None)
    return {"arch": arch, **cfg}
