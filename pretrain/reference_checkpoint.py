"""Converting a checkpoint saved by the reference Hi-End-MAE code into this package's checkpoint format
(the work behind ``nnUNetv2_hiendmae_import``).

The reference saves ``{'epoch', 'state_dict', 'optimizer', 'scaler'}`` with DDP-prefixed keys (``module.``).
The encoder keeps its names (``encoder.*``; our :class:`~nnunetv2_hiendmae.vit.ViTEncoder3D` uses the reference
names). The top-level ``encoder_pos_embed`` becomes either ``pos_embed='sincos'`` (it equals the fixed sin-cos
table: nothing to store) or a learned ``encoder.pos_embed`` (the reference's ``pos_embed_type='perceptron'``).
Decoder, projections and mask token keep their names; ``decoder_pos_embed`` (fixed sin-cos) is dropped.

The ``pretrain`` block describes the preprocessing the released weights expect (1.5 mm spacing, one CT channel,
HU clipped to [-175, 250] and scaled to [0, 1]) in nnU-Net terms, so that plans written from it reproduce it:
nnU-Net's ``CTNormalization`` clips to [percentile_00_5, percentile_99_5] and then computes (x - mean) / std,
which with -175 / 250 / -175 / 425 is exactly that mapping.
"""
from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from nnunetv2_hiendmae.checkpoint import FORMAT, HoldsPythonObjects, make_checkpoint, read_torch_file, save_atomic
from nnunetv2_hiendmae.encoders import build_encoder
from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.fileio import sha256
from nnunetv2_hiendmae.presets import PRESETS, REFERENCE_PATCH, ct_window_statistics, encoder_config
from nnunetv2_hiendmae.vit import sincos_pos_embed_3d
from pretrain.methods import MaskedCropsSettings
from pretrain.methods.hiend_mae import DECODER_PRESETS

SINCOS_ATOL = 1e-5

# The released weights' preprocessing, in nnU-Net plans terms (see the module docstring).
RELEASE_SPACING = [1.5, 1.5, 1.5]
RELEASE_CT_WINDOW = (-175.0, 250.0)

ENCODER_PATCH_KEY = "encoder.patch_embed.proj.weight"
_DROPPED = ("decoder_pos_embed",)  # fixed sin-cos, recomputed by our pretraining model
_KEPT_PREFIXES = ("decoder.", "encoder_to_decoder.")
_KEPT_KEYS = ("mask_token",)


def _note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


def load_reference_file(path: str | Path, allow_unpickle: bool = True) -> object:
    """``torch.load`` a reference checkpoint on the CPU.

    Tries ``weights_only=True`` first. Reference checkpoints may hold arbitrary Python objects (e.g. an argparse
    ``Namespace``); then, if ``allow_unpickle``, the file is loaded again with full unpickling (which can run code
    stored in the file: only for files from a trusted source) and a note says so.
    """
    try:
        return read_torch_file(path, "PyTorch checkpoint")
    except HoldsPythonObjects:
        if not allow_unpickle:
            raise UserError(f"{path} holds Python objects besides tensors and --weights-only was given: drop "
                            "--weights-only to unpickle it (only for files from a trusted source)") from None
    _note(f"{Path(path).name} holds Python objects besides tensors; unpickling it fully (weights_only=False), "
          "which trusts the file's source")
    return read_torch_file(path, "PyTorch checkpoint", weights_only=False)


