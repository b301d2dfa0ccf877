"""Loading a pretraining checkpoint's encoder into :class:`~nnunetv2_hiendmae.network.HiEndUNETR` or, for a Primus
checkpoint, :class:`~nnunetv2_hiendmae.primus_network.PrimusNetwork`.

The load is strict: every encoder tensor must come from the checkpoint, because a silently half-loaded encoder (the
reference fine-tuning's ``strict=False``, never checked, in FengheTan9/Hi-End-MAE ``downstream/factory.py``) trains
fine and just performs worse. Only two adaptations are allowed, and each is reported: a single-channel stem into a
multi-channel network, and a learned positional embedding moved to the fine-tuning patch's token grid.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from nnunetv2_hiendmae.checkpoint import encoder_fingerprint, encoder_state_dict, load_checkpoint
from nnunetv2_hiendmae.encoders import encoder_class
from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.presets import token_size_3d
from nnunetv2_hiendmae.vit import interpolate_pos_embed

ARCH_KEYS = ("kind", "embed_dim", "depth", "num_heads", "token_size", "mlp_ratio", "pos_embed")


@dataclass
class LoadReport:
    """What :func:`load_pretrained_encoder` did: every loaded encoder tensor, and ``"name: how"`` for adapted ones."""

    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)

    def summary(self) -> str:
        adapted = f" ({'; '.join(self.adapted)})" if self.adapted else ""
        return f"pretrained encoder: {len(self.loaded)} tensors loaded, {len(self.adapted)} adapted{adapted}"


def verify_checkpoint(path: str | os.PathLike, expected_encoder: str | None,
                      replan: str = "nnUNetv2_hiendmae_plan") -> dict:
    """Load a checkpoint, refusing one whose encoder differs from the one the plans were written for; ``replan``:
    the command that writes those plans again, which the refusal advises."""
    ckpt = load_checkpoint(path)
    if expected_encoder is not None:
        actual = encoder_fingerprint(ckpt)
        if actual != expected_encoder:
            raise UserError(f"checkpoint {path} changed since the plans were written: its encoder is not the one "
                            f"they were made for (encoder sha256 {actual[:12]}..., the plans expect "
                            f"{expected_encoder[:12]}...): write the plans again with {replan}")
    return ckpt


def _normalised(key: str, value):
    """Config values compared as plain data: token sizes as 3-tuples, numbers as floats where that matters."""
    if key == "token_size":
        return token_size_3d(value)
    if key == "kind":
        return value or "vit"
    if key == "mlp_ratio":
        return float(value)
    return value


def check_architecture(ckpt_config: dict, net_config: dict) -> None:
    """Refuse a checkpoint whose encoder is not the network's (weights would not mean the same thing)."""
    for key in ARCH_KEYS:
        a, b = _normalised(key, ckpt_config.get(key)), _normalised(key, net_config.get(key))
        if a != b:
            raise UserError(f"the checkpoint's encoder does not match the network: {key} is {a} in the checkpoint "
                            f"but {b} in the network")


def adapt_patch_embed(weight: torch.Tensor, in_channels: int) -> tuple[torch.Tensor, str | None]:
    """1 -> C input channels: repeat over channels and divide by C, so the stem's response to C identical copies of
    the pretraining image equals the pretrained response (also nnU-Net master's rule)."""
    c = weight.shape[1]
    if c == in_channels:
        return weight, None
    if c != 1:
        raise UserError(f"cannot adapt {c}-channel checkpoint to {in_channels} input channels")
    how = f"1 -> {in_channels} input channels, repeated and divided by {in_channels}"
    return weight.repeat(1, in_channels, 1, 1, 1) / in_channels, how


def adapt_pos_embed(pos_embed: torch.Tensor, ckpt_config: dict, net_config: dict) -> tuple[torch.Tensor, str | None]:
    """A learned positional embedding pretrained on another token grid, resized trilinearly onto the network's."""
    old, new = tuple(ckpt_config["pos_embed_grid"]), tuple(net_config["pos_embed_grid"])
    if old == new:
        return pos_embed, None
    return interpolate_pos_embed(pos_embed, old, new), f"token grid {old} -> {new}, trilinear interpolation"


def load_pretrained_encoder(network: nn.Module, ckpt: dict) -> LoadReport:
    """Load the checkpoint's encoder into ``network.encoder`` (a :class:`~nnunetv2_hiendmae.network.HiEndUNETR` or a
    :class:`~nnunetv2_hiendmae.primus_network.PrimusNetwork`) strictly, with only the documented adaptations."""
    ckpt_config, net_config = ckpt["encoder"], network.encoder_config
    check_architecture(ckpt_config, net_config)
    source, target = encoder_state_dict(ckpt), network.encoder.state_dict()
    missing, unexpected = sorted(target.keys() - source.keys()), sorted(source.keys() - target.keys())
    if missing or unexpected:
        raise UserError(f"the checkpoint's encoder weights do not match the network: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    report, state, names = LoadReport(), {}, encoder_class(ckpt_config)
    for key, want in target.items():
        value, how = source[key], None
        if key == names.stem_weight_key:
            value, how = adapt_patch_embed(value, want.shape[1])
        elif key == names.pos_embed_key:
            value, how = adapt_pos_embed(value, ckpt_config, net_config)
        if value.shape != want.shape:
            raise UserError(f"the checkpoint's encoder does not match the network: {key} has shape "
                            f"{tuple(value.shape)} in the checkpoint but {tuple(want.shape)} in the network")
        state[key] = value
        report.loaded.append(key)
        if how is not None:
            report.adapted.append(f"{key}: {how}")
    network.encoder.load_state_dict(state, strict=True)
    return report
