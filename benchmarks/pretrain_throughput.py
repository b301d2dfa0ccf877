"""Pretraining throughput of one method on the current device, printed as one JSON line.

``model_only``: augmentation + forward + backward + AdamW step on synthetic views in the dtype crops travel in (the
model's ceiling); ``augmentation``: that augmentation by itself.
``end_to_end``: the real data path (nnU-Net preprocessed data read by loader workers in the compact transfer dtype,
pinned, copied to the device one batch ahead, augmented there) feeding the same steps; needs ``-d`` and
``nnUNet_preprocessed``. Also the loader alone: crops/s per worker and bytes per crop moved.
Peak memory: GPU allocator peak on CUDA; on CPU the main process's resident-memory growth from building the model to
the last step (loader workers are separate processes and not counted). FLOPs per crop (forward + backward, counted
by PyTorch) and, on a GPU with a known bf16 peak, the model FLOPs utilisation (MFU) of the model-only step.
``--reference DIR``: the reference Hi-End-MAE code's step in the same run (``reference_throughput.py``), and the ratio.

    python benchmarks/pretrain_throughput.py --arch vit_tiny --batch-size 2 --crops-per-volume 4 --patch-size 32 64 64
    python benchmarks/pretrain_throughput.py --method gl_mae --arch vit_b16 --batch-size 24 --device cuda -d 1
    python benchmarks/pretrain_throughput.py --device cuda --reference /tmp/Hi-End-MAE \\
        --reference-pythonpath /tmp/timm054
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from _measure import PeakMemory, Stopwatch, counted_flops, device_name, peak_tflops

from nnunetv2_hiendmae.optim import param_groups
from nnunetv2_hiendmae.precision import autocast, resolve_precision, transfer_dtype
from nnunetv2_hiendmae.presets import encoder_config_for_patch
from pretrain import methods
from pretrain.augment import augment_views
from pretrain.build import share_cpu_with_workers
from pretrain.data import PretrainCrops, device_batches, make_loader, resolve_sources


def measure(method: str, arch: str, patch: list[int], settings, batches, device: torch.device, precision: str,
            compile_: str | None, n_warmup: int, n_steps: int) -> dict:
    """Seconds per step over ``n_steps`` after ``n_warmup``, and peak memory from building the model to the end;
    ``compile_``: the ``torch.compile`` backend, or None for eager."""
    with PeakMemory(device) as mem:
        torch.manual_seed(0)
        model = methods.model_class(method)(encoder_config_for_patch(arch, patch), settings).to(device)
        params = sum(p.numel() for p in model.parameters())
        forward = torch.compile(model, backend=compile_) if compile_ else model
        opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")

        def step(views: dict[str, torch.Tensor]) -> None:
            views = augment_views(views)
            with autocast(device, precision):
                loss = forward(views)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.step_done(0.5)

        it = iter(batches)
        for _ in range(n_warmup):
            step(next(it))
        with Stopwatch(device) as clock:
            for _ in range(n_steps):
                step(next(it))
    return {"s_per_step": round(clock.s / n_steps, 4), "peak_mem_gib": mem.gib, "params": params}


def flops_per_crop(method: str, arch: str, patch: list[int], settings, views: dict, device: torch.device) -> float:
    """Forward + backward FLOPs of one step on one volume's views, per crop (every op is per sample, so the count
    per crop does not depend on the batch size)."""
    torch.manual_seed(0)
    model = methods.model_class(method)(encoder_config_for_patch(arch, patch), settings).to(device)
    one = next(synthetic(views, 1, 1, device))
    flops = counted_flops(lambda: model(one)["loss"].backward())
    return flops / sum(n for n, _ in views.values())


def reference_side_by_side(a: argparse.Namespace, crops_per_volume: int) -> dict:
    """``reference_throughput.py`` on the same crops per step, device and step counts, in its own environment."""
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [a.reference_pythonpath, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(Path(__file__).with_name("reference_throughput.py")), "--reference", a.reference,
           "--arch", a.arch, "--patch-size", str(a.patch_size[0]), "--batch-size", str(a.batch_size),
           "--crops-per-volume", str(crops_per_volume), "--device", a.device, "--steps", str(a.steps),
           "--warmup", str(a.warmup)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"the reference code failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def synthetic(views: dict, batch: int, channels: int, device: torch.device, dtype: str = "float32"):
    """The same random views forever, in the dtype crops travel in, allocated on first use (inside the measured
    block)."""
    x = {k: torch.randn(batch, n, channels, *size, device=device).to(getattr(torch, dtype))
         for k, (n, size) in views.items()}
    while True:
        yield x


def augmentation_alone(views: dict, batch: int, device: torch.device, dtype: str, n_steps: int) -> dict:
    """The device augmentation of one step's views by itself (it is part of every step measured here), and the
    bytes of those views as they arrive."""
    x = next(synthetic(views, batch, 1, device, dtype))
    augment_views(x)
    with Stopwatch(device) as clock:
        for _ in range(n_steps):
            augment_views(x)
    return {"s_per_step": round(clock.s / n_steps, 5), "dtype": dtype,
            "bytes_per_step": sum(v.numel() * v.element_size() for v in x.values())}


def loader_alone(data, batch_size: int, num_workers: int, device_type: str, n_batches: int) -> dict:
    """The loader by itself: crops per second over ``n_batches`` after one, and bytes per crop moved."""
    loader = iter(make_loader(data, batch_size, num_workers, device_type))
    first = next(loader)
    crops = sum(v.shape[0] * v.shape[1] for v in first.values())
    nbytes = sum(v.numel() * v.element_size() for v in first.values())
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(loader)
    s = time.perf_counter() - t0
    return {"crops_per_s": round(n_batches * crops / s, 2),
            "crops_per_s_per_worker": round(n_batches * crops / s / max(1, num_workers), 2),
            "bytes_per_crop": nbytes // crops, "dtype": str(next(iter(first.values())).dtype).replace("torch.", "")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="hiend_mae", choices=list(methods.METHODS), help="(default: %(default)s)")
    p.add_argument("--arch", default="vit_b16", help="encoder preset (default: %(default)s)")
    p.add_argument("--patch-size", type=int, nargs=3, default=[96, 96, 96], help="crop size (default: 96 96 96)")
    p.add_argument("--batch-size", type=int, default=24, help="volumes per step (default: %(default)s)")
    p.add_argument("--crops-per-volume", type=int, default=None,
                   help="hiend_mae/mae: crops per volume (default: the method's, 8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model (as the CLI does on CUDA) with BACKEND (default: inductor, the CLI's; "
                        "aot_eager traces and differentiates the same graph without generating code: a CPU rehearsal)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    p.add_argument("-d", "--datasets", nargs="*", default=[],
                   help="nnU-Net dataset ids for the end-to-end measurement (needs nnUNet_preprocessed)")
    p.add_argument("--num-workers", type=int, default=8, help="loader worker processes (default: %(default)s)")
    p.add_argument("--reference", default=None,
                   help="a checkout of FengheTan9/Hi-End-MAE outside this tree: time its step too (hiend_mae, cubic "
                        "patches)")
    p.add_argument("--reference-pythonpath", default=None,
                   help="prepended to PYTHONPATH for the reference code, e.g. a folder holding timm 0.5.4, "
                        "which it pins")
    a = p.parse_args()
    if a.reference and (a.method != "hiend_mae" or len(set(a.patch_size)) != 1):
        p.error("--reference times the reference Hi-End-MAE: use it with --method hiend_mae and a cubic --patch-size")

    device = torch.device(a.device)
    if device.type == "cpu":
        share_cpu_with_workers(a.num_workers if a.datasets else 0)
    precision = resolve_precision(device, a.precision or "auto")
    given = {"crops_per_volume": a.crops_per_volume} if a.crops_per_volume else {}
    settings = methods.make_settings(a.method, given)
    views = settings.views(a.patch_size)
    crops = a.batch_size * sum(n for n, _ in views.values())
    result = {"method": a.method, "arch": a.arch, "settings": dataclasses.asdict(settings), "patch_size": a.patch_size,
              "views": {k: [n, list(s)] for k, (n, s) in views.items()}, "crops_per_step": crops,
              "device": a.device, "device_name": device_name(device), "torch": torch.__version__,
              "precision": precision, "compile": a.compile is not None,
              "compile_backend": a.compile, "threads": torch.get_num_threads()}

    flops = flops_per_crop(a.method, a.arch, a.patch_size, settings, views, device)
    if device.type == "cuda":  # the models measured are freed now: start the next one from an empty cache
        torch.cuda.empty_cache()
    dtype = transfer_dtype(device, precision)
    r = measure(a.method, a.arch, a.patch_size, settings, synthetic(views, a.batch_size, 1, device, dtype), device,
                precision, a.compile, a.warmup, a.steps)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    peak = peak_tflops(device, precision)
    result["model_only"] = {**r, "crops_per_s": round(crops / r["s_per_step"], 2),
                            "gflops_per_crop": round(flops / 1e9, 2),
                            "achieved_tflops": round(flops * crops / r["s_per_step"] / 1e12, 3), "peak_tflops": peak,
                            "mfu": round(flops * crops / r["s_per_step"] / (peak * 1e12), 4) if peak else None}
    result["augmentation"] = augmentation_alone(views, a.batch_size, device, dtype, a.steps)

    if a.datasets:
        data = PretrainCrops(resolve_sources(a.datasets), views, (a.warmup + a.steps) * a.batch_size, seed=0,
                             dtype=dtype)
        loader = make_loader(data, a.batch_size, a.num_workers, device.type)
        batches = device_batches(loader, device)  # the CLI's data path
        r = measure(a.method, a.arch, a.patch_size, settings, batches, device, precision, a.compile, a.warmup, a.steps)
        result["end_to_end"] = {**r, "crops_per_s": round(crops / r["s_per_step"], 2), "num_workers": a.num_workers,
                                "cases": sorted({data.case_name(i) for i in range(len(data))})}
        result["loader_alone"] = loader_alone(data, a.batch_size, a.num_workers, device.type, a.warmup + a.steps - 1)
    if a.reference:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["reference"] = reference_side_by_side(a, settings.crops_per_volume)
        result["model_only_to_reference"] = round(result["model_only"]["crops_per_s"]
                                                  / result["reference"]["model_only"]["crops_per_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
