"""Timing and peak-memory helpers shared by the benchmark scripts (GPU: allocator peak; CPU: sampled RSS)."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform
import threading
import time
from collections.abc import Callable

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "cpu"
    return f"{model} ({os.cpu_count()} cores)"


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc), so a CPU measurement does not start on another one's leftovers."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)
        if trim is not None:
            trim(0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakMemory:
    """Peak memory inside a ``with`` block, in GiB (``.gib``).

    CUDA: ``torch.cuda.max_memory_allocated`` (weights, optimiser state and activations on the device).
    CPU: the process's resident memory sampled every 2 ms, peak minus the level at entry, so it counts what the
    block allocates (enter it before building the model to include weights and optimiser state). Linux only;
    elsewhere ``gib`` is None.
    """

    def __init__(self, device: torch.device):
        self.device, self.gib = device, None
        self._peak = self._base = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _rss_bytes())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/statm"):
            _release_freed_memory()
            self._base = self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.gib = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            self.gib = round((self._peak - self._base) / 2**30, 3)


class Stopwatch:
    """Wall seconds of a ``with`` block, synchronising the device on both ends (``.s``)."""

    def __init__(self, device: torch.device):
        self.device, self.s = device, 0.0

    def __enter__(self) -> Stopwatch:
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.s = time.perf_counter() - self._t0


# Dense tensor-core peak of bf16/fp16 in TFLOP/s, from the vendors' data sheets (first match of the device name wins).
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """The device's bf16/fp16 peak for MFU; None on a CPU, in fp32 or on a GPU not in :data:`PEAK_TFLOPS`."""
    if device.type != "cuda" or precision == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def counted_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call of ``fn`` (matmuls, convolutions, attention; forward and backward), as
    PyTorch's ``FlopCounterMode`` counts them. Attention runs on the math kernel here, whose matmuls count on every
    device (the CPU's fused kernel has no FLOP formula); the count does not depend on the kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
