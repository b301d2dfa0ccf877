"""The device augmentation draws the same distribution of spatial and intensity changes as the reference's per-crop
CPU pipeline (flips p 0.5 per axis, rot90 p 0.3 with k in 1..3 in a plane of equal sides, scale and shift p 0.1)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from pretrain.augment import augment, reference_augment

N = 20_000


def describe(out: np.ndarray, ids: np.ndarray) -> tuple[tuple, float, float]:
    """``(arrangement, scale, shift)`` of an output of ``ids * scale + shift`` rearranged: the arrangement is which id
    lands where (recovered through the ranks, which scale > 0 and shift keep)."""
    flat = out.ravel()
    order = tuple(np.argsort(flat, kind="stable"))
    lo, hi = np.sort(flat)[[0, -1]]
    scale = (hi - lo) / (ids.max() - ids.min())
    return order, float(scale), float(lo - ids.min() * scale)


@pytest.mark.parametrize("shape", [(3, 3, 3), (3, 3, 5)])
def test_same_distribution_as_the_reference(shape):
    ids = np.arange(np.prod(shape), dtype=np.float32).reshape(1, *shape) / np.prod(shape) + 1.0
    rng = np.random.default_rng(0)
    ref = [describe(reference_augment(rng, ids), ids) for _ in range(N)]
    torch.manual_seed(0)
    out = augment(torch.from_numpy(ids)[None].repeat(N, 1, 1, 1, 1)).numpy()
    new = [describe(o, ids) for o in out]

    ref_counts, new_counts = Counter(r[0] for r in ref), Counter(r[0] for r in new)
    assert set(new_counts) == set(ref_counts)  # the same reachable orientations: 8 flips x (no swap or 1 of 3)
    assert len(ref_counts) == (32 if len(set(shape)) == 1 else 16)
    for arrangement, count in ref_counts.items():  # binomial sd <= 0.0035 at N = 20000
        assert abs(new_counts[arrangement] / N - count / N) < 0.012, arrangement
    for pick, name in ((1, "scale"), (2, "shift")):
        ref_v, new_v = np.array([r[pick] for r in ref]), np.array([r[pick] for r in new])
        neutral = 1.0 if name == "scale" else 0.0
        changed_ref, changed_new = np.abs(ref_v - neutral) > 1e-4, np.abs(new_v - neutral) > 1e-4
        assert abs(changed_ref.mean() - changed_new.mean()) < 0.012, name  # p 0.1 each
        assert np.all(np.abs(new_v - neutral) <= 0.1 + 1e-3), name  # u ~ U(-0.1, 0.1)


def test_runs_per_sample_without_mixing_samples_or_channels():
    x = torch.randn(64, 2, 4, 4, 6)
    torch.manual_seed(1)
    y = augment(x.clone())
    assert y.shape == x.shape
    for i in range(64):  # each output is its own input rearranged, scaled and shifted, the same for both channels
        for c in range(2):
            xs, ys = x[i, c].flatten().sort().values, y[i, c].flatten().sort().values
            a = (ys[-1] - ys[0]) / (xs[-1] - xs[0])
            torch.testing.assert_close(ys, xs * a + (ys[0] - xs[0] * a), rtol=1e-4, atol=1e-4)


def test_float32_out_and_the_transfer_dtype_changes_only_the_stored_rounding():
    """Crops travel as float16 on a GPU: augmenting them must equal augmenting their float32 values."""
    half = torch.randn(6, 1, 8, 8, 8).half()
    torch.manual_seed(3)
    a = augment(half)
    torch.manual_seed(3)
    b = augment(half.float())
    assert a.dtype == b.dtype == torch.float32
    assert torch.equal(a, b)
