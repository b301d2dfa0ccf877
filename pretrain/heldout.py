"""The held-out reconstruction loss: cases kept out of every training batch, scored on fixed views and fixed masks.

The training loss falls whether or not the encoder generalises; the same loss on cases the run never trains on, on
the same crops and the same masks every time, moves only when the model does. Cases are drawn once from the run's
seed (:func:`held_out_cases`), their views are cut once (no augmentation) and kept in the dtype crops travel in, and
every evaluation draws its masks from a fixed seed inside :func:`torch.random.fork_rng`, so the training's random
streams are untouched and a resumed run stays exact. The model runs eagerly under ``torch.no_grad`` in the run's
precision (a compiled training graph is neither called nor recompiled), ``cases_per_batch`` cases at a time.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.precision import autocast
from nnunetv2_hiendmae.preprocessed import PreprocessedData
from pretrain.config import val_cases_value
from pretrain.data import PretrainCrops

MAX_CASES = 50
MIN_DATASET = 10  # smaller datasets keep every case for training by default
DEFAULT_FRACTION = 0.05
VIEW_SEED = 1_000_003  # the fixed views' and masks' seed, offset from the run's
MASK_SEED = 2_000_003


def default_count(num_cases: int) -> int:
    """5 % of the cases, at least 1 and at most 50; none for a dataset of fewer than 10 cases."""
    if num_cases < MIN_DATASET:
        return 0
    return min(MAX_CASES, max(1, round(DEFAULT_FRACTION * num_cases)))


def held_out_count(given: str | None, num_cases: int) -> int:
    """``--val-cases``: an integer count or a fraction in (0, 1) of ``num_cases``; None: :func:`default_count`."""
    if given is None:
        return default_count(num_cases)
    value = val_cases_value(given)
    count = math.ceil(value * num_cases) if 0 < value < 1 else int(value)
    if count >= num_cases:
        raise UserError(f"--val-cases {given} holds out {count} of the {num_cases} cases: at least one must be left "
                        f"to train on")
    return count


def held_out_cases(sources: Sequence[PreprocessedData], count: int, seed: int) -> list[str]:
    """``count`` cases (``DatasetXXX_Name/case``) drawn from all sources with the run's seed, sorted."""
    names = [f"{s.dataset_name}/{case}" for s in sources for case in s.identifiers]
    rng = np.random.default_rng([seed, VIEW_SEED])
    return sorted(names[i] for i in rng.choice(len(names), size=count, replace=False)) if count else []


def split_off(sources: Sequence[PreprocessedData], held_out: Sequence[str]) -> list[PreprocessedData]:
    """Copies of ``sources`` holding only the held-out cases; the held-out cases are removed from ``sources``."""
    kept = set(held_out)
    parts = []
    for s in sources:
        own = [c for c in s.identifiers if f"{s.dataset_name}/{c}" in kept]
        if own:
            parts.append(replace(s, identifiers=own))
        s.identifiers[:] = [c for c in s.identifiers if f"{s.dataset_name}/{c}" not in kept]
    missing = kept - {f"{p.dataset_name}/{c}" for p in parts for c in p.identifiers}
    if missing:
        raise UserError(f"the run's held-out cases are no longer in its datasets: {', '.join(sorted(missing)[:5])}")
    return parts


class HeldOutLoss:
    """The method's named losses on the held-out cases' fixed views. Under torchrun, rank 0 alone scores them (it
    alone logs and writes); the other ranks go on to the next epoch and wait for it at its first gradient exchange."""

    def __init__(self, sources: Sequence[PreprocessedData], views: dict, seed: int, dtype: str):
        self.views: list[dict[str, torch.Tensor]] = []
        for s in sources:
            for case in s.identifiers:
                data = PretrainCrops([replace(s, identifiers=[case])], views, 1,
                                     seed=seed + VIEW_SEED, dtype=dtype)
                self.views.append(data[0])  # {name: [n, C, *size]}: one case's views, cut once
        self.seed = seed + MASK_SEED

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, device: torch.device, precision: str,
                 cases_per_batch: int) -> dict[str, float]:
        """``{"val_<name>": mean over the held-out cases}`` for every loss the model returns."""
        was_training = model.training
        model.eval()
        sums: dict[str, torch.Tensor] = {}
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(self.seed)  # the same masks at every evaluation
                for start in range(0, len(self.views), cases_per_batch):
                    chunk = self.views[start:start + cases_per_batch]
                    batch = {k: torch.stack([v[k] for v in chunk]).to(device).float() for k in chunk[0]}
                    with autocast(device, precision):
                        losses = model(batch)
                    for k, v in losses.items():
                        sums[k] = sums.get(k, 0) + v.detach().float() * len(chunk)
        finally:  # also where a stop request cuts it short (pretrain.stop)
            model.train(was_training)
        return {f"val_{k}": float(v) / len(self.views) for k, v in sums.items()}
