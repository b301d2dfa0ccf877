"""The benchmark scripts run as documented, measure the model they name on the data they are given, and print one
JSON line with finite, positive measurements."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BENCH, benchmark_module

from pretrain.data import resolve_sources


def _run(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.parametrize("method,extra,crops", [("hiend_mae", ["--crops-per-volume", "2"], 4), ("gl_mae", [], 16)])
def test_pretrain_throughput_model_and_end_to_end(preprocessed_dataset, method, extra, crops):
    from nnunetv2_hiendmae.presets import encoder_config
    from pretrain import methods

    datasets = [str(preprocessed_dataset["id"]), str(preprocessed_dataset["unlabelled_id"])]
    r = _run("pretrain_throughput.py", "--method", method, "--arch", "vit_tiny", "--patch-size", "16", "32", "32",
             "--batch-size", "2", "--device", "cpu", "--steps", "2", "--warmup", "1", "--num-workers", "1",
             "-d", *datasets, *extra)
    assert r["method"] == method and r["crops_per_step"] == crops and r["precision"] == "fp32"
    assert r["patch_size"] == [16, 32, 32]
    model = methods.model_class(method)(encoder_config("vit_tiny"), methods.make_settings(method, r["settings"]))
    for phase in ("model_only", "end_to_end"):
        m = r[phase]
        assert m["params"] == sum(p.numel() for p in model.parameters())  # the model named, not another one
        assert _positive(m["s_per_step"]) and _positive(m["peak_mem_gib"])
        assert abs(m["crops_per_s"] - crops / m["s_per_step"]) < 0.02 * m["crops_per_s"]
    # end to end read cases of the datasets given
    known = {f"{s.dataset_name}/{c}" for s in resolve_sources(datasets) for c in s.identifiers}
    assert r["end_to_end"]["cases"] and set(r["end_to_end"]["cases"]) <= known
    loader = r["loader_alone"]
    assert _positive(loader["crops_per_s_per_worker"]) and loader["dtype"] == "float32"
    aug = r["augmentation"]
    assert _positive(aug["s_per_step"]) and aug["dtype"] == "float32" and aug["s_per_step"] < m["s_per_step"]
    views = methods.make_settings(method, r["settings"]).views([16, 32, 32])
    assert aug["bytes_per_step"] == 4 * 2 * sum(n * math.prod(size) for n, size in views.values())  # 2 volumes
    assert loader["bytes_per_crop"] == 16 * 32 * 32 * 4 if method == "hiend_mae" else loader["bytes_per_crop"] > 0


def test_loader_throughput_times_each_step_on_the_datasets_given(preprocessed_dataset):
    r = _run("loader_throughput.py", "-d", str(preprocessed_dataset["id"]), str(preprocessed_dataset["unlabelled_id"]),
             "--patch-size", "16", "32", "32", "--crops-per-volume", "2", "--batch-size", "2", "--num-workers", "1",
             "--batches", "2", "--crops", "8")
    assert r["datasets"] == [preprocessed_dataset["name"], preprocessed_dataset["unlabelled_name"]]
    steps = r["per_crop_ms"]
    assert all(_positive(steps[k]) for k in ("centre_by_probing", "read", "cpu_augmentation"))
    assert _positive(steps["centre_from_body_locations"])  # the unlabelled pool carries body locations
    loader = r["loader"]
    assert all(_positive(loader[k]) for k in ("crops_per_s_per_worker_now", "crops_per_s_per_worker_now_float16",
                                               "crops_per_s_per_worker_with_cpu_augmentation",
                                               "ratio_now_to_before", "ratio_now_float16_to_before"))
    assert r["bytes_per_crop"] == {"float32": 16 * 32 * 32 * 4, "float16_for_gpu": 16 * 32 * 32 * 2}


def test_embed_throughput_runs_the_command_on_the_scans_it_writes(tmp_path):
    r = _run("embed_throughput.py", "--arch", "vit_tiny", "-n", "2", "--scale", "0.4", "--patch-size", "32", "64", "64",
             "-np", "1", "--work-dir", str(tmp_path))
    assert (r["arch"], r["scans"], list(r["runs"])) == ("vit_tiny", 2, ["np1"])
    run = r["runs"]["np1"]
    assert run["cases"] == 2 and len(list((tmp_path / "out_vit_tiny_np1").glob("*.npz"))) == 2
    assert all(_positive(run[k]) for k in ("cases_per_s", "cases_per_s_with_startup", "peak_memory_gib"))
    assert run["cases_per_s_with_startup"] < run["cases_per_s"] and 0 <= run["encoder_waited_s"] <= run["loop_s"]


def test_make_scans_writes_ct_like_volumes_of_the_size_asked(tmp_path):
    import SimpleITK as sitk

    proc = subprocess.run([sys.executable, str(BENCH / "make_scans.py"), "-o", str(tmp_path), "-n", "2", "--scale",
                           "0.4"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    scans = sorted(tmp_path.glob("scan_*.nii.gz"))
    assert [s.name for s in scans] == ["scan_000.nii.gz", "scan_001.nii.gz"]
    image = sitk.ReadImage(str(scans[0]))
    size_mm = [n * s for n, s in zip(image.GetSize(), image.GetSpacing())]
    assert 0.4 * 180 < size_mm[0] < 0.4 * 260 and 0.4 * 110 < size_mm[2] < 0.4 * 180  # the demo's field of view x 0.4
    values = sitk.GetArrayFromImage(image)
    assert values.min() < -900 and values.max() > 500  # air and bone: CT-like


def test_finetune_speed_ratios_to_default_unet():
    from nnunetv2_hiendmae.network import HiEndUNETR
    from nnunetv2_hiendmae.presets import encoder_config

    r = _run("finetune_speed.py", "--arch", "vit_tiny", "--primus", "S", "--patch-size", "16", "32", "32",
             "--batch-size", "1", "--case-size", "20", "40", "40", "--device", "cpu", "--steps", "1", "--warmup", "1")
    nets = r["networks"]
    assert set(nets) == {"nnUNetTrainer (default U-Net)", "Primus-S", "HiEndUNETR vit_tiny",
                         "HiEndUNETR vit_tiny, recompute"}
    assert nets["nnUNetTrainer (default U-Net)"]["class"].endswith(".PlainConvUNet")
    assert nets["Primus-S"]["class"].endswith(".Primus")
    ours = nets["HiEndUNETR vit_tiny"]
    assert ours["class"] == "nnunetv2_hiendmae.network.HiEndUNETR"
    assert ours["params"] == sum(
        p.numel() for p in HiEndUNETR(1, 4, (16, 32, 32), encoder_config("vit_tiny")).parameters())
    default = nets["nnUNetTrainer (default U-Net)"]
    for name, m in nets.items():
        assert all(_positive(m[k]) for k in ("params_m", "s_per_iter", "peak_mem_gib", "sliding_window_s")), (name, m)
        ratio = r["ratios_to_default"][name]
        assert abs(ratio["s_per_iter"] - m["s_per_iter"] / default["s_per_iter"]) <= 0.01
    assert r["ratios_to_default"]["nnUNetTrainer (default U-Net)"]["s_per_iter"] == 1.0
    report = benchmark_module("gpu_figures").report([{"step": "finetune_eager", "rc": 0, "s": 1.0, "result": r}])
    ratio = r["ratios_to_default"]["HiEndUNETR vit_tiny"]["s_per_iter"]
    assert f"| HiEndUNETR vit_tiny | {ours['s_per_iter']} ({ratio}x) |" in report


def test_counted_flops_equal_the_vit_formula_attention_included():
    """The FLOPs behind the MFU figure: a ViT's forward + backward, attention counted on the CPU too."""
    from nnunetv2_hiendmae.vit import ViTEncoder3D

    b, c, e, depth, token, shape = 3, 2, 48, 2, (4, 4, 2), (8, 8, 4)
    enc = ViTEncoder3D(in_channels=c, embed_dim=e, depth=depth, num_heads=4, token_size=token)
    x = torch.randn(b, c, *shape)
    n = 2 * 2 * 2  # tokens
    t = n + 1  # with CLS
    embed = 2 * b * n * (4 * 4 * 2 * c) * e  # one GEMM of the patches
    blocks = depth * (24 * b * t * e * e + 4 * b * t * t * e)  # qkv, proj, 2 MLP layers; q k^T and attn v
    flops = benchmark_module("_measure").counted_flops(lambda: enc(x)[0].sum().backward())
    # backward: twice the forward, except the embedding, whose input needs no gradient
    assert flops == 3 * blocks + 2 * embed


