"""The pretraining checkpoint format (see docs/checkpoint_format.md).

One ``torch.save`` file that loads with ``torch.load(path, weights_only=True)``: only tensors, dicts, lists, tuples,
strings and numbers. It is self-describing so that fine-tuning can rebuild the encoder and reproduce the
pretraining preprocessing without the pretraining code.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from nnunetv2_hiendmae import __version__
from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.fileio import atomic_write

FORMAT = "nnunetv2_hiendmae.pretrain/1"
ENCODER_PREFIX = "encoder."


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`~nnunetv2_hiendmae.fileio.atomic_write`: a kill never leaves a corrupt file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def make_checkpoint(weights: dict, encoder: dict, model: dict, pretrain: dict, method: str = "hiend_mae",
                    train_state: dict | None = None) -> dict:
    """Assemble a checkpoint dict. ``weights`` is the full pretraining model state dict (encoder under ``encoder.``)."""
    ckpt = {
        "format": FORMAT,
        "method": method,
        "package_version": __version__,
        "encoder": encoder,
        "model": model,
        "pretrain": pretrain,
        "weights": weights,
    }
    if train_state is not None:
        ckpt["train_state"] = train_state
    return ckpt


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load and validate one of our checkpoints; a missing, corrupt or foreign file is a :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        hint = ""
        if isinstance(ckpt, dict) and "state_dict" in ckpt:
            hint = " (it looks like a reference Hi-End-MAE checkpoint: convert it with nnUNetv2_hiendmae_import)"
        raise UserError(f"{path} is not a nnunetv2_hiendmae pretraining checkpoint{hint}")
    return ckpt


def encoder_state_dict(ckpt: dict) -> dict[str, torch.Tensor]:
    """The encoder's own weights (keys as in :class:`~nnunetv2_hiendmae.vit.ViTEncoder3D`)."""
    return {k[len(ENCODER_PREFIX):]: v for k, v in ckpt["weights"].items() if k.startswith(ENCODER_PREFIX)}
