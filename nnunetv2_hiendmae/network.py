"""UNETR fine-tuning network around the shared Hi-End-MAE encoder, built the way nnU-Net builds its networks.

Why this file exists: the reference fine-tunes a local copy of MONAI UNETR that hard-codes a 96^3 input and token 12
(FengheTan9/Hi-End-MAE ``downstream/models/UNETR/unetr.py``) and renames the encoder's parameters. Here the encoder
*is* the pretraining :class:`~nnunetv2_hiendmae.vit.ViTEncoder3D` (state-dict keys ``encoder.*``, exactly as in our
checkpoints), the decoder is MONAI's UNETR blocks (feature_size 16, instance norm, residual blocks), and any patch
that is a multiple of the token size on every axis works, so nnU-Net's plans patch size can be used directly.

Decoder scales: the token grid G is upsampled three times by 2 (G*2, G*4, G*8); the last stage goes from G*8 to the
input size, i.e. by token/8 per axis. For token 16 that is the standard UNETR ×2 transposed conv; for any token that
is a multiple of 8 it is a transposed conv with kernel = stride = token/8; otherwise (token 12: ×1.5, the released
model) it resizes trilinearly to the stem's exact size and convolves, as the reference's ``Upsample(size=96^3)``.

nnU-Net contract (its ``get_network_from_plans`` and trainer): constructor ``(input_channels, num_classes, ...,
deep_supervision)``, one logits tensor out, a state dict independent of ``deep_supervision``, no ``initialize``
method, and the segmentation head under nnU-Net's name (``.seg_layers.``), which ``-pretrained_weights`` leaves out,
so a fine-tuned network seeds a dataset with another class count.

Memory: the two full-resolution blocks (the stem ``encoder1`` and the last decoder stage) keep most of the activations
for the backward (63% at 96^3, ViT-B/16) for a third of the FLOPs. ``recompute_full_resolution`` recomputes them in
the backward instead (activation checkpointing: the same gradients, bit for bit).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from monai.networks.blocks.dynunet_block import UnetResBlock, get_conv_layer
from torch import nn
from torch.utils.checkpoint import checkpoint

from nnunetv2_hiendmae.encoders import build_encoder
from nnunetv2_hiendmae.presets import token_size_3d
from nnunetv2_hiendmae.vit import tokens_to_volume

NORM = "instance"


class ResizeUpBlock(nn.Module):
    """UNETR up-block for a fractional scale: resize to the skip's size, 3x3x3 conv, concat, residual block."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = get_conv_layer(3, in_channels, out_channels, kernel_size=3, stride=1, conv_only=True)
        self.conv_block = UnetResBlock(3, 2 * out_channels, out_channels, kernel_size=3, stride=1, norm_name=NORM)

    def forward(self, inp: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        out = F.interpolate(inp, size=skip.shape[2:], mode="trilinear", align_corners=False)  # [B, C, *skip]
        return self.conv_block(torch.cat((self.conv(out), skip), dim=1))


def last_up_block(in_channels: int, out_channels: int, token_size: Sequence[int]) -> nn.Module:
    """The stage from the G*8 grid to full resolution: exact transposed conv when token/8 is whole, else resize."""
    if any(t < 8 for t in token_size):
        raise ValueError(f"UNETR needs a token size of at least 8 per axis (three x2 decoder steps), got {token_size}")
    if all(t % 8 == 0 for t in token_size):
        return UnetrUpBlock(3, in_channels, out_channels, kernel_size=3,
                            upsample_kernel_size=tuple(t // 8 for t in token_size), norm_name=NORM, res_block=True)
    return ResizeUpBlock(in_channels, out_channels)


def pr_up_block(embed_dim: int, out_channels: int, num_layer: int) -> UnetrPrUpBlock:
    """Skip from a token grid G to G * 2^(num_layer+1) (MONAI UNETR's encoder2/3/4)."""
    return UnetrPrUpBlock(3, embed_dim, out_channels, num_layer=num_layer, kernel_size=3, stride=1,
                          upsample_kernel_size=2, norm_name=NORM, conv_block=True, res_block=True)


def up_block(in_channels: int, out_channels: int) -> UnetrUpBlock:
    """x2 transposed conv, concat with the skip, residual block (MONAI UNETR's decoder5/4/3)."""
    return UnetrUpBlock(3, in_channels, out_channels, kernel_size=3, upsample_kernel_size=2, norm_name=NORM,
                        res_block=True)


class SegmentationHead(nn.Module):
    """1x1x1 convolution to the class logits, named as nnU-Net's networks name theirs (``seg_layers``)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.seg_layers = nn.ModuleList([nn.Conv3d(in_channels, num_classes, kernel_size=1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seg_layers[0](x)


HEAD_OF_0_1 = {"out.conv.conv.weight": "out.seg_layers.0.weight", "out.conv.conv.bias": "out.seg_layers.0.bias"}


def _head_of_0_1(state_dict: dict, prefix: str, *args) -> None:
    """Read weights saved by 0.1, whose head was MONAI's ``UnetOutBlock`` (``out.conv.conv.*``), for ``--c``, ``--val``
    and ``nnUNetv2_predict`` (which load state dicts directly)."""
    for old, new in HEAD_OF_0_1.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


def network_encoder_config(encoder: dict, input_channels: int, patch_size: Sequence[int]) -> dict:
    """The encoder :class:`HiEndUNETR` builds from the plans' ``encoder`` dict: its ``in_channels`` replaced by the
    network's, and a learned positional embedding's grid by the patch's token grid."""
    config = {**encoder, "in_channels": input_channels}
    if encoder.get("pos_embed") == "learned":
        token = token_size_3d(encoder["token_size"])
        config["pos_embed_grid"] = [s // t for s, t in zip(patch_size, token)]
    return config


class HiEndUNETR(nn.Module):
    """UNETR with the shared ViT encoder: skips from the encoder taps, bottleneck from the final normed tokens.

    ``encoder`` is an :func:`~nnunetv2_hiendmae.presets.encoder_config` dict without ``in_channels`` (as the plans
    store it): the channel count is nnU-Net's ``input_channels`` (an ``in_channels`` in plans of 0.1 is replaced by
    it). For a learned positional embedding, its grid is set to the patch's token grid (the checkpoint's
    embedding is interpolated onto it when the weights are loaded). ``deep_supervision`` is accepted because nnU-Net
    always passes it; the network has one output scale, so it is stored and ignored. ``recompute_full_resolution``:
    see the module docstring (a trainer variant sets it; it changes no parameter).
    """

    def __init__(self, input_channels: int, num_classes: int, patch_size: Sequence[int], encoder: dict,
                 feature_size: int = 16, deep_supervision: bool = False, recompute_full_resolution: bool = False):
        super().__init__()
        self.deep_supervision = deep_supervision
        self.recompute_full_resolution = recompute_full_resolution
        self.patch_size = tuple(patch_size)
        self.encoder_config = network_encoder_config(encoder, input_channels, self.patch_size)
        self.encoder = build_encoder(self.encoder_config)
        self.encoder.grid(self.patch_size)  # raises unless the patch is a multiple of the token size
        e, f = self.encoder.embed_dim, feature_size
        self.encoder1 = UnetrBasicBlock(3, input_channels, f, kernel_size=3, stride=1, norm_name=NORM, res_block=True)
        self.encoder2 = pr_up_block(e, 2 * f, num_layer=2)
        self.encoder3 = pr_up_block(e, 4 * f, num_layer=1)
        self.encoder4 = pr_up_block(e, 8 * f, num_layer=0)
        self.decoder5 = up_block(e, 8 * f)
        self.decoder4 = up_block(8 * f, 4 * f)
        self.decoder3 = up_block(4 * f, 2 * f)
        self.decoder2 = last_up_block(2 * f, f, self.encoder.token_size)
        self.out = SegmentationHead(f, num_classes)
        self._register_load_state_dict_pre_hook(_head_of_0_1)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Encoder layers as the encoder declares them; the UNETR decoder shares the last layer's lr."""
        return self.encoder.group_matcher(coarse, prefix=r"encoder\.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.encoder.grid(x.shape[2:])  # G = input / token
        normed, hidden = self.encoder(x)  # [B, 1+N, E], depth x [B, 1+N, E]
        t2, t3, t4 = (tokens_to_volume(hidden[t], grid) for t in self.encoder.taps)  # [B, E, *G]
        enc1 = self._full_resolution(self.encoder1, x)  # [B, f, *input]
        enc2 = self.encoder2(t2)  # [B, 2f, *G*8]
        enc3 = self.encoder3(t3)  # [B, 4f, *G*4]
        enc4 = self.encoder4(t4)  # [B, 8f, *G*2]
        dec = self.decoder5(tokens_to_volume(normed, grid), enc4)  # [B, 8f, *G*2]
        dec = self.decoder4(dec, enc3)  # [B, 4f, *G*4]
        dec = self.decoder3(dec, enc2)  # [B, 2f, *G*8]
        dec = self._full_resolution(self.decoder2, dec, enc1)  # [B, f, *input]
        return self.out(dec)  # [B, num_classes, *input]

    def _full_resolution(self, block: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        if self.recompute_full_resolution and torch.is_grad_enabled():
            return checkpoint(block, *inputs, use_reentrant=False)
        return block(*inputs)
