"""Plots a person looks at during pretraining: progress curves and masked-reconstruction slices."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from nnunetv2_hiendmae.fileio import atomic_write  # noqa: E402

NOT_LOSSES = ("lr", "crops_per_s", "epoch_time")
PROBE = "probe_dice"  # the downstream linear probe's mean foreground Dice (pretrain.train)


def _save(fig, path: Path) -> None:
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


def _measured(epochs: list[int], values: list[float]) -> tuple[list[int], list[float]]:
    """The epochs at which a figure was measured (NaN: not measured that epoch)."""
    kept = [(e, v) for e, v in zip(epochs, values) if v == v]
    return [e for e, _ in kept], [v for _, v in kept]


def plot_progress(history: dict[str, list[float]], path: Path) -> None:
    """Per epoch: the total loss and each of its components (training solid, held-out cases dashed in the same
    colour), the downstream probe's Dice if the run has one, the learning rate and the throughput."""
    epochs = list(range(1, len(history["loss"]) + 1))
    marker = "o" if len(epochs) < 30 else None
    panels = ["loss"] + (["probe"] if PROBE in history else []) + ["lr", "crops_per_s"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3 * len(panels)), sharex=True)
    losses = [k for k in history if k not in (*NOT_LOSSES, PROBE) and not k.startswith("val_")]
    for i, k in enumerate(losses):
        colour = f"C{i}"
        axes[0].plot(epochs, history[k], color=colour, marker=marker, lw=2.5 if k == "loss" else 1.2,
                     label="total loss" if k == "loss" else k)
        if f"val_{k}" in history:
            x, y = _measured(epochs, history[f"val_{k}"])
            axes[0].plot(x, y, color=colour, ls="--", marker="s" if len(x) < 30 else None, ms=4,
                         lw=2.0 if k == "loss" else 1.0, label=f"held-out {'total loss' if k == 'loss' else k}")
    axes[0].set_ylabel("loss (solid: training, dashed: held-out cases)" if "val_loss" in history else "train loss")
    if len(axes[0].get_lines()) > 1:
        axes[0].legend(fontsize=8, ncol=3)
    rest = {"probe": (PROBE, "probe: mean foreground Dice"), "lr": ("lr", "learning rate (end of epoch)"),
            "crops_per_s": ("crops_per_s", "crops / s")}
    for ax, panel in zip(axes[1:], panels[1:]):
        key, label = rest[panel]
        x, y = _measured(epochs, history[key])
        ax.plot(x, y, color="tab:blue", marker="o" if panel == "probe" else marker)
        if panel == "probe" and y:
            best = max(range(len(y)), key=y.__getitem__)
            ax.plot([x[best]], [y[best]], "*", color="tab:red", ms=14, label=f"best: {y[best]:.3f} (epoch {x[best]})")
            ax.legend(fontsize=8)
        ax.set_ylabel(label)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    _save(fig, path)


def slice_panels(shape: Sequence[int], spacing: Sequence[float]) -> list[dict]:
    """For the central cut across each axis of a ``[X, Y, Z]`` volume: the two axes shown (rows, columns), the
    ``imshow`` aspect that draws a voxel with its physical proportions, and the panel's size in mm."""
    panels = []
    for cut, (rows, cols) in enumerate(((1, 2), (0, 2), (0, 1))):
        panels.append({"cut": cut, "axes": (rows, cols), "aspect": spacing[rows] / spacing[cols],
                       "mm": (shape[rows] * spacing[rows], shape[cols] * spacing[cols])})
    return panels


def plot_reconstruction(image: torch.Tensor, masked: torch.Tensor, recon: torch.Tensor, path: Path, title: str,
                        spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
    """Central slices along each axis of the first crop of a batch ``[B, C, X, Y, Z]`` (channel 0): input, masked
    input, reconstruction; each panel drawn with the voxels' physical aspect (``spacing`` in the crop's axis order),
    so a 16 x 64 slice of 4 x 1 mm voxels shows as the square it is."""
    rows = (("input", image), ("masked input", masked), ("reconstruction", recon))
    vol = image[0, 0].float().cpu()
    lo, hi = float(vol.quantile(0.01)), float(vol.quantile(0.99))
    panels = slice_panels(vol.shape, spacing)
    fig, axes = plt.subplots(3, 3, figsize=(10, 9), gridspec_kw={"width_ratios": [p["mm"][1] for p in panels]})
    for r, (name, v) in enumerate(rows):
        v = v[0, 0].float().cpu()
        slices = (v[v.shape[0] // 2], v[:, v.shape[1] // 2], v[:, :, v.shape[2] // 2])
        for c, (s, panel) in enumerate(zip(slices, panels)):
            ax = axes[r, c]
            ax.imshow(s.numpy(), cmap="gray", vmin=lo, vmax=hi, aspect=panel["aspect"], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name)
            if r == 0:
                ax.set_title(f"cut across axis {c} ({panel['mm'][0]:.0f} x {panel['mm'][1]:.0f} mm)", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
