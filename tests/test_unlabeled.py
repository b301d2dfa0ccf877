"""nnUNetv2_hiendmae_preprocess_unlabeled: image folders without labels -> a preprocessed dataset that pretraining
reads; bad files skipped and reported, resumable after a kill, and equal to nnU-Net's own preprocessing."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import cli_error, console_script, kill_tree, run_cli

from nnunetv2_hiendmae.demo.synthetic import make_case
from pretrain.unlabeled_cli import main

CMD = "nnUNetv2_hiendmae_preprocess_unlabeled"
SMALL = ["--spacing", "4", "4", "4", "--patch-size", "16", "32", "32"]


def write(arr: np.ndarray, path: Path, spacing=(3.0, 3.0, 5.0)) -> Path:
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(spacing[:arr.ndim] if arr.ndim < 4 else spacing + (1.0,))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(im, str(path))
    return path


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """4 CT-like scans in nested folders, one 2-channel case, and every kind of bad file."""
    root = tmp_path_factory.mktemp("pool") / "scans"
    rng = np.random.default_rng(7)
    for i, sub in enumerate(["siteA", "siteA", "siteB/deep", "siteB"]):
        write(make_case(rng, 0.5)[0], root / sub / f"scan{i}.nii.gz")
    (root / "siteA" / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not really a gzip file")
    whole = write(make_case(rng, 0.5)[0], root / "whole.nii.gz").read_bytes()
    (root / "whole.nii.gz").unlink()
    (root / "truncated.nii.gz").write_bytes(whole[:len(whole) // 2])  # ITK alone would read it, half zeros
    write(rng.normal(size=(40, 40)).astype(np.float32), root / "flat2d.nii.gz")
    write(rng.normal(size=(3, 10, 12, 14)).astype(np.float32), root / "fourd.nii.gz")
    nan = make_case(rng, 0.5)[0]
    nan[3, 3, 3] = np.nan
    write(nan, root / "nan.nrrd")
    write(np.full((10, 12, 14), 40.0, np.float32), root / "constant.mha")
    write((rng.normal(size=(4, 6, 6)) * 100).astype(np.float32), root / "tiny.nii.gz")  # smaller than any crop
    for c in range(2):
        write(make_case(np.random.default_rng(3), 0.5)[0], root / "multi" / f"pet_ct_{c:04d}.nii.gz")
    return root


def dataset_folder(nnunet_dirs, dataset_id: int) -> Path:
    return next(nnunet_dirs["nnUNet_preprocessed"].glob(f"Dataset{dataset_id:03d}_*"))


def test_pool_with_bad_files_becomes_a_dataset_that_pretraining_reads(pool, nnunet_dirs, tmp_path):
    proc = run_cli(CMD, "-i", str(pool), "-d", "970", "--name", "Pool", "-np", "2", *SMALL, check=True)
    folder = dataset_folder(nnunet_dirs, 970)
    assert folder.name == "Dataset970_Pool"
    skipped = json.loads((folder / "skipped.json").read_text())
    reasons = {name: entry["reason"] for name, entry in skipped.items()}
    assert set(reasons) == {"scans__siteA__corrupt", "scans__truncated", "scans__flat2d", "scans__fourd", "scans__nan",
                            "scans__constant", "scans__multi__pet_ct"}
    unreadable = "not a readable NIfTI: truncated or corrupt"
    assert reasons["scans__siteA__corrupt"] == reasons["scans__truncated"] == unreadable
    assert reasons["scans__flat2d"].startswith("not a 3D image")
    assert reasons["scans__fourd"].startswith("a 4D image (3 volumes")
    assert "NaN" in reasons["scans__nan"] and "constant" in reasons["scans__constant"]
    assert reasons["scans__multi__pet_ct"] == "has 2 channels, the dataset 1"
    assert skipped["scans__nan"]["files"] == [str((pool / "nan.nrrd").resolve())]
    assert ("5 preprocessed (0 from an earlier run), 7 skipped: 2 not a readable NIfTI: truncated or corrupt"
            in proc.stdout)

    data = folder / "nnUNetPlans_3d_fullres"
    cases = sorted(p.name[:-5] for p in data.glob("*.b2nd") if not p.name.endswith("_seg.b2nd"))
    assert cases == ["scans__siteA__scan0", "scans__siteA__scan1", "scans__siteB__deep__scan2", "scans__siteB__scan3",
                     "scans__tiny"]
    sources = json.loads((folder / "cases.json").read_text())
    assert sources["scans__siteB__deep__scan2"] == [str((pool / "siteB" / "deep" / "scan2.nii.gz").resolve())]
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["spacing"] == [4.0, 4.0, 4.0] and cfg["normalization_schemes"] == ["CTNormalization"]
    stats = plans["foreground_intensity_properties_per_channel"]["0"]
    assert -200 < stats["mean"] < 150 and stats["percentile_00_5"] > -500  # body (fat, tissue, organs, bone)
    fingerprint = json.loads((folder / "dataset_fingerprint.json").read_text())
    assert (fingerprint["foreground_intensity_properties_per_channel"]["0"] == stats
            and len(fingerprint["spacings"]) == 5)
    with open(data / "scans__siteA__scan0.pkl", "rb") as f:
        props = pickle.load(f)
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    img, seg, _, _ = nnUNetDatasetBlosc2(str(data)).load_case("scans__siteA__scan0")
    locations = props["body_locations"]
    assert 100 < len(locations) <= 10_000 and (seg[:][(0, *locations.T)] == 0).all()  # in the body mask
    body = seg[:][0] == 0
    assert 0.2 < body.mean() < 0.9 and img[:][0][body].mean() > img[:][0][~body].mean()

    out = tmp_path / "pretrain"
    run_cli("nnUNetv2_hiendmae_pretrain", "-d", "970", "-o", str(out), "--arch", "vit_tiny", "--patch-size", "16", "32",
            "32", "--batch-size", "2", "--crops-per-volume", "2", "--epochs", "1", "--iters-per-epoch", "2",
            "--num-workers", "0", "--device", "cpu", "--no-progress-bar", check=True)
    from nnunetv2_hiendmae.checkpoint import load_checkpoint

    meta = load_checkpoint(out / "checkpoint_final.pth")["pretrain"]
    assert meta["datasets"][0]["name"] == "Dataset970_Pool" and meta["spacing"] == [4.0, 4.0, 4.0]
    assert meta["foreground_intensity_properties_per_channel"]["0"] == pytest.approx(stats)

    again = run_cli(CMD, "-i", str(pool), "-d", "970", "--name", "Pool", "-np", "2", *SMALL, check=True)
    assert "5 preprocessed (5 from an earlier run)" in again.stdout  # finished cases are skipped
    other = run_cli(CMD, "-i", str(pool), "-d", "970", "--name", "Pool", "--ct-window", "-175", "250", *SMALL)
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1
    assert "preprocessed with other settings" in other.stderr


def test_kill_and_rerun_finishes_without_duplicates_or_half_files(nnunet_dirs, tmp_path):
    images = tmp_path / "images"
    rng = np.random.default_rng(11)
    for i in range(6):
        write(make_case(rng, 0.6)[0], images / f"c{i}.nii.gz")
    args = [console_script(CMD), "-i", str(images), "-d", "971", "-np", "1", "--ct-window", "-175", "250", *SMALL]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    data = nnunet_dirs["nnUNet_preprocessed"] / "Dataset971_Unlabeled" / "nnUNetPlans_3d_fullres"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(data.glob("*_seg.b2nd"))) < 2:
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be killed"
    kill_tree(proc)
    assert len([p for p in data.glob("*.b2nd") if not p.name.endswith("_seg.b2nd")]) < 6
    rerun = run_cli(CMD, *args[1:], check=True)
    assert "6 preprocessed" in rerun.stdout
    files = sorted(p.name for p in data.iterdir())
    assert files == sorted(f"images__c{i}{s}" for i in range(6) for s in (".b2nd", "_seg.b2nd", ".pkl"))
    assert not any(p.name.startswith(".staging") for p in data.parent.iterdir())


def test_parts_run_concurrently_then_a_plain_run_equal_one_run(tmp_path):
    """Parts 0 and 1 of 3 at the same time (part 2 never runs, as if its job died), into an nnUNet_preprocessed that
    does not exist yet; then the plain run: the same cases, arrays, body masks, CT statistics of the pool and content
    fingerprints as one plain run; the parts wrote no shared file but the settings."""
    images = tmp_path / "images"
    rng = np.random.default_rng(21)
    for i in range(5):
        write(make_case(rng, 0.6)[0], images / f"c{i}.nii.gz")  # more body voxels than are sampled
    whole = (images / "c0.nii.gz").read_bytes()
    (images / "cut.nii.gz").write_bytes(whole[:len(whole) // 2])
    env = {"nnUNet_preprocessed": str(tmp_path / "new" / "preprocessed")}
    flags = ["-i", str(images), "-np", "1", *SMALL]  # CT statistics of the pool: computed by each part
    parts = [subprocess.Popen([console_script(CMD), "-d", "980", *flags, "--part", str(k), "--num-parts", "3"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
             for k in (0, 1)]
    outputs = [proc.communicate(timeout=600) for proc in parts]
    assert [proc.returncode for proc in parts] == [0, 0], outputs
    assert "part 0 of 3: 2 preprocessed" in outputs[0][0] and "part 1 of 3: 2 preprocessed" in outputs[1][0]
    folder = tmp_path / "new" / "preprocessed" / "Dataset980_Unlabeled"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "hiendmae_unlabeled.json", "nnUNetPlans_3d_fullres"]  # no shared file but the settings, written once
    done = sorted(p.name[:-len("_seg.b2nd")] for p in (folder / "nnUNetPlans_3d_fullres").glob("*_seg.b2nd"))
    assert done == ["images__c0", "images__c1", "images__c3", "images__c4"]  # part K: cases K and K + 3 of c0..c4, cut

    final = run_cli(CMD, "-d", "980", *flags, env=env, check=True)  # picks up part 2's cases: c2 and cut
    assert "5 preprocessed (4 from an earlier run), 1 skipped: 1 not a readable NIfTI: truncated or corrupt" \
        in final.stdout
    run_cli(CMD, "-d", "981", *flags, env=env, check=True)
    one = folder.parent / "Dataset981_Unlabeled"
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in one.iterdir())
    assert not [p.name for f in (folder, one) for p in f.iterdir() if p.name.startswith(".")]  # no staging, samples
    for name in ("skipped.json", "cases.json", "content_fingerprints.json", "dataset_fingerprint.json"):
        assert json.loads((folder / name).read_text()) == json.loads((one / name).read_text()), name
    plans = [json.loads((f / "nnUNetPlans.json").read_text()) for f in (folder, one)]
    assert plans[0]["foreground_intensity_properties_per_channel"] == \
        plans[1]["foreground_intensity_properties_per_channel"]  # exactly: the pool's statistics, however computed
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    ours, theirs = (nnUNetDatasetBlosc2(str(f / "nnUNetPlans_3d_fullres")) for f in (folder, one))
    assert sorted(ours.identifiers) == sorted(theirs.identifiers) == [f"images__c{i}" for i in range(5)]
    for case in ours.identifiers:
        (a, a_seg, _, a_props), (b, b_seg, _, b_props) = ours.load_case(case), theirs.load_case(case)
        np.testing.assert_array_equal(a[:], b[:])
        np.testing.assert_array_equal(a_seg[:], b_seg[:])
        np.testing.assert_array_equal(a_props["body_locations"], b_props["body_locations"])
        assert a_props["content_fingerprint"] == b_props["content_fingerprint"]


def test_a_shared_file_is_written_once(tmp_path):
    """What parts rely on for the settings and the per-case samples: the first writer wins, atomically; a later
    writer is told and changes nothing (os.link fails on an existing file, even on NFS)."""
    from nnunetv2_hiendmae.fileio import atomic_write_json

    path = tmp_path / "settings.json"
    assert atomic_write_json(path, {"part": 0}, exclusive=True) is True
    assert atomic_write_json(path, {"part": 1}, exclusive=True) is False
    assert json.loads(path.read_text()) == {"part": 0} and [p.name for p in tmp_path.iterdir()] == ["settings.json"]


def test_same_arrays_as_nnunet_preprocessing(preprocessed_dataset, nnunet_dirs, tmp_path, monkeypatch):
    """--like a labelled dataset: its raw images, preprocessed without their labels, equal nnU-Net's arrays."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    run_cli(CMD, "-i", str(preprocessed_dataset["raw"] / "imagesTr"), "-d", "972", "--like",
            str(preprocessed_dataset["id"]), "-np", "2", check=True)
    ours = nnUNetDatasetBlosc2(str(dataset_folder(nnunet_dirs, 972) / "nnUNetPlans_3d_fullres"))
    theirs = nnUNetDatasetBlosc2(str(preprocessed_dataset["preprocessed"] / "nnUNetPlans_3d_fullres"))
    assert len(theirs.identifiers) == 6
    for case in theirs.identifiers:
        a, b = ours.load_case(f"imagesTr__{case}")[0][:], theirs.load_case(case)[0][:]
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)  # the same code path: equal up to float rounding
    plans = json.loads((dataset_folder(nnunet_dirs, 972) / "nnUNetPlans.json").read_text())
    base = json.loads((preprocessed_dataset["preprocessed"] / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["spacing"] == base["configurations"]["3d_fullres"]["spacing"]
    assert plans["foreground_intensity_properties_per_channel"] == base["foreground_intensity_properties_per_channel"]


def test_mr_zscore_ct_window_and_bad_flags(preprocessed_dataset, nnunet_dirs, tmp_path, capsys):
    images = tmp_path / "mr"
    rng = np.random.default_rng(5)
    for i in range(2):
        write(make_case(rng, 0.5)[0] + 1000, images / f"m{i}.nii.gz")
    run_cli(CMD, "-i", str(images), "-d", "973", "--modality", "MR", "-np", "1", *SMALL, check=True)
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    mr = nnUNetDatasetBlosc2(str(dataset_folder(nnunet_dirs, 973) / "nnUNetPlans_3d_fullres"))
    x = mr.load_case("mr__m0")[0][:]
    assert abs(x.mean()) < 0.05 and abs(x.std() - 1) < 0.05  # per-image z-score
    for argv, message in (
            (["--like", "990", "--spacing", "1", "1", "1"], "drop --spacing"),
            (["--ct-window", "250", "-175"], "LOW < HIGH"),
            (["--modality", "MR", "--ct-window", "-175", "250"], "--ct-window is for CT"),
            (["--like", "555"], "dataset '555' not found"),
            (["-d", "990"], "dataset id 990 is taken by Dataset990_HiEndTest"),
            (["--part", "0"], "--part K and --num-parts N go together"),
            (["--part", "2", "--num-parts", "2"], "--part must be in 0..1 for --num-parts 2")):
        code, lines, _ = cli_error(main, ["-i", str(images), *(argv if "-d" in argv else ["-d", "974", *argv])], capsys)
        assert code == 2 and len(lines) == 1 and message in lines[0], (argv, lines)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, lines, _ = cli_error(main, ["-i", str(empty), "-d", "974"], capsys)
    assert code == 2 and "no images" in lines[-1]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.nii.gz").write_bytes(b"nothing")
    proc = run_cli(CMD, "-i", str(bad), "-d", "974", "--ct-window", "-175", "250", "-np", "1")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("error: no case could be preprocessed: 0 preprocessed")
    assert "1 not a readable NIfTI: truncated or corrupt" in lines[-1]
    assert not list(nnunet_dirs["nnUNet_preprocessed"].glob("Dataset974_*"))  # no empty dataset left behind


def test_reader_flag_names_the_nnunet_reader_of_every_file(nnunet_dirs, tmp_path, capsys):
    """--reader picks nnU-Net's reader by name, as a dataset.json's overwrite_image_reader_writer does: the
    orientation-normalising NibabelIOWithReorient turns these SimpleITK-written (LPS) files to RAS, so the two in-plane
    axes come out flipped; the reader is recorded with the settings and the plans, and a re-run must use the same."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    images = tmp_path / "scans"
    write(make_case(np.random.default_rng(11), 0.5)[0], images / "s0.nii.gz")
    flags = ["-i", str(images), "--ct-window", "-175", "250", "-np", "1", *SMALL]
    run_cli(CMD, "-d", "976", *flags, check=True)
    run_cli(CMD, "-d", "977", *flags, "--reader", "NibabelIOWithReorient", check=True)
    default, nibabel = (nnUNetDatasetBlosc2(str(dataset_folder(nnunet_dirs, d) / "nnUNetPlans_3d_fullres"))
                        .load_case("scans__s0")[0][:] for d in (976, 977))
    np.testing.assert_allclose(nibabel, default[:, :, ::-1, ::-1], rtol=0, atol=1e-5)
    folder = dataset_folder(nnunet_dirs, 977)
    assert json.loads((folder / "hiendmae_unlabeled.json").read_text())["reader"] == "NibabelIOWithReorient"
    assert json.loads((folder / "nnUNetPlans.json").read_text())["image_reader_writer"] == "NibabelIOWithReorient"
    code, lines, _ = cli_error(main, ["-d", "977", *flags], capsys)  # the same dataset, read by another reader
    assert code == 2 and "reader" in lines[-1]
    code, lines, _ = cli_error(main, ["-d", "978", *flags, "--reader", "NoSuchIO"], capsys)
    assert code == 2 and len(lines) == 1 and "NoSuchIO is not an nnU-Net image reader" in lines[0]
