"""The reference's pretraining augmentation, batch-wise on the training device (no per-crop work in loader workers).

The reference (MONAI) flips each axis with p 0.5, then rotates by 90° k times (k uniform in 1..3) with p 0.3 in a
plane (here: uniform among the planes whose two sides are equal), then scales intensities by ``1 + u`` with p 0.1
and shifts them by ``u`` with p 0.1, ``u ~ U(-0.1, 0.1)``. A 90° rotation is a swap of the plane's two axes and a flip
of one of them, and 180° is two flips; after flips that are uniform and independent per axis, extra flips change
nothing in distribution. So the same distribution is: uniform random flips, then a swap of the two axes of a plane
with probability 0.3 x 2/3 = 0.2 (the odd k). That is what :func:`augment` draws.

Memory traffic is what it costs on a GPU (a step's 192 crops of 96³ are 680 MB in float32), so every crop is read
once: the flips of all crops are one gather in the transfer dtype (per-crop index vectors, reversed or not, per axis),
only the swapped fifth is transposed, and the intensity change is one fused multiply-add that also converts to
float32. The decisions are drawn on the host, from torch's CPU generator (saved with every checkpoint), and reach the
device in a few small non-blocking copies: nothing waits for the device.
"""
from __future__ import annotations

import numpy as np
import torch

SWAP_PROB = 0.3 * 2 / 3  # rot90 with p 0.3 and k odd (1 or 3) in 2 of 3 cases


def _to(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Small host tensors on ``device`` without waiting for it (pinned, non-blocking on CUDA)."""
    if device.type != "cuda":
        return list(tensors)
    return [t.pin_memory().to(device, non_blocking=True) for t in tensors]


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random flips, axis swaps (90° rotations) and intensity scale/shift of ``x [N, C, X, Y, Z]``, per sample;
    float32 out whatever the input dtype."""
    n, spatial, dev = x.shape[0], x.shape[2:], x.device
    flip = torch.rand(n, 3) < 0.5
    planes = [(a, b) for a, b in ((2, 3), (2, 4), (3, 4)) if x.shape[a] == x.shape[b]]
    swap = torch.where(torch.rand(n) < SWAP_PROB, torch.randint(max(1, len(planes)), (n,)), -1)
    scale = torch.where(torch.rand(n) < 0.1, 1 + torch.empty(n).uniform_(-0.1, 0.1), 1.0)
    shift = torch.where(torch.rand(n) < 0.1, torch.empty(n).uniform_(-0.1, 0.1), 0.0)
    index = [torch.where(flip[:, a, None], torch.arange(s - 1, -1, -1), torch.arange(s)) for a, s in enumerate(spatial)]
    ix, iy, iz, scale, shift = _to(dev, *index, scale, shift)
    crops = torch.arange(n, device=dev)
    out = x.movedim(1, -1)[crops[:, None, None, None], ix[:, :, None, None], iy[:, None, :, None],
                           iz[:, None, None, :]].movedim(-1, 1)  # [N, C, X, Y, Z], each crop flipped its own way
    for p, (a, b) in enumerate(planes):
        rows = (swap == p).nonzero().flatten()
        if len(rows):
            (rows,) = _to(dev, rows)
            out[rows] = out[rows].transpose(a, b)
    per_crop = (-1, 1, 1, 1, 1)
    return torch.addcmul(shift.view(per_crop), out, scale.view(per_crop))


def augment_views(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A loader batch on the device ``{name: [B, n, C, *S]}``, in its transfer dtype -> float32, every view augmented
    on its own."""
    return {name: augment(v.flatten(0, 1)).view(v.shape) for name, v in batch.items()}


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
