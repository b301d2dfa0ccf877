"""Content fingerprints and the leakage guard: an unlabelled pool that holds renamed copies of a training case and of
the test case of dataset 990, in other file formats, is caught by nnUNetv2_hiendmae_plan, per fold; --strict
refuses it with one line and writes nothing."""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import cli_error, run_cli, write_checkpoint

from nnunetv2_hiendmae.checkpoint import save_atomic
from nnunetv2_hiendmae.demo.synthetic import make_case
from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.leakage import (
    CHUNK,
    DOMAIN,
    check_checkpoint,
    content_fingerprint,
    dataset_fingerprints,
    pretraining_fingerprints,
)

DATASET = "Dataset990_HiEndTest"
POOL = "Dataset985_LeakyPool"
COPIED, COPY = "case_002", "pool__renamed__scan_a"  # a training case of 990, and its copy in the pool
TEST_CASE, TEST_COPY = "case_006", "pool__other__ts_copy"  # the imagesTs case of 990, and its copy


def test_fingerprint_hashes_the_values_and_shape_not_the_dtype():
    x = np.random.default_rng(0).integers(-1024, 3000, size=(1, 5, 6, 7)).astype(np.int16)
    fingerprint = content_fingerprint(x)
    # what docs/finetuning.md says is hashed, restated: domain, int64 shape, float32 values in C order
    expected = hashlib.sha256(DOMAIN + np.array(x.shape, "<i8").tobytes() + x.astype("<f4").tobytes()).hexdigest()
    assert fingerprint == expected
    assert fingerprint == content_fingerprint(x.astype(np.float32)) == content_fingerprint(x.astype(np.float64))
    assert fingerprint == content_fingerprint(np.asfortranarray(x))  # the values, not the memory layout
    changed = x.copy()
    changed[0, 4, 5, 6] += 1
    assert content_fingerprint(changed) != fingerprint
    assert content_fingerprint(x.reshape(1, 5, 7, 6)) != fingerprint  # the same values in another shape
    assert content_fingerprint(np.concatenate([x, x])) != content_fingerprint(np.concatenate([x, changed]))
    zeros = np.zeros((1, 2, 3, 4), np.float32)
    assert content_fingerprint(zeros) == content_fingerprint(-zeros)
    big = np.random.default_rng(1).normal(size=CHUNK + 1000).astype(np.float32).reshape(1, 1, 1, -1)
    assert content_fingerprint(big) == hashlib.sha256(
        DOMAIN + np.array(big.shape, "<i8").tobytes() + big.tobytes()).hexdigest()  # hashed in chunks, the same


@pytest.fixture(scope="module")
def leaky_pool(preprocessed_dataset, tmp_path_factory) -> dict:
    """A pool with a training case of 990 as float64 MetaImage, its test case as NRRD (both renamed) and one scan
    of its own, through nnUNetv2_hiendmae_preprocess_unlabeled."""
    raw, pool = preprocessed_dataset["raw"], tmp_path_factory.mktemp("leaky") / "pool"
    (pool / "renamed").mkdir(parents=True)
    (pool / "other").mkdir()
    image = sitk.ReadImage(str(raw / "imagesTr" / f"{COPIED}_0000.nii.gz"))
    sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat64), str(pool / "renamed" / "scan_a.mha"))
    sitk.WriteImage(sitk.ReadImage(str(raw / "imagesTs" / f"{TEST_CASE}_0000.nii.gz")),
                    str(pool / "other" / "ts_copy.nrrd"))
    own = sitk.GetImageFromArray(make_case(np.random.default_rng(99), 0.5)[0])
    sitk.WriteImage(own, str(pool / "fresh.nii.gz"))
    run_cli("nnUNetv2_hiendmae_preprocess_unlabeled", "-i", str(pool), "-d", "985", "--name", "LeakyPool",
            "--ct-window", "-175", "250", "--spacing", "4", "4", "4", "-np", "1", check=True)
    folder = preprocessed_dataset["preprocessed"].parent / POOL
    return {"folder": folder, "fingerprints": json.loads((folder / "content_fingerprints.json").read_text())}


def test_pool_fingerprints_match_the_dataset_cases_they_copy(leaky_pool):
    pool = leaky_pool["fingerprints"]
    train, test = dataset_fingerprints(990, "imagesTr", 1), dataset_fingerprints(990, "imagesTs", 1)
    assert sorted(train) == [f"case_{i:03d}" for i in range(6)] and sorted(test) == [TEST_CASE]
    assert sorted(pool) == ["pool__fresh", TEST_COPY, COPY]
    assert pool[COPY] == train[COPIED] and pool[TEST_COPY] == test[TEST_CASE]
    assert pool["pool__fresh"] not in {*train.values(), *test.values()}
    with open(leaky_pool["folder"] / "nnUNetPlans_3d_fullres" / f"{COPY}.pkl", "rb") as f:
        assert pickle.load(f)["content_fingerprint"] == pool[COPY]  # stored with the case too
    assert pretraining_fingerprints(985) == pool  # from the pool's file, no image read
    assert pretraining_fingerprints(990, [COPIED, "case_004"], 1) == {c: train[c] for c in (COPIED, "case_004")}


