"""AdamW parameter groups from what a model declares, for pretraining and fine-tuning alike.

Models follow timm's convention: ``no_weight_decay()`` names the parameters that get no weight decay besides
biases and norms (CLS and mask tokens, position embeddings), and ``group_matcher()`` assigns layer ids for layer-wise
learning-rate decay. timm's ``param_groups_weight_decay`` / ``param_groups_layer_decay`` build the groups; every group
carries ``lr_scale``, which the learning-rate schedulers multiply in.
"""
from __future__ import annotations

from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups with ``weight_decay`` and ``lr_scale``; largest ``lr_scale`` first (so ``param_groups[0]['lr']``,
    which nnU-Net logs, is the base learning rate). ``layer_decay < 1`` scales layer ``i`` of ``n`` by
    ``layer_decay ** (n - 1 - i)`` and needs ``model.group_matcher``."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    # by keyword: timm has inserted positional parameters here before, which would silently decay the skipped names
    if layer_decay == 1.0:
        groups = [{**g, "lr_scale": 1.0}
                  for g in param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip)]
    else:
        groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip,
                                          layer_decay=layer_decay)
    return sorted(groups, key=lambda g: -g["lr_scale"])
