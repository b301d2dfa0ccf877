"""Hi-End-MAE pretraining throughput on the current device, printed as one JSON line.

``model``: forward + backward + AdamW step on synthetic crops (the model's ceiling).
``end_to_end``: the real data pipeline (nnU-Net preprocessed data, crops, augmentation, workers) feeding the same
steps; needs ``-d`` and ``nnUNet_preprocessed``.

    python benchmarks/pretrain_throughput.py --arch vit_tiny --batch-size 2 --crops-per-volume 4 --patch-size 32 64 64
    python benchmarks/pretrain_throughput.py --arch vit_b16 --batch-size 24 --crops-per-volume 8 --device cuda -d 1
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from nnunetv2_hiendmae.vit import encoder_config
from pretrain.hiend_mae import DECODER_PRESETS, HiEndMAE
from pretrain.train import param_groups, share_cpu_with_workers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _steps(model, opt, batches, device, dtype, n_warmup: int, n_steps: int) -> tuple[float, float]:
    """Seconds per step and peak GPU memory (GiB; 0 on CPU) over ``n_steps`` after ``n_warmup``."""
    def step(x):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _, _ = model(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    it = iter(batches)
    for _ in range(n_warmup):
        step(next(it))
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step(next(it))
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return (time.perf_counter() - t0) / n_steps, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_b16")
    p.add_argument("--patch-size", type=int, nargs=3, default=[96, 96, 96])
    p.add_argument("--batch-size", type=int, default=24, help="volumes per step")
    p.add_argument("--crops-per-volume", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("-d", "--datasets", nargs="*", default=[], help="nnU-Net dataset ids for the end-to-end measurement")
    p.add_argument("--num-workers", type=int, default=8)
    a = p.parse_args()

    device = torch.device(a.device)
    if device.type == "cpu":
        share_cpu_with_workers(a.num_workers if a.datasets else 0)
    precision = a.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else None
    crops = a.batch_size * a.crops_per_volume
    model = HiEndMAE(encoder_config(a.arch), DECODER_PRESETS[a.arch]).to(device)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    result = {"arch": a.arch, "patch_size": a.patch_size, "crops_per_step": crops, "device": a.device,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "precision": precision, "threads": torch.get_num_threads()}

    x = torch.randn(crops, 1, *a.patch_size, device=device)
    sec, peak = _steps(model, opt, iter(lambda: x, None), device, dtype, a.warmup, a.steps)
    result["model_only"] = {"s_per_step": round(sec, 4), "crops_per_s": round(crops / sec, 2), "peak_mem_gib": round(peak, 2)}

    if a.datasets:
        from pretrain.data import PretrainCrops, make_loader, resolve_sources

        data = PretrainCrops(resolve_sources(a.datasets), a.patch_size, a.crops_per_volume,
                             (a.warmup + a.steps) * a.batch_size, seed=0)
        loader = make_loader(data, a.batch_size, a.num_workers, device.type)
        batches = (b.to(device, non_blocking=True).flatten(0, 1) for b in loader)
        sec, peak = _steps(model, opt, batches, device, dtype, a.warmup, a.steps)
        result["end_to_end"] = {"s_per_step": round(sec, 4), "crops_per_s": round(crops / sec, 2),
                                "peak_mem_gib": round(peak, 2), "num_workers": a.num_workers}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
