"""dynamic-network-architectures' ``Primus`` (Wald et al. 2025) as our trainers fine-tune it.

:class:`PrimusNetwork` *is* dna's ``Primus``: a subclass that adds no parameter, so its state dict is ``Primus``'s key
for key and nnU-Net's own Primus code reads its weights. It is built from the plans the way
:class:`~nnunetv2_hiendmae.network.HiEndUNETR` is, ``(input_channels, num_classes, patch_size, encoder)`` with the
encoder configuration of a ``primus_*`` checkpoint, and adds what our trainers and the weight loader ask of a network:
``encoder`` (the stem and EVA blocks under :class:`~nnunetv2_hiendmae.primus.PrimusEncoder`'s names),
``encoder_config``, ``no_weight_decay`` and ``group_matcher``.

The decoder is Primus's own (transposed convolutions from the 8^3 token grid back to the voxels, ``up_projection``);
its last convolution is the segmentation head.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from dynamic_network_architectures.architectures.primus import Primus
from torch import nn

from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.network import network_encoder_config
from nnunetv2_hiendmae.presets import token_size_3d
from nnunetv2_hiendmae.primus import primus_group_matcher


class PrimusNetwork(Primus):
    """``Primus`` for a patch (its ``input_shape``) and the encoder of a ``primus_*`` configuration.

    ``deep_supervision`` is accepted because nnU-Net passes it (one output scale: stored, ignored);
    ``recompute_full_resolution`` (our ``_recompute`` trainers) has no full-resolution block to act on here, so it is
    refused.
    """

    def __init__(self, input_channels: int, num_classes: int, patch_size: Sequence[int], encoder: dict,
                 deep_supervision: bool = False, recompute_full_resolution: bool = False):
        if recompute_full_resolution:
            raise UserError("Primus has no full-resolution blocks to recompute: train it with a trainer without "
                            "_recompute")
        self.patch_size = tuple(int(p) for p in patch_size)
        config = network_encoder_config(encoder, input_channels, self.patch_size)
        super().__init__(input_channels, config["embed_dim"], token_size_3d(config["token_size"]), num_classes,
                         eva_depth=config["depth"], eva_numheads=config["num_heads"],
                         input_shape=self.patch_size, mlp_ratio=config["mlp_ratio"],
                         drop_path_rate=config["drop_path_rate"], init_values=config["init_values"],
                         scale_attn_inner=True)
        self.encoder_config = config
        self.deep_supervision = deep_supervision

    @property
    def encoder(self) -> nn.ModuleDict:
        """The stem and the EVA encoder (the modules themselves, not copies) under
        :class:`~nnunetv2_hiendmae.primus.PrimusEncoder`'s names;
        not registered, so the state dict stays ``Primus``'s."""
        return nn.ModuleDict({"down_projection": self.down_projection, "eva": self.eva})

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"eva.pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Encoder layers as the Primus encoder declares them; the decoder shares the last layer's lr."""
        return primus_group_matcher()
