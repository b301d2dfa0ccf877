"""Files written by 0.1 keep working: a pretraining checkpoint (patch size stored as ``crop_size``) plans and
fine-tunes, and a model fine-tuned by 0.1 (segmentation head ``out.conv.conv``) continues, validates and predicts with
the real nnU-Net commands (tests/data/README.md says how the files were made)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TRAIN_ENV, make_trainer, run_cli

from nnunetv2_hiendmae.checkpoint import encoder_state_dict, load_checkpoint
from nnunetv2_hiendmae.ext import ext_path
from nnunetv2_hiendmae.plans import main as plan_main
from nnunetv2_hiendmae.trainers import nnUNetTrainerHiEndMAE_smoke

V0_1 = Path(__file__).resolve().parent / "data" / "v0_1"


def test_a_pretraining_checkpoint_of_0_1_reads_plans_and_fine_tunes(preprocessed_dataset):
    ckpt = load_checkpoint(V0_1 / "pretrain_checkpoint.pth")
    assert ckpt["pretrain"]["patch_size"] == [16, 32, 32] and "crop_size" not in ckpt["pretrain"]
    plan_main(["-d", "990", "-pt", str(V0_1 / "pretrain_checkpoint.pth"), "-o", "T_v01_pretrained",
               "--spacing", "dataset", "--normalization", "dataset"])
    folder = preprocessed_dataset["preprocessed"]
    cfg = json.loads((folder / "T_v01_pretrained.json").read_text())["configurations"]["3d_fullres"]
    assert all(s % 8 == 0 and s <= c for s, c in zip(cfg["patch_size"], [16, 32, 32]))  # within the 0.1 patch size
    trainer = make_trainer(nnUNetTrainerHiEndMAE_smoke, folder, "T_v01_pretrained")
    trainer.initialize()
    loaded = trainer.network.encoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in encoder_state_dict(ckpt).items())


def test_the_weights_of_a_model_fine_tuned_by_0_1_load_strictly_with_the_head_renamed():
    """What ``--c``, ``--val`` and ``nnUNetv2_predict`` do with 0.1's weights (``load_state_dict``), in a second: the
    head ``out.conv.conv.*`` becomes ``out.seg_layers.0.*`` and every other tensor loads under its own name."""
    from nnunetv2_hiendmae.network import HiEndUNETR

    arch = json.loads((V0_1 / "finetuned" / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"]
    stored = torch.load(V0_1 / "finetuned" / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    network = HiEndUNETR(1, 4, (16, 32, 32), **arch["arch_kwargs"])
    network.load_state_dict(stored)  # strict
    loaded = network.state_dict()
    renamed = {"out.seg_layers.0.weight": "out.conv.conv.weight", "out.seg_layers.0.bias": "out.conv.conv.bias"}
    assert set(loaded) == {({v: k for k, v in renamed.items()}).get(k, k) for k in stored}
    for key, value in loaded.items():
        assert torch.equal(value, stored[renamed.get(key, key)]), key


@pytest.mark.slow
def test_a_model_fine_tuned_by_0_1_continues_validates_and_predicts(preprocessed_dataset, nnunet_dirs, tmp_path):
    trainer, plans = "nnUNetTrainerHiEndMAE_smoke", "nnUNetPlans_v01"
    model = nnunet_dirs["nnUNet_results"] / preprocessed_dataset["name"] / f"{trainer}__{plans}__3d_fullres"
    shutil.copytree(V0_1 / "finetuned", model)
    shutil.copy(V0_1 / "finetuned" / "plans.json", preprocessed_dataset["preprocessed"] / f"{plans}.json")
    stored = torch.load(model / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    env = {"nnUNet_extTrainer": str(ext_path()), **TRAIN_ENV}
    train = ("nnUNetv2_train", "990", "3d_fullres", "0", "-tr", trainer, "-p", plans, "-device", "cpu")

    run_cli(*train, "--val", env=env, check=True)
    assert "foreground_mean" in json.loads((model / "fold_0" / "validation" / "summary.json").read_text())
    out = tmp_path / "pred"
    run_cli("nnUNetv2_predict", "-i", str(preprocessed_dataset["raw"] / "imagesTs"), "-o", str(out), "-d", "990",
            "-c", "3d_fullres", "-tr", trainer, "-p", plans, "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1",
            "-nps", "1", env=env, check=True)
    assert len(list(out.glob("*.nii.gz"))) == 1
    run_cli(*train, "--c", env=env, check=True)  # the finished run, continued: re-saved in this release's names
    weights = torch.load(model / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    assert torch.equal(weights["out.seg_layers.0.weight"], stored["out.conv.conv.weight"])
    assert "out.conv.conv.weight" not in weights