def reference_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """The model state dict inside a loaded reference file, without the DDP ``module.`` prefix."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        raise UserError("the input is already a nnunetv2_hiendmae checkpoint: there is nothing to import")
    sd = obj
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                sd = obj[wrapper]
                break
    if not isinstance(sd, dict) or not sd:
        raise UserError("the input is not a reference Hi-End-MAE checkpoint (no state dict found)")
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            raise UserError("the input is not a reference Hi-End-MAE checkpoint (state dict keys are not strings)")
        k = k[len("module."):] if k.startswith("module.") else k
        if k in out:
            raise UserError(f"the input has the key {k!r} both with and without the 'module.' prefix")
        out[k] = v
    if ENCODER_PATCH_KEY not in out:
        raise UserError(
            f"the input is not a reference Hi-End-MAE checkpoint: no '{ENCODER_PATCH_KEY}' "
            "(with or without the 'module.' prefix) among its keys"
        )
    bad = [k for k, v in out.items() if (k.startswith(("encoder.", "decoder.", "encoder_to_decoder."))
                                         or k in ("encoder_pos_embed", "mask_token")) and not torch.is_tensor(v)]
    if bad:
        raise UserError(f"the input's entry {bad[0]!r} is not a tensor: not a reference Hi-End-MAE checkpoint")
    return out


def _indices(sd: dict, prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})


def _count(sd: dict, prefix: str, what: str) -> int:
    idx = _indices(sd, prefix)
    if idx != list(range(len(idx))):
        raise UserError(f"the input's {what} are not numbered 0..n-1 (found {idx}): the checkpoint is incomplete")
    return len(idx)


def infer_architecture(sd: dict[str, torch.Tensor], arch: str | None = None) -> tuple[str, int, int]:
    """``(preset, in_channels, token_size)`` read from the tensor shapes, checked against ``arch`` if given."""
    w = sd[ENCODER_PATCH_KEY]
    if w.ndim != 5 or not (w.shape[2] == w.shape[3] == w.shape[4]):
        raise UserError(f"'{ENCODER_PATCH_KEY}' has shape {list(w.shape)}; expected [E, C, p, p, p]")
    embed_dim, in_channels, token = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    depth = _count(sd, "encoder.blocks.", "encoder blocks")
    found = f"embed_dim {embed_dim}, depth {depth}, token size {token}"
    matches = [name for name, p in PRESETS.items()
               if (p["embed_dim"], p["depth"], p["token_size"]) == (embed_dim, depth, token)]
    if arch is not None:
        if arch not in PRESETS:
            raise UserError(f"unknown --arch {arch!r}; choose from {', '.join(PRESETS)}")
        if arch not in matches:
            p = PRESETS[arch]
            raise UserError(
                f"--arch {arch} (embed_dim {p['embed_dim']}, depth {p['depth']}, token size {p['token_size']}) "
                f"does not match the checkpoint ({found})"
            )
        return arch, in_channels, token
    if not matches:
        raise UserError(f"the checkpoint's encoder ({found}) matches no preset ({', '.join(PRESETS)})")
    return matches[0], in_channels, token


def _check_shape(sd: dict, key: str, shape: Sequence[int]) -> None:
    if key not in sd:
        raise UserError(f"the input lacks '{key}': the checkpoint is incomplete")
    if list(sd[key].shape) != list(shape):
        raise UserError(f"'{key}' has shape {list(sd[key].shape)}; expected {list(shape)}")


def _decoder_config(sd: dict, arch: str, embed_dim: int, out_per_token: int) -> dict | None:
    """Decoder dims from the weights (``None`` when the checkpoint holds no decoder at all)."""
    if not any(k.startswith(_KEPT_PREFIXES) or k in _KEPT_KEYS for k in sd):
        return None
    norm = sd.get("decoder.norm.weight")
    if norm is None or norm.ndim != 1:
        raise UserError("the input has decoder weights but no 1-D 'decoder.norm.weight': the checkpoint is incomplete")
    dec = int(norm.numel())
    _check_shape(sd, "decoder.norm.bias", [dec])
    heads = DECODER_PRESETS[arch]["num_heads"]
    if dec % heads or dec % 6:
        raise UserError(f"decoder width {dec} is not divisible by {heads} heads and by 6 (sin-cos embedding)")
    self_depth = _count(sd, "decoder.blocks.", "decoder self-attention blocks")
    cross_depth = _count(sd, "decoder.cross_attention_blocks.", "decoder cross-attention blocks")
    n_proj = _count(sd, "encoder_to_decoder.", "encoder_to_decoder projections")
    if n_proj != 4:
        raise UserError(f"the input has {n_proj} encoder_to_decoder projections; the reference has 4")
    for i in range(4):
        _check_shape(sd, f"encoder_to_decoder.{i}.weight", [dec, embed_dim])
        _check_shape(sd, f"encoder_to_decoder.{i}.bias", [dec])
    _check_shape(sd, "mask_token", [1, 1, dec])
    _check_shape(sd, "decoder.head.weight", [out_per_token, dec])
    _check_shape(sd, "decoder.head.bias", [out_per_token])
    for i in range(self_depth):
        _check_shape(sd, f"decoder.blocks.{i}.attn.qkv.weight", [3 * dec, dec])
    for i in range(cross_depth):
        _check_shape(sd, f"decoder.cross_attention_blocks.{i}.cross_attn.kv.weight", [2 * dec, dec])
    return {"embed_dim": dec, "num_heads": heads, "self_depth": self_depth, "cross_depth": cross_depth}


def convert(obj: object, arch: str | None = None, patch_size: Sequence[int] = (REFERENCE_PATCH,) * 3,
            source: dict | None = None) -> dict:
    """Build our checkpoint dict from a loaded reference file (see the module docstring)."""
    sd = reference_state_dict(obj)
    arch, in_channels, token = infer_architecture(sd, arch)
    embed_dim = PRESETS[arch]["embed_dim"]
    if in_channels != 1:
        raise UserError(
            f"the checkpoint's encoder takes {in_channels} input channels; the reference release (and this "
            "importer's CT preprocessing metadata) has exactly one CT channel"
        )

    patch = [int(c) for c in patch_size]
    if len(patch) == 1:
        patch *= 3
    if len(patch) != 3 or any(c <= 0 or c % token for c in patch):
        raise UserError(f"--patch-size {patch} must be 1 or 3 positive multiples of the token size {token}")
    grid = [c // token for c in patch]
    n_tokens = grid[0] * grid[1] * grid[2]
    if "encoder_pos_embed" not in sd:
        raise UserError("the input lacks 'encoder_pos_embed': not a reference Hi-End-MAE checkpoint")
    pe = sd["encoder_pos_embed"].detach().float().cpu()
    if pe.ndim != 3 or pe.shape[0] != 1 or pe.shape[2] != embed_dim:
        raise UserError(f"'encoder_pos_embed' has shape {list(pe.shape)}; expected [1, L, {embed_dim}]")
    if pe.shape[1] != n_tokens:
        side = round(pe.shape[1] ** (1 / 3))
        cube = f" (a cube of {side}^3 tokens: --patch-size {side * token})" if side ** 3 == pe.shape[1] else ""
        raise UserError(
            f"'encoder_pos_embed' has {pe.shape[1]} tokens but a {'x'.join(map(str, patch))} patch with token size "
            f"{token} gives {'x'.join(map(str, grid))} = {n_tokens}; give the patch size the model was pretrained on "
            f"with --patch-size{cube}"
        )
    if torch.allclose(pe, sincos_pos_embed_3d(grid, embed_dim), atol=SINCOS_ATOL, rtol=0.0):
        enc_cfg = encoder_config(arch, in_channels=in_channels, pos_embed="sincos")
    else:
        enc_cfg = encoder_config(arch, in_channels=in_channels, pos_embed="learned", pos_embed_grid=grid)

    weights: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for k, v in sd.items():
        if k.startswith("encoder.") or k.startswith(_KEPT_PREFIXES) or k in _KEPT_KEYS:
            weights[k] = _plain(v)
        elif k != "encoder_pos_embed" and k not in _DROPPED:
            ignored.append(k)
    if enc_cfg["pos_embed"] == "learned":
        weights["encoder.pos_embed"] = pe.clone().contiguous()
    if ignored:
        _note(f"ignored {len(ignored)} unrecognised entr{'y' if len(ignored) == 1 else 'ies'}: "
              f"{', '.join(ignored[:5])}{', ...' if len(ignored) > 5 else ''}")

    # The encoder weights must load strictly into our encoder built from the stored config.
    enc_sd = {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")}
    try:
        build_encoder(enc_cfg).load_state_dict(enc_sd, strict=True)
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        raise UserError(f"the checkpoint's encoder does not fit the {arch} preset: {msg[:300]}") from None

    decoder = _decoder_config(sd, arch, embed_dim, in_channels * token ** 3)
    if decoder is None:
        _note("the checkpoint holds no decoder: the result can initialise fine-tuning but not resume pretraining")

    pretrain = {
        "datasets": [],
        "plans": None,
        "configuration": None,
        "spacing": list(RELEASE_SPACING),
        "transpose_forward": [0, 1, 2],
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "foreground_intensity_properties_per_channel": {"0": ct_window_statistics(*RELEASE_CT_WINDOW)},
        "channel_names": {"0": "CT"},
        "in_channels": in_channels,
        "patch_size": patch,
        "token_size": [token] * 3,
        "epochs_done": None,
        "epochs_planned": None,
        "fold": None,
        "source": dict(source or {}),
    }
    model = {"decoder": decoder, "settings": asdict(MaskedCropsSettings())}  # the reference's mask ratio 0.75
    return make_checkpoint(weights, enc_cfg, model, pretrain, method="hiend_mae")


def _plain(v: torch.Tensor) -> torch.Tensor:
    """A float32 CPU tensor that owns exactly its storage (so that saving it does not drag along a larger one)."""
    v = v.detach().cpu()
    if v.is_floating_point() and v.dtype != torch.float32:
        v = v.float()
    if not v.is_contiguous() or v.storage_offset() or v.untyped_storage().nbytes() != v.numel() * v.element_size():
        v = v.clone(memory_format=torch.contiguous_format)
    return v


def import_reference(inp: str | Path, out: str | Path, arch: str | None = None, force: bool = False,
                     patch_size: Sequence[int] = (REFERENCE_PATCH,) * 3, allow_unpickle: bool = True) -> dict:
    """Read ``inp`` (reference layout), write ``out`` (our format); returns the written checkpoint dict."""
    inp, out = Path(inp), Path(out)
    if out.is_dir():
        raise UserError(f"-o {out} is a folder; give the path of the checkpoint file to write")
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to overwrite it")
    obj = load_reference_file(inp, allow_unpickle=allow_unpickle)
    source = {"file": inp.name, "sha256": sha256(inp), "note": "imported from the reference Hi-End-MAE code"}
    if isinstance(obj, dict) and isinstance(obj.get("epoch"), int) and not isinstance(obj.get("epoch"), bool):
        source["epoch"] = obj["epoch"]
    ckpt = convert(obj, arch=arch, patch_size=patch_size, source=source)
    del obj
    out.parent.mkdir(parents=True, exist_ok=True)  # created, as nnU-Net creates its folders
    save_atomic(ckpt, out)
    return ckpt
