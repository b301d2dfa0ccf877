"""Hi-End-MAE pretraining throughput on the current device, printed as one JSON line.

``model_only``: forward + backward + AdamW step on synthetic crops (the model's ceiling).
``end_to_end``: the real data pipeline (nnU-Net preprocessed data, crops, augmentation, workers) feeding the same
steps; needs ``-d`` and ``nnUNet_preprocessed``.
Peak memory: GPU allocator peak on CUDA; on CPU the main process's resident-memory growth from building the model to
the last step (loader workers are separate processes and not counted).

    python benchmarks/pretrain_throughput.py --arch vit_tiny --batch-size 2 --crops-per-volume 4 --patch-size 32 64 64
    python benchmarks/pretrain_throughput.py --arch vit_b16 --batch-size 24 --crops-per-volume 8 --device cuda -d 1
"""
from __future__ import annotations

import argparse
import json

import torch

from _measure import PeakMemory, Stopwatch, device_name
from nnunetv2_hiendmae.presets import encoder_config
from pretrain.hiend_mae import DECODER_PRESETS, HiEndMAE
from nnunetv2_hiendmae.optim import param_groups
from pretrain.train import share_cpu_with_workers


def measure(arch: str, batches, device: torch.device, dtype, n_warmup: int, n_steps: int) -> dict:
    """Seconds per step over ``n_steps`` after ``n_warmup``, and peak memory from building the model to the end."""
    with PeakMemory(device) as mem:
        torch.manual_seed(0)
        model = HiEndMAE(encoder_config(arch), DECODER_PRESETS[arch]).to(device)
        params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")

        def step(x: torch.Tensor) -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss, _, _ = model(x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        it = iter(batches)
        for _ in range(n_warmup):
            step(next(it))
        with Stopwatch(device) as clock:
            for _ in range(n_steps):
                step(next(it))
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"s_per_step": round(clock.s / n_steps, 4), "peak_mem_gib": mem.gib, "params": params}


def synthetic(shape: tuple[int, ...], device: torch.device):
    """The same random batch forever, allocated on first use (inside the measured block)."""
    x = torch.randn(shape, device=device)
    while True:
        yield x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_b16", help="encoder preset (default: %(default)s)")
    p.add_argument("--patch-size", type=int, nargs=3, default=[96, 96, 96], help="crop size (default: 96 96 96)")
    p.add_argument("--batch-size", type=int, default=24, help="volumes per step (default: %(default)s)")
    p.add_argument("--crops-per-volume", type=int, default=8, help="crops per volume (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    p.add_argument("-d", "--datasets", nargs="*", default=[],
                   help="nnU-Net dataset ids for the end-to-end measurement (needs nnUNet_preprocessed)")
    p.add_argument("--num-workers", type=int, default=8, help="loader worker processes (default: %(default)s)")
    a = p.parse_args()

    device = torch.device(a.device)
    if device.type == "cpu":
        share_cpu_with_workers(a.num_workers if a.datasets else 0)
    precision = a.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else None
    crops = a.batch_size * a.crops_per_volume
    result = {"arch": a.arch, "patch_size": a.patch_size, "crops_per_step": crops, "device": a.device,
              "device_name": device_name(device), "torch": torch.__version__, "precision": precision,
              "threads": torch.get_num_threads()}

    r = measure(a.arch, synthetic((crops, 1, *a.patch_size), device), device, dtype, a.warmup, a.steps)
    result["model_only"] = {**r, "crops_per_s": round(crops / r["s_per_step"], 2)}

    if a.datasets:
        from pretrain.data import PretrainCrops, make_loader, resolve_sources

        data = PretrainCrops(resolve_sources(a.datasets), a.patch_size, a.crops_per_volume,
                             (a.warmup + a.steps) * a.batch_size, seed=0)
        loader = make_loader(data, a.batch_size, a.num_workers, device.type)
        batches = (b.to(device, non_blocking=True).flatten(0, 1) for b in loader)
        r = measure(a.arch, batches, device, dtype, a.warmup, a.steps)
        result["end_to_end"] = {**r, "crops_per_s": round(crops / r["s_per_step"], 2), "num_workers": a.num_workers,
                                "cases": sorted({data.case_name(i) for i in range(len(data))})}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
