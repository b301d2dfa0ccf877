"""A trained ViT encoder and the preprocessing of the data it was trained on, from either kind of checkpoint.

- **Pretraining checkpoint** (ours, docs/checkpoint_format.md): the encoder from ``encoder`` and the ``encoder.*``
  weights; preprocessing from the ``pretrain`` block (spacing, ``transpose_forward``, normalisation schemes, mask
  rule and intensity properties; resampling is nnU-Net's default, which the block does not record); the patch is the
  pretraining patch.
- **nnssl checkpoint** (MIC-DKFZ/nnssl: ``network_weights`` and ``nnssl_adaptation_plan``) of a Primus or a ResEnc
  (whose stride-16 feature map takes the place of the tokens, :mod:`nnunetv2_hiendmae.resenc`): read into our layout
  by :func:`nnunetv2_hiendmae.nnssl.from_nnssl`, then as a pretraining checkpoint; preprocessing from its
  ``pretrain_plan`` (spacing, ``transpose_forward``, Z-score normalisation), the patch is the pretraining patch.
- **Fine-tuned nnU-Net checkpoint** (``checkpoint_final.pth`` or ``checkpoint_best.pth`` of ``nnUNetv2_train`` with
  an ``nnUNetTrainerHiEndMAE*`` trainer, written by nnU-Net's ``nnUNetTrainer.save_checkpoint``): the encoder part
  (``encoder.*``) of the :class:`~nnunetv2_hiendmae.network.HiEndUNETR` in ``network_weights``; preprocessing, patch
  and image reader from the plans and configuration in ``init_args``, as ``nnUNetv2_predict`` takes them.

All are read with ``torch.load(weights_only=True)``. nnU-Net's checkpoint keeps numpy scalars in its training log,
so numpy's scalar and dtype reconstruction are allowed besides tensors; no other Python object is unpickled.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from nnunetv2_hiendmae.checkpoint import (
    FORMAT,
    KEYS,
    encoder_fingerprint,
    encoder_state_dict,
    import_command,
    read_torch_file,
    upgraded,
)
from nnunetv2_hiendmae.encoders import Encoder, build_encoder
from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.nnssl import KEYS as NNSSL_KEYS
from nnunetv2_hiendmae.nnssl import from_nnssl, is_nnssl_checkpoint, preprocessing_note
from nnunetv2_hiendmae.presets import NETWORK_CLASSES, encoder_kind
from pretrain.unlabeled import Settings

NNUNET_KEYS = ("network_weights", "init_args")  # what is read from nnU-Net's checkpoint
PRETRAIN_KEYS = ("spacing", "normalization_schemes", "foreground_intensity_properties_per_channel")


@dataclass
class TrainedEncoder:
    """The encoder (eval mode, CPU) and how its training data were preprocessed.

    ``settings.patch_size`` is the patch the encoder was trained on (voxels, in the axes of ``transpose_forward``);
    ``fingerprint`` is :func:`~nnunetv2_hiendmae.checkpoint.encoder_fingerprint` of its configuration and weights.
    """

    encoder: Encoder
    settings: Settings
    fingerprint: str
    description: str
    notes: list[str] = field(default_factory=list)  # what the commands report about it (an nnssl preprocessing)


def numpy_scalar_globals() -> list:
    """What ``torch.load(weights_only=True)`` must be allowed to rebuild numpy scalars (nnU-Net's training log)."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    kinds = (np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_)
    return [scalar, np.dtype, *{type(np.dtype(k)) for k in kinds}]


def load_trained_encoder(path: str | os.PathLike) -> TrainedEncoder:
    """Read any of the three kinds of checkpoint (module docstring); a missing, unreadable or foreign file, or an
    nnU-Net checkpoint of a network without our ViT, is a :class:`~nnunetv2_hiendmae.errors.UserError`."""
    path = Path(path).expanduser().resolve()
    allowed = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; before, numpy scalars are refused
    with allowed(numpy_scalar_globals()) if allowed else contextlib.nullcontext():
        ckpt = read_torch_file(path, "checkpoint")
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
        return _from_pretraining(ckpt, path)
    if is_nnssl_checkpoint(ckpt):
        ours = from_nnssl(ckpt, path, cnn=True)
        trained = _from_pretraining(ours, path, f"nnssl checkpoint {path}")
        trained.notes.append(preprocessing_note(ours["pretrain"]))
        return trained
    if isinstance(ckpt, dict) and all(k in ckpt for k in NNUNET_KEYS):
        return _from_nnunet(ckpt, path)
    found = ", ".join(sorted(map(str, ckpt))[:8]) if isinstance(ckpt, dict) else type(ckpt).__name__
    raise UserError(f"{path} is neither a nnunetv2_hiendmae pretraining checkpoint (keys {', '.join(KEYS)}), an "
                    f"nnssl checkpoint (keys {', '.join(NNSSL_KEYS)}) nor an nnU-Net training checkpoint (keys "
                    f"{', '.join(NNUNET_KEYS)}); found {found or 'none'} (a "
                    f"reference Hi-End-MAE file converts with {import_command(path)})")


def _load(config: dict, weights: dict[str, torch.Tensor], path: Path) -> Encoder:
    encoder = build_encoder(config)
    try:
        encoder.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: the encoder weights do not fit its configuration "
                        f"({' '.join(str(e).split())[:200]})") from None
    return encoder.eval()


