"""The demo end to end with tiny settings: every real command, then a comparison of all three trainers.

This is the project's whole workflow: nnUNetv2_plan_and_preprocess -> nnUNetv2_hiendmae_preprocess_unlabeled (a
folder of scans without labels) -> nnUNetv2_hiendmae_pretrain -> nnUNetv2_hiendmae_plan -> nnUNetv2_train (pretrained,
scratch, nnU-Net default, through nnUNetv2_hiendmae_study) -> nnUNetv2_predict -> nnUNetv2_hiendmae_compare.
"""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import run_cli

from nnunetv2_hiendmae.compare import FG_COLUMN
from nnunetv2_hiendmae.demo.pipeline import NOISE_NOTE

TRAINERS = ["nnUNetTrainerHiEndMAE_smoke", "nnUNetTrainerHiEndMAE_scratch_smoke", "nnUNetTrainerHiEndMAEBaseline_smoke"]


@pytest.mark.slow
def test_demo_pipeline_with_tiny_settings(tmp_path):
    out = tmp_path / "demo"
    args = ["nnUNetv2_hiendmae_demo", "-o", str(out), "--labelled", "5", "--unlabelled", "2", "--test", "2",
            "--scale", "0.6", "--patch-size", "16", "32", "32", "--pretrain-epochs", "2", "--pretrain-iters", "5",
            "--pretrain-batch", "2", "--schedule", "smoke", "--num-workers", "1"]
    proc = run_cli(*args, check=True, timeout=1500)
    for step in ("nnUNetv2_plan_and_preprocess", "nnUNetv2_hiendmae_preprocess_unlabeled", "nnUNetv2_hiendmae_pretrain",
                 "nnUNetv2_hiendmae_plan", "nnUNetv2_hiendmae_study", "nnUNetv2_train", "nnUNetv2_predict",
                 "nnUNetv2_hiendmae_compare"):
        assert f"$ {step}" in proc.stdout, step
    assert proc.stdout.count("$ nnUNetv2_hiendmae_plan") == 1  # the study reuses the demo's plans
    assert (out / "study" / "study.md").is_file() and (out / "study" / "learning_curve.png").is_file()
    # nnU-Net's expected lines that look like failures are explained once and hidden
    assert proc.stdout.count(NOISE_NOTE) == 1
    shown = (proc.stdout + proc.stderr).replace(NOISE_NOTE, "")
    for noise in ("not found in nnunetv2.training.nnUNetTrainer", "Searching in", "hiddenlayer",
                  "GPU prediction completed", "torch.jit.interface"):
        assert noise not in shown, noise
    # the unlabelled scans are plain images: no label maps anywhere, no copy in nnUNet_raw
    assert sorted(p.name for p in (out / "unlabelled_scans").iterdir()) == ["pool_000.nii.gz", "pool_001.nii.gz"]
    assert [p.name for p in (out / "nnUNet_raw").iterdir()] == ["Dataset501_HiEndDemo"]
    assert len(list((out / "nnUNet_preprocessed" / "Dataset502_HiEndDemoUnlabelled" / "nnUNetPlans_3d_fullres")
                    .glob("*_seg.b2nd"))) == 2  # body masks
    assert "Held-out test Dice" in proc.stdout and "comparison.png" in proc.stdout
    assert "Note: the 'smoke' schedule shows that the pipeline works" in proc.stdout  # no ranking from toy runs

    # the comparison table has all three trainers with finite fold-0 Dice
    with open(out / "comparison" / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    for trainer in TRAINERS:
        fold0 = [r for r in rows if r["entry"].startswith(f"{trainer}__") and r["fold"] == "0"]
        assert len(fold0) == 1 and math.isfinite(float(fold0[0][FG_COLUMN])), (trainer, rows)
    assert (out / "comparison" / "comparison.png").stat().st_size > 0

    # held-out predictions exist for every trainer, as label maps nnU-Net's reader opens with the image's geometry
    held_out = json.loads((out / "heldout_dice.json").read_text())
    assert set(held_out) == {"pretrained ViT", "ViT from scratch", "nnU-Net default"}
    assert all(math.isfinite(v["mean"]) for v in held_out.values())
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    images = sorted((out / "nnUNet_raw" / "Dataset501_HiEndDemo" / "imagesTs").glob("*.nii.gz"))
    assert len(images) == 2
    for trainer in TRAINERS:
        for image in images:
            pred = out / "predictions" / trainer / image.name.replace("_0000.nii.gz", ".nii.gz")
            seg, props = SimpleITKIO().read_seg(str(pred))
            assert seg.shape[1:] == sitk.GetArrayFromImage(sitk.ReadImage(str(image))).shape
            assert set(np.unique(seg)) <= {0, 1, 2, 3}

    # the pretraining left its figures; a second run skips every finished step
    assert (out / "pretrain" / "progress.png").exists() and list((out / "pretrain").glob("reconstruction_epoch_*.png"))
    again = run_cli(*args, check=True, timeout=600)
    assert "$ nnUNetv2_train" not in again.stdout and "$ nnUNetv2_hiendmae_pretrain" not in again.stdout
