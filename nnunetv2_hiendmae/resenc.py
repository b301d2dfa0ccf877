"""A residual CNN encoder (ResEnc-L, Isensee et al. 2024, "nnU-Net Revisited"; pretrained by nnssl, Wald et al. 2025,
"Revisiting MAE pre-training for 3D medical image segmentation") read as the probe and the embeddings read a ViT.

The encoder is dynamic-network-architectures' ``ResidualEncoder``, the ``encoder`` of its ``ResidualEncoderUNet``, so
its state dict (``stem.*``, ``stages.*``) is the ``encoder.*`` part of nnssl's ``network_weights`` unchanged. Where a
ViT gives tokens, :class:`ResEncFeatures` gives **one stage's feature map**, its voxels laid out as tokens ``[B, N, C]``
in raster order: a token is one voxel of that map, its size the stage's total stride, its width the stage's channels.
The stage is the one whose total stride is closest to 16 voxels (:func:`feature_stage`), the token size of the ViTs
this package pretrains: stage 4 of ResEnc-L (stride 16, 320 channels), not its bottleneck (stride 32), whose
5^3 map of a 160^3 patch is too coarse for a segmentation probe.

A CNN has no CLS token: :meth:`ResEncFeatures.pooled` is the mean of the feature map (global average pooling), as for
Primus.
"""
from __future__ import annotations

import math
import pydoc
from collections.abc import Sequence

import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder

from nnunetv2_hiendmae.presets import Grid
from nnunetv2_hiendmae.vit import grid_of

FEATURE_STRIDE = 16  # the ViT's token size that the feature map is matched to
# the constructor arguments that name a class, and where such a class may come from (nothing else is imported)
CLASS_KWARGS = ("conv_op", "norm_op", "dropout_op", "nonlin", "block")
CLASS_MODULES = ("torch.nn.", "dynamic_network_architectures.")
# nnssl's ResEnc-L (src/nnssl/architectures/architecture_registry.py, get_res_enc_l) as ResidualEncoder's arguments,
# classes named as nnssl's DynamicArchitecturePlans.serialize() names them
RESENC_L = {
    "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
    "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 6,
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
    "n_blocks_per_stage": [1, 3, 4, 6, 6, 6], "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None,
    "nonlin": "torch.nn.modules.activation.LeakyReLU", "nonlin_kwargs": {"inplace": True},
}

# the CNNs ``random:NAME`` builds at their initial weights for the probe's floor (nnunetv2_hiendmae.probe)
RANDOM_CNNS = {"resenc_l": RESENC_L}


def resolve_classes(kwargs: dict) -> dict:
    """``kwargs`` with every class named by a string (:data:`CLASS_KWARGS`) replaced by the class. Only torch.nn and
    dynamic-network-architectures modules are looked up; ValueError for any other name or one that is not a
    ``torch.nn.Module`` class."""
    out = dict(kwargs)
    for key in CLASS_KWARGS:
        name = out.get(key)
        if not isinstance(name, str):
            continue
        cls = pydoc.locate(name) if name.startswith(CLASS_MODULES) else None
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            raise ValueError(f"{key} {name!r} is not a torch.nn or dynamic-network-architectures module class")
        out[key] = cls
    return out


def total_strides(strides: int | Sequence, n_stages: int) -> list[Grid]:
    """The total stride (voxels per feature-map voxel, per axis) after each of ``n_stages`` stages, from
    ``ResidualEncoder``'s ``strides`` argument (one int, or an int or 3 ints per stage)."""
    per_stage = [strides] * n_stages if isinstance(strides, int) else list(strides)
    total, out = (1, 1, 1), []
    for s in per_stage:
        s = (int(s),) * 3 if isinstance(s, int) else tuple(int(a) for a in s)
        total = tuple(t * a for t, a in zip(total, s))
        out.append(total)
    return out


def feature_stage(strides: int | Sequence, n_stages: int) -> int:
    """The stage whose total stride (geometric mean over the axes) is closest to :data:`FEATURE_STRIDE` on a log
    scale; of two as close, the deeper."""
    totals = total_strides(strides, n_stages)
    return min(range(n_stages),
               key=lambda i: (abs(math.log2(math.prod(totals[i])) / 3 - math.log2(FEATURE_STRIDE)), -i))


def resenc_config(arch: str, encoder_kwargs: dict, in_channels: int) -> dict:
    """The encoder configuration (kind ``resenc``, for :func:`~nnunetv2_hiendmae.encoders.build_encoder`) of a
    ``ResidualEncoder`` with ``encoder_kwargs`` on ``in_channels`` channels, read at :func:`feature_stage`."""
    return {"arch": arch, "kind": "resenc", "in_channels": in_channels, "encoder_kwargs": encoder_kwargs,
            "feature_stage": feature_stage(encoder_kwargs["strides"], int(encoder_kwargs["n_stages"]))}


def initialize(encoder: torch.nn.Module) -> torch.nn.Module:
    """``encoder`` at the initial weights nnU-Net gives a new ResEnc U-Net (``ResidualEncoderUNet.initialize``, applied
    by nnU-Net's ``get_network_from_plans``: He normal with a negative slope of 1e-2, zero biases, the last norm of
    every residual block at zero); from the global random state. Returns ``encoder``."""
    return encoder.apply(ResidualEncoderUNet.initialize)


class ResEncFeatures(ResidualEncoder):
    """dynamic-network-architectures' ``ResidualEncoder`` (``encoder_kwargs``: its arguments but ``input_channels``,
    classes as strings or classes) whose ``forward`` returns stage ``feature_stage``'s feature map as tokens.

    ``forward(x [B, C, *S])`` returns ``(tokens [B, N, E], maps)``: ``N = prod(S / token_size)`` voxels of the map in
    raster order, ``E = embed_dim`` its channels, and ``maps`` the feature maps ``[B, C_i, *S_i]`` of the stages up to
    it. ``S`` must be a multiple of ``token_size`` (the stage's total stride) on every axis (ValueError otherwise).
    Stages deeper than ``feature_stage`` are built (their weights load with the others) but not run.
    """

    num_prefix_tokens = 0

    def __init__(self, in_channels: int, encoder_kwargs: dict, feature_stage: int):
        super().__init__(in_channels, **resolve_classes(encoder_kwargs), return_skips=False)
        if not 0 <= feature_stage < len(self.stages):
            raise ValueError(f"feature_stage {feature_stage} of an encoder with {len(self.stages)} stages")
        self.in_channels, self.feature_stage = in_channels, feature_stage
        self.token_size: Grid = total_strides(self.strides, len(self.stages))[feature_stage]
        self.embed_dim = int(self.output_channels[feature_stage])

    def grid(self, spatial_shape: Sequence[int]) -> Grid:
        """The feature map's size for an input of ``spatial_shape`` voxels (ValueError if not whole strides)."""
        return grid_of(spatial_shape, self.token_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        grid = self.grid(x.shape[2:])
        x, maps = self.stem(x), []
        for stage in self.stages[:self.feature_stage + 1]:
            x = stage(x)
            maps.append(x)
        if tuple(x.shape[2:]) != grid:  # a kernel or stride that does not halve exactly
            raise ValueError(f"stage {self.feature_stage} gives a {tuple(x.shape[2:])} map, not {grid}")
        return x.flatten(2).transpose(1, 2), maps

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, E]`` -> ``[B, E]``: the mean of the feature map (global average pooling), what stands in for a
        ViT's CLS token."""
        return tokens.mean(dim=1)