def splits_of_990(preprocessed_dataset) -> list[dict]:
    """nnU-Net's folds: its splits_final.json if a training wrote one, else what its trainer would write."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    path = preprocessed_dataset["preprocessed"] / "splits_final.json"
    cases = [f"case_{i:03d}" for i in range(6)]
    return json.loads(path.read_text()) if path.is_file() else generate_crossval_split(cases, seed=12345, n_splits=5)


def checkpoint(path: Path, preprocessed_dataset, **pretrain) -> Path:
    """conftest's checkpoint with its pretrain block changed (datasets, case_fingerprints, fold)."""
    write_checkpoint(path, preprocessed_dataset["preprocessed"])
    ckpt = torch.load(path, weights_only=True)
    ckpt["pretrain"].update(pretrain)
    save_atomic(ckpt, path)
    return path


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_plan_names_the_leaked_case_and_fold_and_strict_refuses(leaky_pool, preprocessed_dataset, tmp_path, capsys):
    from nnunetv2_hiendmae.plans import main as plan_main

    ckpt = checkpoint(tmp_path / "pool.pth", preprocessed_dataset, datasets=[POOL],
                      case_fingerprints=leaky_pool["fingerprints"])
    fold = next(f for f, split in enumerate(splits_of_990(preprocessed_dataset)) if COPIED in split["val"])
    proc = run_cli("nnUNetv2_hiendmae_plan", "-d", "990", "-pt", str(ckpt), "-o", "T_leak", "-np", "1", check=True)
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert f"warning:   fold {fold} validation: {COPIED} (as {COPY})" in warning, proc.stderr
    assert f"warning:   imagesTs: {TEST_CASE} (as {TEST_COPY})" in warning
    assert f"the pretraining saw 2 validation or test case(s) of {DATASET}" in warning[0]
    assert sum("validation:" in line for line in warning) == 1  # no other fold
    folder = preprocessed_dataset["preprocessed"]
    assert (folder / "T_leak.json").is_file()  # a warning, not an error

    before = snapshot(folder)
    code, err, out = cli_error(plan_main, ["-d", "990", "-pt", str(ckpt), "-o", "T_leak_strict", "-np", "1",
                                           "--strict"], capsys)
    lines = [line for line in err if line.strip() and not line.startswith("content finger")]
    assert code == 2 and len(lines) == 1 and not out, err  # progress bars aside
    assert lines[0] == (f"error: the pretraining saw 2 validation or test case(s) of {DATASET} (--strict): "
                        f"fold {fold} validation: {COPIED}; imagesTs: {TEST_CASE}")
    assert snapshot(folder) == before and not (folder / "T_leak_strict.json").exists()


def test_pretraining_on_fold_f_is_confirmed_by_content_for_fold_f(preprocessed_dataset):
    """A checkpoint pretrained on dataset 990 with --fold F: only fold F is checked, and by content, so a copy of
    a fold-F validation case hidden under another name is still found."""
    splits = splits_of_990(preprocessed_dataset)
    fold = 1
    train = dataset_fingerprints(990, "imagesTr", 1)
    recorded = {f"{DATASET}/{case}": train[case] for case in splits[fold]["train"]}
    pretrain = {"datasets": [{"name": DATASET}], "fold": fold, "case_fingerprints": recorded}
    warnings, notes = check_checkpoint(pretrain, DATASET, strict=True, processes=1)
    assert warnings == []
    assert f"use these plans for fold {fold} only" in notes[0]
    assert notes[1].startswith(f"leakage guard: no validation case of fold(s) {fold} and no imagesTs case")
    _, notes = check_checkpoint(pretrain, DATASET, strict=True, processes=1, scored_folds=[fold])  # a score on F
    assert len(notes) == 1 and notes[0].startswith(f"leakage guard: no validation case of fold(s) {fold} of")
    test_copy = {"other_pool/ts": next(iter(dataset_fingerprints(990, "imagesTs", 1).values()))}
    with pytest.raises(UserError, match="imagesTs: "):  # the plans' check names a test-image copy ...
        check_checkpoint({**pretrain, "case_fingerprints": {**recorded, **test_copy}}, DATASET, strict=True,
                         processes=1)
    warnings, _ = check_checkpoint({**pretrain, "case_fingerprints": {**recorded, **test_copy}}, DATASET,
                                   strict=True, processes=1, scored_folds=[fold])
    assert warnings == []  # ... a score on fold F's validation cases does not read the test images

    hidden = splits[fold]["val"][0]
    pretrain["case_fingerprints"] = {**recorded, "other_pool/x": train[hidden]}
    warnings, _ = check_checkpoint(pretrain, DATASET, processes=1)
    assert warnings[1] == f"  fold {fold} validation: {hidden} (as other_pool/x)"
    with pytest.raises(UserError, match=f"fold {fold} validation: {hidden}$"):
        check_checkpoint(pretrain, DATASET, strict=True, processes=1)


def test_checkpoints_without_fingerprints(preprocessed_dataset):
    """Older checkpoints: a note that the content cannot be checked; pretrained on the target dataset itself (no
    fold): every fold's validation cases are named, by name."""
    splits = splits_of_990(preprocessed_dataset)
    warnings, notes = check_checkpoint({"datasets": ["Dataset991_HiEndTestUnlabelled"]}, DATASET, processes=1)
    assert warnings == [] and "records no content fingerprints" in notes[0] and len(notes) == 1
    warnings, notes = check_checkpoint({"datasets": [DATASET], "fold": None}, DATASET, processes=1)
    assert warnings[0].startswith(f"the pretraining saw 6 validation or test case(s) of {DATASET}")
    for f, split in enumerate(splits):
        assert f"  fold {f} validation: " + ", ".join(f"{c} (as {DATASET}/{c})" for c in sorted(split["val"])) \
            in warnings
    assert "checked by name" in notes[0]
