"""Mixed precision: one rule for pretraining and fine-tuning (on CUDA bf16 where the GPU computes it natively, else
fp16 with a GradScaler; fp32 elsewhere by default), and what it implies for the data: the dtype crops travel in to the
device."""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch

from nnunetv2_hiendmae.presets import PRECISIONS

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere (A100) and later; V100 (7.0) and T4 (7.5) only emulate bf16
# nnU-Net's normalisation schemes whose output stays far below float16's largest value (65,504); any other scheme
# (NoNormalization: raw PET, 16-bit MR) may not
BOUNDED_SCHEMES = frozenset({"CTNormalization", "ZScoreNormalization", "RescaleTo01Normalization",
                             "RGBTo01Normalization"})


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU of compute capability 8.0 or more. Older GPUs emulate
    it (slowly, and inductor refuses to compile it), which ``torch.cuda.is_bf16_supported()`` counts as support."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= NATIVE_BF16_CAPABILITY


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """``auto``: on CUDA bf16 where native (:func:`native_bf16`; no loss scaling needed), else fp16 (which needs a
    ``torch.amp.GradScaler``); fp32 on other devices. Raises ValueError for a name not in ``PRECISIONS``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return ("bf16" if native_bf16(device) else "fp16") if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str = "auto") -> AbstractContextManager:
    """``torch.autocast`` for a device and precision (disabled for fp32)."""
    dtype = _DTYPES.get(resolve_precision(device, precision))
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def transfer_dtype(device: torch.device, precision: str = "auto", normalization_schemes: Sequence[str] = ()) -> str:
    """The dtype crops travel in from the loader workers to the device: float16 when the run computes in mixed
    precision and every channel's nnU-Net normalisation bounds its values (:data:`BOUNDED_SCHEMES`: half the bytes to
    read, pin and copy; normalised intensities keep three significant digits), else float32 (a channel nnU-Net leaves
    unnormalised may exceed 65,504, which float16 turns into inf)."""
    mixed = resolve_precision(device, precision) != "fp32"
    return "float16" if mixed and set(normalization_schemes) <= BOUNDED_SCHEMES else "float32"
