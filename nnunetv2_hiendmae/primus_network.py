"""dynamic-network-architectures' ``Primus`` (Wald et al. 2025) as our trainers fine-tune it.

:class:`PrimusNetwork` computes what dna's ``Primus`` computes, with dna's modules and initialisation. It is built from
the plans the way :class:`~nnunetv2_hiendmae.network.HiEndUNETR` is, ``(input_channels, num_classes, patch_size,
encoder)`` with the encoder configuration of a ``primus_*`` checkpoint, and adds what our trainers and the weight
loader ask of a network: ``encoder`` (the stem and EVA blocks under :class:`~nnunetv2_hiendmae.primus.PrimusEncoder`'s
names), ``encoder_config``, ``no_weight_decay`` and ``group_matcher``.

The decoder (``PatchDecode``: transposed convolutions from the 8^3 token grid back to the voxels) is the
segmentation head as a whole: its widths are derived from the class count
(``dim_red = (embed_dim / (2 * num_classes)) ** (1 / stages)``), so another class count changes every layer of it.
It is therefore registered under nnU-Net's head name, ``up_projection.seg_layers.*`` where dna's ``Primus`` has
``up_projection.*``, and nnU-Net's ``-pretrained_weights`` (``nnunetv2/run/load_pretrained_weights.py``, which leaves
out every key containing ``.seg_layers.``) seeds a network for any class count with the stem and EVA encoder of a
fine-tuned one. That rename is the only difference between the two state dicts: weights in dna's layout (nnU-Net
master, nnssl, our fine-tuned folds written before the rename) load as they are, and :func:`dna_primus_state_dict`
gives ours in dna's.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from dynamic_network_architectures.architectures.primus import Primus
from torch import nn

from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.network import network_encoder_config
from nnunetv2_hiendmae.presets import token_size_3d
from nnunetv2_hiendmae.primus import primus_group_matcher

DNA_DECODER, DECODER = "up_projection.", "up_projection.seg_layers."  # the decoder's key prefix: dna's Primus, ours


def dna_primus_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A :class:`PrimusNetwork` state dict (of a fine-tuned fold: ``checkpoint_final.pth``'s ``network_weights``) in
    dna ``Primus``'s layout, which ``Primus.load_state_dict`` reads strictly: ``up_projection.seg_layers.*`` renamed
    ``up_projection.*``, every other key and every tensor unchanged."""
    return {DNA_DECODER + k.removeprefix(DECODER) if k.startswith(DECODER) else k: v for k, v in state_dict.items()}


def _read_dna_layout(state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: a decoder saved in dna ``Primus``'s layout (``up_projection.decode.*``) is read as
    ours, for ``--c``, ``--val`` and ``nnUNetv2_predict`` (which load state dicts directly)."""
    old, new = prefix + DNA_DECODER, prefix + DECODER
    for key in [k for k in state_dict if k.startswith(old) and not k.startswith(new)]:
        if new + key.removeprefix(old) not in state_dict:
            state_dict[new + key.removeprefix(old)] = state_dict.pop(key)


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
        # the same PatchDecode (same weights, same forward), under nnU-Net's head name: see the module docstring
        self.up_projection = nn.Sequential(OrderedDict(seg_layers=self.up_projection))
        self._register_load_state_dict_pre_hook(_read_dna_layout)  # the public hook needs torch 2.5

    @property
    def encoder(self) -> nn.ModuleDict:
        """The stem and the EVA encoder (the modules themselves, not copies) under
        :class:`~nnunetv2_hiendmae.primus.PrimusEncoder`'s names;
        not registered again, so their keys stay ``Primus``'s (``down_projection.*``, ``eva.*``)."""
        return nn.ModuleDict({"down_projection": self.down_projection, "eva": self.eva})

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"eva.pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Encoder layers as the Primus encoder declares them; the decoder shares the last layer's lr."""
        return primus_group_matcher()
