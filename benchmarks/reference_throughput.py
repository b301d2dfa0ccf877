"""The reference Hi-End-MAE code's pretraining step, timed the way ``pretrain_throughput.py`` times ours; one JSON line.

The reference (github.com/FengheTan9/Hi-End-MAE) is read from a checkout outside this tree and never copied into it.
Its model is built as its ``main.py`` builds it and stepped with its own recipe (``trainer.py``): AdamW with betas
(0.9, 0.95) and weight decay 0.05 except on 1-D parameters and biases; on CUDA fp16 autocast with a GradScaler; the
same crops per step as ours (volumes x crops per volume, one cubic size). Left out, in the reference's favour: its
per-step ``loss.item()`` and its CPU data loading. Its code needs the timm it pins (0.5.4, whose ``Block`` takes
``drop=``); install that next to, not into, this environment:

    git clone https://github.com/FengheTan9/Hi-End-MAE /tmp/Hi-End-MAE
    pip install --no-deps timm==0.5.4 --target /tmp/timm054
    PYTHONPATH=/tmp/timm054 python benchmarks/reference_throughput.py --reference /tmp/Hi-End-MAE --device cuda

``pretrain_throughput.py --reference DIR --reference-pythonpath /tmp/timm054`` runs this next to its own measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch
from _measure import PeakMemory, Stopwatch, device_name

BUILDERS = {"vit_b16": ("build_vit_base_hi_end_mae_p16_3d", 16), "vit_l16": ("build_vit_large_hi_end_mae_p16_3d", 16),
            "vit_l12": ("build_vit_large_hi_end_mae_p12_3d", 12)}


def reference_model(reference: str, arch: str, size: int, mask_ratio: float) -> torch.nn.Module:
    """The reference HiEndMAE for ``arch`` on cubic crops of ``size``, built by the reference's own builder."""
    sys.path.insert(0, reference)
    import hi_end_mae  # the reference's module

    builder, token = BUILDERS[arch]
    args = argparse.Namespace(img_size=size, patch_size=token, in_chans=1, pos_embed_type="sincos",
                              mask_ratio=mask_ratio)
    with contextlib.redirect_stdout(sys.stderr):  # the builder prints the model; stdout carries the result
        return getattr(hi_end_mae, builder)(args=args)


def measure(model: torch.nn.Module, crops: int, size: int, device: torch.device, n_warmup: int, n_steps: int) -> dict:
    """Seconds per step and peak memory (weights, optimiser state, activations), as ``pretrain_throughput.measure``."""
    cuda = device.type == "cuda"
    with PeakMemory(device) as mem:
        model = model.to(device)
        decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
        no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias")]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=1e-4, betas=(0.9, 0.95))
        scaler = torch.amp.GradScaler(device.type, enabled=cuda)
        x = torch.randn(crops, 1, size, size, size, device=device)

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
                loss = model(x, return_image=False)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

        for _ in range(n_warmup):
            step()
        with Stopwatch(device) as clock:
            for _ in range(n_steps):
                step()
    return {"s_per_step": round(clock.s / n_steps, 4), "crops_per_s": round(crops * n_steps / clock.s, 2),
            "peak_mem_gib": mem.gib, "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, help="a checkout of FengheTan9/Hi-End-MAE (outside this tree)")
    p.add_argument("--arch", default="vit_b16", choices=list(BUILDERS), help="(default: %(default)s)")
    p.add_argument("--patch-size", type=int, default=96, help="cubic crop size (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=24, help="volumes per step (default: %(default)s)")
    p.add_argument("--crops-per-volume", type=int, default=8, help="crops per volume (default: %(default)s)")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="(default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (fp16 + GradScaler, the reference's recipe) or cpu (fp32)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    a = p.parse_args()

    device = torch.device(a.device)
    torch.manual_seed(0)
    model = reference_model(a.reference, a.arch, a.patch_size, a.mask_ratio)
    crops = a.batch_size * a.crops_per_volume
    import timm

    result = {"code": "reference", "arch": a.arch, "patch_size": [a.patch_size] * 3, "crops_per_step": crops,
              "device": a.device, "device_name": device_name(device), "torch": torch.__version__,
              "timm": timm.__version__, "precision": "fp16 + GradScaler" if device.type == "cuda" else "fp32",
              "model_only": measure(model, crops, a.patch_size, device, a.warmup, a.steps)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