def _from_pretraining(ckpt: dict, path: Path, source: str | None = None) -> TrainedEncoder:
    pre = upgraded(ckpt)["pretrain"]
    patch = pre.get("patch_size")
    missing = [k for k in PRETRAIN_KEYS if pre.get(k) is None] + ([] if patch else ["patch_size"])
    if missing:
        raise UserError(f"checkpoint {path} does not record pretrain.{', pretrain.'.join(missing)}: it cannot say how "
                        f"its pretraining data were preprocessed")
    channels = int(ckpt["encoder"]["in_channels"])
    schemes = [str(s) for s in pre["normalization_schemes"]]
    settings = Settings(
        channels, "CT" if all(s == "CTNormalization" for s in schemes) else "MR", [float(s) for s in pre["spacing"]],
        [int(a) for a in pre.get("transpose_forward") or range(3)], schemes,
        [bool(m) for m in pre.get("use_mask_for_norm") or [False] * len(schemes)],
        json.loads(json.dumps(pre["foreground_intensity_properties_per_channel"])), patch_size=patch,
        source=source or f"pretraining checkpoint {path}")
    encoder = _load(ckpt["encoder"], encoder_state_dict(ckpt), path)
    return TrainedEncoder(encoder, settings, encoder_fingerprint(ckpt),
                          f"{ckpt['encoder'].get('arch')} encoder pretrained with {ckpt.get('method')}")


def _from_nnunet(ckpt: dict, path: Path) -> TrainedEncoder:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_hiendmae.network import network_encoder_config
    from pretrain.unlabeled import settings_from_plans

    init, trainer = ckpt["init_args"], ckpt.get("trainer_name", "an unknown trainer")
    manager = PlansManager(init["plans"])
    configuration = manager.get_configuration(init["configuration"])
    if configuration.network_arch_class_name not in NETWORK_CLASSES:
        raise UserError(f"{path} is an nnU-Net checkpoint of {trainer}, whose network is "
                        f"{configuration.network_arch_class_name}: only a {' or a '.join(NETWORK_CLASSES)} (trainers "
                        f"nnUNetTrainerHiEndMAE*) has an encoder of ours to embed with")
    channels = len(init["dataset_json"]["channel_names"])  # nnU-Net's input channels (no cascade for these plans)
    patch = [int(s) for s in configuration.patch_size]
    config = network_encoder_config(configuration.network_arch_init_kwargs["encoder"], channels, patch)
    weights = {k.removeprefix("module."): v for k, v in ckpt["network_weights"].items()}
    if encoder_kind(config) == "primus":  # dna's Primus holds the encoder's modules at its top level
        weights = {f"encoder.{k}": v for k, v in weights.items() if k.startswith(("down_projection.", "eva."))}
    own = {"encoder": config, "weights": weights}
    encoder = _load(config, encoder_state_dict(own), path)
    settings = settings_from_plans(manager, init["configuration"], channels, patch, f"nnU-Net checkpoint {path}")
    settings = replace(settings, reader=manager.plans.get("image_reader_writer"))  # as nnUNetv2_predict reads
    return TrainedEncoder(encoder, settings, encoder_fingerprint(own),
                          f"{config.get('arch')} encoder fine-tuned by {trainer} ({manager.plans_name}, "
                          f"{init['configuration']}, fold {init.get('fold')})")
