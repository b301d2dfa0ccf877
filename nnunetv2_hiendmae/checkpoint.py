"""The pretraining checkpoint format (see docs/checkpoint_format.md).

One ``torch.save`` file that loads with ``torch.load(path, weights_only=True)``: only tensors, dicts, lists, tuples,
strings and numbers. It is self-describing so that fine-tuning can rebuild the encoder and reproduce the
pretraining preprocessing without the pretraining code.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shlex
from pathlib import Path

import torch

from nnunetv2_hiendmae import __version__
from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.fileio import atomic_write
from nnunetv2_hiendmae.presets import CHECKPOINT_FORMAT

FORMAT = CHECKPOINT_FORMAT
KEYS = ("format", "method", "package_version", "encoder", "model", "pretrain", "weights")
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


class HoldsPythonObjects(UserError):
    """A valid PyTorch file whose pickle names classes beyond tensors and containers (``weights_only`` refuses it)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def read_torch_file(path: str | os.PathLike, what: str = "checkpoint", weights_only: bool = True,
                    map_location: str | torch.device = "cpu") -> object:
    """``torch.load``, with a file that cannot be read reported as one line saying what the file is and is not (never
    torch's advice to unpickle it fully, which would run code stored in it)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as e:
        # a valid pickle naming classes outside torch's allow-list ("Unsupported global"; "class" before torch 2.4)
        if weights_only and ("unsupported global" in str(e).lower() or "unsupported class" in str(e).lower()):
            raise HoldsPythonObjects(f"{path} is a PyTorch file that holds Python objects besides tensors, not a "
                                     f"plain {what}") from None
        raise UserError(f"{path} is not a readable {what} (truncated, corrupt or not a torch file: "
                        f"{_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - any other failure means the file is unusable
        raise UserError(f"{path} is not a readable {what} (truncated, corrupt or not a torch file: "
                        f"{_first_line(e)})") from None


def import_command(path: str | os.PathLike) -> str:
    """The command that converts a reference Hi-End-MAE file at ``path`` into one of our checkpoints."""
    return f"nnUNetv2_hiendmae_import -i {shlex.quote(str(path))} -o CONVERTED.pth"


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", nnssl: bool = True,
                    cnn: bool = False) -> dict:
    """Load and validate one of our checkpoints; a missing, corrupt or foreign file is a :class:`UserError`.
    ``nnssl``: an nnssl Primus checkpoint is accepted too, read into our layout in memory
    (:func:`nnunetv2_hiendmae.nnssl.from_nnssl`, ``pretrain["source"] == "nnssl"``); with ``cnn`` an nnssl ResEnc
    checkpoint as well (an encoder of kind ``resenc``, for the commands that only run the encoder)."""
    try:
        ckpt = read_torch_file(path, "checkpoint", map_location=map_location)
    except HoldsPythonObjects as e:
        raise UserError(f"{e}: nnunetv2_hiendmae checkpoints load with weights_only=True (a reference Hi-End-MAE "
                        f"file converts with {import_command(path)})") from None
    if nnssl:
        from nnunetv2_hiendmae.nnssl import from_nnssl, is_nnssl_checkpoint

        if is_nnssl_checkpoint(ckpt):
            return from_nnssl(ckpt, path, cnn)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        hint = ""
        if isinstance(ckpt, dict) and "state_dict" in ckpt:
            hint = f"; it looks like a reference Hi-End-MAE checkpoint: convert it with {import_command(path)}"
        found = ", ".join(sorted(map(str, ckpt))[:8]) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path} is a torch file but not a nnunetv2_hiendmae pretraining checkpoint: expected the "
                        f"keys {', '.join(KEYS)}{' (or an nnssl checkpoint)' if nnssl else ''}, found "
                        f"{found or 'none'}{hint}")
    return upgraded(ckpt)


def upgraded(ckpt: dict) -> dict:
    """A checkpoint of an earlier release in this release's layout: 0.1 recorded the patch size as
    ``pretrain.crop_size``; it is ``pretrain.patch_size`` now."""
    pretrain = ckpt.get("pretrain") or {}
    if "crop_size" in pretrain and "patch_size" not in pretrain:
        pretrain["patch_size"] = pretrain.pop("crop_size")
    return ckpt


def encoder_state_dict(ckpt: dict) -> dict[str, torch.Tensor]:
    """The encoder's own weights (keys as in :class:`~nnunetv2_hiendmae.vit.ViTEncoder3D`)."""
    return {k[len(ENCODER_PREFIX):]: v for k, v in ckpt["weights"].items() if k.startswith(ENCODER_PREFIX)}


def encoder_fingerprint(ckpt: dict) -> str:
    """SHA-256 of what fine-tuning takes from a checkpoint, the encoder's configuration and weights: plans pin this,
    not the file's bytes, so a checkpoint written again with the same encoder still matches its plans."""
    h = hashlib.sha256(json.dumps(ckpt["encoder"], sort_keys=True).encode())
    for name, t in sorted(encoder_state_dict(ckpt).items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
