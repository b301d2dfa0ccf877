"""Plots a person looks at during pretraining: progress curves and masked-reconstruction slices."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from nnunetv2_hiendmae.fileio import atomic_write  # noqa: E402


def _save(fig, path: Path) -> None:
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


def plot_progress(history: dict[str, list[float]], path: Path) -> None:
    """Loss, learning rate and throughput per epoch, one panel each."""
    epochs = list(range(1, len(history["loss"]) + 1))
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for ax, key, label in zip(axes, ("loss", "lr", "crops_per_s"),
                              ("train loss (masked-patch MSE)", "learning rate (end of epoch)", "crops / s")):
        ax.plot(epochs, history[key], color="tab:blue", marker="o" if len(epochs) < 30 else None)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("epoch")
    fig.tight_layout()
    _save(fig, path)


def plot_reconstruction(image: torch.Tensor, masked: torch.Tensor, recon: torch.Tensor, path: Path, title: str) -> None:
    """Central slices along each axis of the first crop of a batch ``[B, C, H, W, D]`` (channel 0): input, masked
    input, reconstruction."""
    rows = (("input", image), ("masked input", masked), ("reconstruction", recon))
    vol = image[0, 0].float().cpu()
    lo, hi = float(vol.quantile(0.01)), float(vol.quantile(0.99))
    fig, axes = plt.subplots(3, 3, figsize=(9, 9))
    for r, (name, v) in enumerate(rows):
        v = v[0, 0].float().cpu()
        slices = (v[v.shape[0] // 2], v[:, v.shape[1] // 2], v[:, :, v.shape[2] // 2])
        for c, s in enumerate(slices):
            axes[r, c].imshow(s.numpy(), cmap="gray", vmin=lo, vmax=hi)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if c == 0:
                axes[r, c].set_ylabel(name)
            if r == 0:
                axes[r, c].set_title(f"axis {c}, central slice")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
