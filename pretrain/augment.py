"""The reference's pretraining augmentation, batch-wise on the training device (no per-crop work in loader workers).

The reference (MONAI) flips each axis with p 0.5, then rotates by 90° k times (k uniform in 1..3) with p 0.3 in a
plane (here: uniform among the planes whose two sides are equal), then scales intensities by ``1 + u`` with p 0.1
and shifts them by ``u`` with p 0.1, ``u ~ U(-0.1, 0.1)``. A 90° rotation is a swap of the plane's two axes and a flip
of one of them, and 180° is two flips; after flips that are uniform and independent per axis, extra flips change
nothing in distribution. So the same distribution is: uniform random flips, then a swap of the two axes of a plane
with probability 0.3 x 2/3 = 0.2 (the odd k). That is what :func:`augment` draws, with ``torch.where`` over the batch
(no per-sample Python work, no host synchronisation).
"""
from __future__ import annotations

import numpy as np
import torch

SWAP_PROB = 0.3 * 2 / 3  # rot90 with p 0.3 and k odd (1 or 3) in 2 of 3 cases


def _per_sample(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, 1, 1, 1, 1)


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random flips, axis swaps (90° rotations) and intensity scale/shift of ``x [N, C, X, Y, Z]``, per sample."""
    n, dev = x.shape[0], x.device
    for axis in (2, 3, 4):
        x = torch.where(_per_sample(torch.rand(n, device=dev) < 0.5), x.flip(axis), x)
    planes = [(a, b) for a, b in ((2, 3), (2, 4), (3, 4)) if x.shape[a] == x.shape[b]]
    if planes:
        swap = torch.rand(n, device=dev) < SWAP_PROB
        plane = torch.randint(len(planes), (n,), device=dev)
        for p, (a, b) in enumerate(planes):
            x = torch.where(_per_sample(swap & (plane == p)), x.transpose(a, b), x)
    scale = torch.where(torch.rand(n, device=dev) < 0.1, 1 + torch.empty(n, device=dev).uniform_(-0.1, 0.1), 1.0)
    shift = torch.where(torch.rand(n, device=dev) < 0.1, torch.empty(n, device=dev).uniform_(-0.1, 0.1), 0.0)
    return x * _per_sample(scale).to(x.dtype) + _per_sample(shift).to(x.dtype)


def augment_views(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A loader batch on the device ``{name: [B, n, C, *S]}``, in its transfer dtype -> float32, every view augmented
    on its own."""
    return {name: augment(v.float().flatten(0, 1)).view(v.shape) for name, v in batch.items()}


def reference_augment(rng: np.random.Generator, crop: np.ndarray) -> np.ndarray:
    """The reference's augmentation of one ``[C, X, Y, Z]`` crop in numpy, as loader workers applied it per crop
    before: the specification :func:`augment` is tested against, and the CPU work it removed from the workers."""
    for axis in (1, 2, 3):
        if rng.random() < 0.5:
            crop = np.flip(crop, axis)
    planes = [(a, b) for a, b in ((0, 1), (0, 2), (1, 2)) if crop.shape[a + 1] == crop.shape[b + 1]]
    if planes and rng.random() < 0.3:
        a, b = planes[rng.integers(len(planes))]
        crop = np.rot90(crop, int(rng.integers(1, 4)), axes=(a + 1, b + 1))
    if rng.random() < 0.1:
        crop = crop * np.float32(1 + rng.uniform(-0.1, 0.1))
    if rng.random() < 0.1:
        crop = crop + np.float32(rng.uniform(-0.1, 0.1))
    return crop
