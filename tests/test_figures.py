"""Pretraining figures: reconstructions drawn with the voxels' physical proportions, progress with every loss."""
from __future__ import annotations

import matplotlib.image
import pytest
import torch

from pretrain.figures import plot_progress, plot_reconstruction, slice_panels


def test_panels_have_the_physical_aspect_of_the_crop():
    """A 16 x 64 x 64 crop of 4 x 1 x 1 mm voxels is a 64 mm cube: every cut is a square in mm."""
    panels = slice_panels((16, 64, 64), (4.0, 1.0, 1.0))
    assert [p["axes"] for p in panels] == [(1, 2), (0, 2), (0, 1)]
    assert [p["mm"] for p in panels] == [(64.0, 64.0)] * 3
    assert [p["aspect"] for p in panels] == [1.0, 4.0, 4.0]  # a row of voxels is drawn 4 x as tall as it is wide


def test_reconstruction_and_progress_figures_are_written(tmp_path):
    x = torch.randn(1, 1, 16, 64, 64)
    plot_reconstruction(x, x * 0, x, tmp_path / "r.png", "test", spacing=(4.0, 1.0, 1.0))
    image = matplotlib.image.imread(tmp_path / "r.png")
    assert image.shape[0] > 100 and image.shape[1] > 100
    history = {"loss": [1.0, 0.8], "rec_up": [0.5, 0.4], "lr": [1e-4, 5e-5], "crops_per_s": [10.0, 11.0],
               "epoch_time": [1.0, 1.0]}
    plot_progress(history, tmp_path / "p.png")
    assert matplotlib.image.imread(tmp_path / "p.png").shape[0] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png", "r.png"]  # no temporary files left


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (5.0, 0.8, 0.8)])
def test_reconstruction_handles_anisotropic_spacing(tmp_path, spacing):
    x = torch.randn(1, 1, 8, 32, 48)
    plot_reconstruction(x, x, x, tmp_path / "r.png", "test", spacing=spacing)
    assert (tmp_path / "r.png").stat().st_size > 0