def fake_reference(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in for the reference checkout (its builder, a dependency found only on the pinned path given for it,
    a model that checks it gets the crops it was built for) and that pinned path."""
    ref, pinned = tmp_path / "Hi-End-MAE", tmp_path / "pinned"
    ref.mkdir()
    pinned.mkdir()
    (pinned / "pinned_dep.py").write_text("SCALE = 2.0\n")
    (ref / "hi_end_mae.py").write_text(
        "import torch\nimport pinned_dep\n\n\n"
        "class Model(torch.nn.Module):\n"
        "    def __init__(self, args):\n"
        "        super().__init__()\n"
        "        self.w = torch.nn.Parameter(torch.ones(args.patch_size, args.img_size))\n\n"
        "    def forward(self, x, return_image=False):\n"
        "        assert not return_image and x.shape[1:] == (1, self.w.shape[1], self.w.shape[1], self.w.shape[1])\n"
        "        return (x.mean() * self.w * pinned_dep.SCALE).sum()\n\n\n"
        "def build_vit_base_hi_end_mae_p16_3d(args):\n"
        "    print(args)  # the reference prints its model\n"
        "    return Model(args)\n")
    return ref, pinned


def test_pretrain_throughput_runs_the_reference_code_side_by_side(tmp_path):
    """--reference builds the model with the reference's own builder, in the Python path given for it, on the same
    crops per step; the ratio is ours over the reference's crops/s."""
    ref, pinned = fake_reference(tmp_path)
    r = _run("pretrain_throughput.py", "--arch", "vit_b16", "--patch-size", "32", "32", "32", "--batch-size", "2",
             "--crops-per-volume", "1", "--device", "cpu", "--steps", "1", "--warmup", "1",
             "--reference", str(ref), "--reference-pythonpath", str(pinned))
    theirs = r["reference"]
    assert theirs["code"] == "reference" and theirs["crops_per_step"] == r["crops_per_step"] == 2
    assert theirs["model_only"]["params"] == 16 * 32  # the reference's model: token 16 for vit_b16, crops of 32
    assert _positive(theirs["model_only"]["crops_per_s"])
    assert r["model_only_to_reference"] == pytest.approx(
        r["model_only"]["crops_per_s"] / theirs["model_only"]["crops_per_s"], abs=6e-4)
    assert r["model_only"]["gflops_per_crop"] > 0 and r["model_only"]["mfu"] is None  # no known peak on a CPU
    report = benchmark_module("gpu_figures").report([{"step": "model_only_eager", "rc": 0, "s": 1.0, "result": r}])
    assert f"| the reference code | {theirs['model_only']['crops_per_s']} |" in report
    ratio = r["model_only"]["crops_per_s"] / theirs["model_only"]["crops_per_s"]
    assert f"| ours eager / reference (target 1: >= 2) | {ratio:.2f} |" in report


def test_finetune_profile_accounts_for_work_and_memory_per_part():
    """Saved activations and FLOPs land on the part that produces them, and the parts add up to the network."""
    r = _run("finetune_profile.py", "--arch", "vit_tiny", "--patch-size", "16", "32", "32", "--batch-size", "1")
    assert set(r["networks"]) == {"nnUNetTrainer (default U-Net)", "HiEndUNETR vit_tiny",
                                  "HiEndUNETR vit_tiny, recompute"}
    mib_16_channels = 16 * 16 * 32 * 32 * 4 / 2**20  # one fp32 full-resolution tensor of 16 channels: 1 MiB
    for name, net in r["networks"].items():
        parts = net["parts"]
        assert sum(p["saved_mib"] for p in parts.values()) == pytest.approx(net["saved_activations_mib"], abs=0.05)
        assert sum(p["gflops_forward"] for p in parts.values()) == pytest.approx(net["gflops_forward"], abs=0.01)
        if "recompute" not in name:
            assert 2 * net["gflops_forward"] < net["gflops_forward_backward"] <= 3 * net["gflops_forward"]
        assert net["weights_grads_adamw_mib"] == pytest.approx(16 * net["params_m"] * 1e6 / 2**20, rel=0.01)
    ours = r["networks"]["HiEndUNETR vit_tiny"]["parts"]
    # UNETR's first block on the 1-channel input: MONAI's residual block keeps the input and five 16-channel tensors
    # (conv1, norm1, conv2, conv3 outputs and the residual sum) for its backward, plus per-channel norm statistics
    assert ours["encoder1.layer"]["saved_mib"] == pytest.approx(5 * mib_16_channels + mib_16_channels / 16, abs=0.002)
    # the patch embedding: one GEMM of the 4 patches of 16^3 voxels onto 96 channels
    assert ours["encoder.patch_embed"]["gflops_forward"] == pytest.approx(2 * 4 * 16**3 * 96 / 1e9, abs=1e-4)
    recomputed = r["networks"]["HiEndUNETR vit_tiny, recompute"]
    plain = r["networks"]["HiEndUNETR vit_tiny"]
    assert recomputed["parts"]["encoder1.layer"]["saved_mib"] == 0  # recomputed in the backward: nothing of it kept
    assert recomputed["saved_activations_mib"] < plain["saved_activations_mib"] - ours["encoder1.layer"]["saved_mib"]
    assert recomputed["gflops_forward"] == plain["gflops_forward"]
    twice = sum(v["gflops_forward"] for k, v in ours.items() if k.split(".")[0] in ("encoder1", "decoder2"))
    assert recomputed["gflops_forward_backward"] == pytest.approx(plain["gflops_forward_backward"] + twice, abs=0.01)
    unet = r["networks"]["nnUNetTrainer (default U-Net)"]["parts"]
    assert unet["encoder.stages"]["saved_mib"] > 0 and unet["decoder.stages"]["gflops_forward"] > 0
