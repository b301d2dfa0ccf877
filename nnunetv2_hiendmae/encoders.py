"""Building an encoder from its configuration: the ViT (:mod:`nnunetv2_hiendmae.vit`), Primus
(:mod:`nnunetv2_hiendmae.primus`) or a ResEnc read from nnssl (:mod:`nnunetv2_hiendmae.resenc`), whichever the
configuration's ``kind`` names (:data:`~nnunetv2_hiendmae.presets.ENCODERS`).

The ViT and Primus have the same interface (``forward``/``forward_patches`` with ``keep``/``replace``, ``grid``,
``taps``, ``pooled``, ``num_prefix_tokens``, ``pos_embed_for``, ``no_weight_decay``, ``group_matcher``), so the
methods, the probe and the embeddings use either without asking which. The ResEnc has the part the probe and the
embeddings use (``forward(x)``, ``grid``, ``pooled``, ``token_size``, ``embed_dim``, ``in_channels``).
"""
from __future__ import annotations

import importlib

from torch import nn

from nnunetv2_hiendmae.presets import ENCODERS, encoder_kind

Encoder = nn.Module  # a ViTEncoder3D, a PrimusEncoder or a ResEncFeatures


def encoder_class(config: dict) -> type:
    """The class of the encoder a configuration describes."""
    module, cls = ENCODERS[encoder_kind(config)]["cls"].split(":")
    return getattr(importlib.import_module(module), cls)


def build_encoder(config: dict, **overrides) -> Encoder:
    """Build an encoder from :func:`~nnunetv2_hiendmae.presets.encoder_config` output (``arch`` is informational,
    ``kind`` chooses the class)."""
    kwargs = {k: v for k, v in config.items() if k not in ("arch", "kind")}
    kwargs.update(overrides)
    return encoder_class(config)(**kwargs)
