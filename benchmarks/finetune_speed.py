"""Fine-tuning cost of our ViT-UNETR (also as the ``_recompute`` trainer variants train it) against nnU-Net's default
network and a Primus network, side by side.

All networks are built by their trainers' own ``build_network_architecture`` from one synthetic plans file (nnU-Net's
topology rule for the default U-Net), at the same patch and batch size, in one process. Per network: seconds per
training iteration (forward, loss, backward, a step of the trainer's own optimiser: SGD with Nesterov momentum for
nnU-Net's default, AdamW for Primus and ours), peak memory (GPU allocator peak; on CPU the process's resident-memory
growth, approximate), and nnU-Net's sliding-window inference time for one case; then the ratios to nnU-Net's default.
One JSON line. ``finetune_profile.py`` breaks the work and memory down per part of the networks.

    python benchmarks/finetune_speed.py --patch-size 32 64 64 --batch-size 2 --case-size 48 96 96 \\
        --arch vit_tiny --primus S
    python benchmarks/finetune_speed.py --device cuda            # vit_b16, 96^3 patches, batch 2, Primus-M
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from functools import partial

import torch
from _measure import PeakMemory, Stopwatch, device_name

from nnunetv2_hiendmae.precision import autocast, resolve_precision
from nnunetv2_hiendmae.presets import NETWORK_CLASS, encoder_config

NETWORKS = ("default", "primus", "ours", "recompute")  # nnU-Net's default U-Net, Primus, HiEndUNETR, its variant


def default_unet_architecture(patch_size: list[int], spacing: list[float]) -> dict:
    """nnU-Net's 3d_fullres PlainConvUNet for this patch size, by its own topology rule."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    _, pools, kernels, patch, _ = get_pool_and_conv_props(spacing, patch_size, 4, 999999)
    n = len(pools)
    return {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": n, "features_per_stage": [min(32 * 2 ** i, 320) for i in range(n)],
                            "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": kernels, "strides": pools,
                            "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-5, "affine": True},
                            "dropout_op": None, "dropout_op_kwargs": None,
                            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def plans_manager(patch_size: list[int], architecture: dict, batch_size: int):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cfg = {"data_identifier": "bench", "preprocessor_name": "DefaultPreprocessor", "batch_size": batch_size,
           "patch_size": patch_size, "median_image_size_in_voxels": patch_size, "spacing": [1.0, 1.0, 1.0],
           "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
           "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
           "resampling_fn_probabilities": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": {},
           "resampling_fn_seg_kwargs": {}, "resampling_fn_probabilities_kwargs": {}, "architecture": architecture,
           "batch_dice": False}
    return PlansManager({"dataset_name": "Dataset999_Bench", "plans_name": "bench",
                         "original_median_spacing_after_transp": [1, 1, 1],
                         "original_median_shape_after_transp": patch_size, "image_reader_writer": "SimpleITKIO",
                         "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
                         "configurations": {"3d_fullres": cfg},
                         "experiment_planner_used": "bench", "label_manager": "LabelManager",
                         "foreground_intensity_properties_per_channel": {}})


def build_network(trainer: type, plans_manager, classes: int) -> torch.nn.Module:
    """The network as ``trainer`` trains it, by its ``build_network_architecture`` (one input channel)."""
    return trainer.build_network_architecture(plans_manager, plans_manager.get_configuration("3d_fullres"), 1,
                                              classes, False)


Optimizer = Callable[[Iterable[torch.nn.Parameter], torch.device], torch.optim.Optimizer]


def nnunet_sgd(params: Iterable[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """nnU-Net's default trainer: SGD, lr 1e-2, Nesterov momentum 0.99, weight decay 3e-5 (one state buffer)."""
    return torch.optim.SGD(params, 1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)


def adamw(betas: tuple[float, float]) -> Optimizer:
    """AdamW as the Primus trainers and ours run it (two state buffers; fused on CUDA)."""
    return lambda params, device: torch.optim.AdamW(params, 1e-4, betas=betas, weight_decay=0.05,
                                                    fused=device.type == "cuda")


def measure(build: Callable[[], torch.nn.Module], optimizer: Optimizer, patch: list[int], batch: int, classes: int,
            case: list[int], device: torch.device, steps: int, warmup: int, compile_: bool = False) -> dict:
    """Training iteration time and peak memory (from building the network on), then sliding-window time for one case;
    ``compile_``: the network under ``torch.compile``, as nnU-Net runs it when ``nnUNet_compile`` is on."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with PeakMemory(device) as mem:
        torch.manual_seed(0)
        model = build().to(device)
        net = torch.compile(model) if compile_ else model
        opt = optimizer(model.parameters(), device)
        x = torch.randn(batch, 1, *patch, device=device)
        y = torch.randint(0, classes, (batch, *patch), device=device)
        loss_fn = torch.nn.CrossEntropyLoss()

        def step() -> None:
            with autocast(device):
                out = net(x)
                out = out[0] if isinstance(out, (list, tuple)) else out
                loss = loss_fn(out.float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(warmup):
            step()
        with Stopwatch(device) as train_clock:
            for _ in range(steps):
                step()
    net.eval()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=device,
                                perform_everything_on_device=device.type == "cuda", verbose=False, allow_tqdm=False)
    predictor.network, predictor.configuration_manager = net, type("CM", (), {"patch_size": patch})()
    predictor.label_manager = type("LM", (), {"num_segmentation_heads": classes})()
    predictor.allowed_mirroring_axes, predictor.list_of_parameters = None, None
    image = torch.randn(1, *case)
    with autocast(device):
        predictor._internal_maybe_mirror_and_predict(torch.zeros(1, 1, *patch, device=device))  # warm-up
        with Stopwatch(device) as infer_clock:
            predictor.predict_sliding_window_return_logits(image)
    params = sum(p.numel() for p in model.parameters())
    network_class = f"{type(model).__module__}.{type(model).__qualname__}"
    return {"class": network_class, "params": params, "params_m": round(params / 1e6, 2),
            "s_per_iter": round(train_clock.s / steps, 4),
            "peak_mem_gib": mem.gib, "sliding_window_s": round(infer_clock.s, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_b16", help="our ViT preset (default: %(default)s)")
    p.add_argument("--primus", default="M", choices=["S", "B", "M", "L"], help="Primus size (default: %(default)s)")
    p.add_argument("--patch-size", type=int, nargs=3, default=[96, 96, 96], help="training patch (default: 96 96 96)")
    p.add_argument("--batch-size", type=int, default=2, help="patches per iteration (default: %(default)s)")
    p.add_argument("--classes", type=int, default=4, help="output classes incl. background (default: %(default)s)")
    p.add_argument("--case-size", type=int, nargs=3, default=[160, 192, 192],
                   help="image size for sliding-window inference")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda (bf16) or cpu (fp32)")
    p.add_argument("--steps", type=int, default=10, help="timed iterations (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile every network (nnU-Net's default on CUDA)")
    p.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS),
                   help="which networks (default: all; the default U-Net is always measured, the ratios need it)")
    a = p.parse_args()

    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as base
    from nnunetv2.training.nnUNetTrainer.primus import primus_trainers

    from nnunetv2_hiendmae.trainers import nnUNetTrainerHiEndMAE_scratch, nnUNetTrainerHiEndMAE_scratch_recompute

    device = torch.device(a.device)
    ours = {"network_class_name": NETWORK_CLASS,
            "arch_kwargs": {"encoder": encoder_config(a.arch), "feature_size": 16}, "_kw_requires_import": []}
    primus = getattr(primus_trainers, f"nnUNet_Primus_{a.primus}_Trainer")
    unet = default_unet_architecture(a.patch_size, [1.0] * 3)
    entries = {"default": ("nnUNetTrainer (default U-Net)", base.nnUNetTrainer, unet, nnunet_sgd),
               "primus": (f"Primus-{a.primus}", primus, unet, adamw((0.9, 0.98))),
               "ours": (f"HiEndUNETR {a.arch}", nnUNetTrainerHiEndMAE_scratch, ours,
                        adamw(nnUNetTrainerHiEndMAE_scratch.betas)),
               "recompute": (f"HiEndUNETR {a.arch}, recompute", nnUNetTrainerHiEndMAE_scratch_recompute, ours,
                             adamw(nnUNetTrainerHiEndMAE_scratch.betas))}
    entries = [entries[k] for k in NETWORKS if k == "default" or k in a.networks]
    result = {"device": a.device, "device_name": device_name(device),
              "torch": torch.__version__, "precision": resolve_precision(device), "patch_size": a.patch_size,
              "batch_size": a.batch_size, "case_size": a.case_size, "compile": a.compile, "networks": {}}
    for name, trainer, arch, optimizer in entries:
        pm = plans_manager(a.patch_size, arch, a.batch_size)
        build = partial(build_network, trainer, pm, a.classes)
        result["networks"][name] = measure(build, optimizer, a.patch_size, a.batch_size, a.classes, a.case_size, device,
                                           a.steps, a.warmup, a.compile)
        if device.type == "cuda":  # the network measured is freed now: start the next one from an empty cache
            torch.cuda.empty_cache()
    ref = result["networks"][entries[0][0]]
    result["ratios_to_default"] = {n: {k: round(v[k] / ref[k], 2) if ref[k] else None
                                       for k in ("s_per_iter", "peak_mem_gib", "sliding_window_s")}
                                   for n, v in result["networks"].items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
