"""Which precision a run computes in, by GPU kind, and what it implies for the data (CPU: the GPU's compute capability
is stood in for; tests/test_cuda.py runs it on a real GPU)."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import copy_preprocessed_dataset

from nnunetv2_hiendmae.precision import resolve_precision, transfer_dtype

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize(("gpu", "capability", "expected"), [("V100", (7, 0), "fp16"), ("T4", (7, 5), "fp16"),
                                                             ("A100", (8, 0), "bf16"), ("H100", (9, 0), "bf16")])
def test_auto_is_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, gpu, capability, expected):
    """V100 and T4 only emulate bf16 (slow, and inductor refuses to compile it): fp16 with a GradScaler there."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_precision(CUDA, "auto") == expected
    assert resolve_precision(CUDA, "fp32") == "fp32" and resolve_precision(torch.device("cpu"), "auto") == "fp32"


def test_channels_nnunet_leaves_unnormalised_travel_in_float32():
    """float16 turns a raw PET or 16-bit MR value above 65,504 into inf: such channels are sent in float32."""
    bounded = ["CTNormalization", "ZScoreNormalization"]
    assert transfer_dtype(CUDA, "bf16", bounded) == "float16"
    assert transfer_dtype(CUDA, "bf16", [*bounded, "NoNormalization"]) == "float32"
    assert transfer_dtype(CUDA, "fp32", bounded) == "float32"
    assert torch.tensor([70_000.0]).to(getattr(torch, transfer_dtype(CUDA, "fp16", ["NoNormalization"]))).isfinite()


def test_a_run_on_an_unnormalised_dataset_reads_its_crops_in_float32(preprocessed_dataset, tmp_path, monkeypatch):
    """The run asks for the transfer dtype with the normalisation schemes of its datasets."""
    from pretrain.config import PretrainConfig
    from pretrain.train import PretrainRun

    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    raw = copy_preprocessed_dataset(preprocessed_dataset["preprocessed"], tmp_path, 983, "Raw")
    plans = json.loads((raw / "nnUNetPlans.json").read_text())
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["NoNormalization"]
    (raw / "nnUNetPlans.json").write_text(json.dumps(plans))
    copy_preprocessed_dataset(preprocessed_dataset["preprocessed"], tmp_path, 984, "Normalised")
    dtypes = []
    for dataset in ("984", "983"):
        cfg = PretrainConfig(datasets=[dataset], output_dir=str(tmp_path / dataset), arch="vit_tiny",
                             patch_size=[16, 32, 32], batch_size=2, device="cpu", precision="bf16", num_workers=0,
                             progress_bar=False)
        dtypes.append(PretrainRun(cfg).data.crops.dtype)
    assert dtypes == [torch.float16, torch.float32]
