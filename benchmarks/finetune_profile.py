"""Where a fine-tuning iteration's work and memory go, per part of the network: our ``HiEndUNETR`` (plain, and as the
``_recompute`` trainer variants train it) against nnU-Net's default U-Net, built by their trainers at the same patch
and batch size.

Per part (module two levels down, e.g. ``encoder.blocks``, ``decoder2.conv_block``, ``decoder.stages``): the forward
FLOPs (PyTorch's counter) and the bytes autograd keeps from the forward for the backward (saved activations, each
storage counted once, parameters excluded). Per network: the forward + backward FLOPs, and the bytes of parameters,
gradients and AdamW state. These counts do not depend on the device (fp32; in bf16 most activations take half), so
they run on a CPU and say what a GPU must compute and hold; the time per part needs a GPU profile. One JSON line.

    python benchmarks/finetune_profile.py                              # vit_b16, 96^3 patches, batch 2 (1 min on a CPU)
    python benchmarks/finetune_profile.py --arch vit_tiny --patch-size 32 64 64
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from _measure import counted_flops
from finetune_speed import build_network, default_unet_architecture, plans_manager

from nnunetv2_hiendmae.presets import NETWORK_CLASS, encoder_config


def part_of(name: str) -> str:
    """``decoder.stages.3.convs.0`` -> ``decoder.stages``: the level the table reports."""
    return ".".join(name.split(".")[:2]) if name else "(top level, loss)"


def profile_parts(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, dict[str, int]]:
    """One forward with the loss: per part, the FLOPs of the ops it runs itself or in its children, and the bytes of
    the tensors autograd saves there (each storage once, parameters excluded)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    flops: dict[str, int] = defaultdict(int)
    saved: dict[str, int] = defaultdict(int)
    names = {m: n for n, m in model.named_modules()}
    stack, counted = [""], [0]
    counter = FlopCounterMode(display=False)

    def charge() -> None:  # the FLOPs since the last module boundary belong to the module on top of the stack
        total = counter.get_total_flops()
        flops[part_of(stack[-1])] += total - counted[0]
        counted[0] = total

    def enter(module: torch.nn.Module, _inputs) -> None:
        charge()
        stack.append(names[module])

    def leave(_module: torch.nn.Module, _inputs, _output) -> None:
        charge()
        stack.pop()

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            saved[part_of(stack[-1])] += t.untyped_storage().nbytes()
        return t

    hooks = [h for m in model.modules() for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    with sdpa_kernel(SDPBackend.MATH), counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        charge()
    for h in hooks:
        h.remove()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return {k: {"forward_flops": flops.get(k, 0), "saved_bytes": saved.get(k, 0)} for k in set(flops) | set(saved)}


def profile(model: torch.nn.Module, patch: list[int], batch: int, classes: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, 1, *patch)
    y = torch.randint(0, classes, (batch, *patch))
    parts = profile_parts(model, x, y)
    total = counted_flops(lambda: torch.nn.functional.cross_entropy(model(x), y).backward())
    model.zero_grad(set_to_none=True)
    n_params = sum(p.numel() for p in model.parameters())
    mib = 2 ** 20
    order = sorted((k for k, v in parts.items() if v["saved_bytes"] or v["forward_flops"]),
                   key=lambda k: (-parts[k]["saved_bytes"], -parts[k]["forward_flops"]))
    return {"params_m": round(n_params / 1e6, 2),
            "weights_grads_adamw_mib": round(4 * n_params * 4 / mib, 1),  # weight, gradient, 2 AdamW moments, fp32
            "saved_activations_mib": round(sum(v["saved_bytes"] for v in parts.values()) / mib, 1),
            "gflops_forward": round(sum(v["forward_flops"] for v in parts.values()) / 1e9, 2),
            "gflops_forward_backward": round(total / 1e9, 2),
            "parts": {k: {"saved_mib": round(parts[k]["saved_bytes"] / mib, 3),
                          "gflops_forward": round(parts[k]["forward_flops"] / 1e9, 4)} for k in order}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_b16", help="our ViT preset (default: %(default)s)")
    p.add_argument("--patch-size", type=int, nargs=3, default=[96, 96, 96], help="training patch (default: 96 96 96)")
    p.add_argument("--batch-size", type=int, default=2, help="patches per iteration (default: %(default)s)")
    p.add_argument("--classes", type=int, default=4, help="output classes incl. background (default: %(default)s)")
    a = p.parse_args()

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunetv2_hiendmae.trainers import nnUNetTrainerHiEndMAE_scratch, nnUNetTrainerHiEndMAE_scratch_recompute

    ours = {"network_class_name": NETWORK_CLASS,
            "arch_kwargs": {"encoder": encoder_config(a.arch), "feature_size": 16}, "_kw_requires_import": []}
    entries = [("nnUNetTrainer (default U-Net)", nnUNetTrainer, default_unet_architecture(a.patch_size, [1.0] * 3)),
               (f"HiEndUNETR {a.arch}", nnUNetTrainerHiEndMAE_scratch, ours),
               (f"HiEndUNETR {a.arch}, recompute", nnUNetTrainerHiEndMAE_scratch_recompute, ours)]
    result = {"torch": torch.__version__, "dtype": "float32", "patch_size": a.patch_size, "batch_size": a.batch_size,
              "networks": {}}
    for name, trainer, arch in entries:
        pm = plans_manager(a.patch_size, arch, a.batch_size)
        model = build_network(trainer, pm, a.classes)
        result["networks"][name] = profile(model, a.patch_size, a.batch_size, a.classes)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
