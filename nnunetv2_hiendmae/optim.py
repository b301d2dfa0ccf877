"""AdamW parameter groups from what a model declares, for pretraining and fine-tuning alike.

Models follow timm's convention: ``no_weight_decay()`` names the parameters that get no weight decay besides
biases and norms (CLS and mask tokens, position embeddings), and ``group_matcher()`` assigns layer ids for layer-wise
learning-rate decay. timm's ``param_groups_weight_decay`` / ``param_groups_layer_decay`` build the groups; every group
carries ``lr_scale``, which the learning-rate schedulers multiply in.
"""
from __future__ import annotations

from collections.abc import Iterable

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


def split_param_groups(groups: list[dict], members: Iterable[nn.Parameter]) -> tuple[list[dict], list[dict]]:
    """Each group cut in two with the same settings: (the parameters not in ``members``, those in it); empty parts
    dropped, order kept. Lets part of a model (a staged encoder) get a learning-rate treatment of its own."""
    inside = {id(p) for p in members}
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in inside]} for g in groups]
    chosen = [{**g, "params": [p for p in g["params"] if id(p) in inside]} for g in groups]
    return [g for g in rest if g["params"]], [g for g in chosen if g["params"]]
