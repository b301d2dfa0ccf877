"""Mixed precision: one rule for pretraining and fine-tuning (bf16 autocast on CUDA, fp32 elsewhere by default), and
what it implies for the data: the dtype crops travel in to the device."""
from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from nnunetv2_hiendmae.presets import PRECISIONS

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """``auto`` is bf16 on CUDA (no loss scaling needed, the fast path on current GPUs) and fp32 on other devices."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str = "auto") -> AbstractContextManager:
    """``torch.autocast`` for a device and precision (disabled for fp32)."""
    dtype = _DTYPES.get(resolve_precision(device, precision))
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def transfer_dtype(device: torch.device, precision: str = "auto") -> str:
    """The dtype crops travel in from the loader workers to the device: float16 when the run computes in mixed
    precision (half the bytes to read, pin and copy; nnU-Net's normalised intensities keep three significant digits),
    else float32."""
    return "float32" if resolve_precision(device, precision) == "fp32" else "float16"
