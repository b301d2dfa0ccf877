"""nnUNetv2_hiendmae_embed: whole-case embeddings from a pretraining or a fine-tuned nnU-Net checkpoint; the sliding
window's overlap averaging, the token map's place on the image, equality of image files and their preprocessed
dataset, resuming, bad files and bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from conftest import CROP, make_trainer, run_cli, write_checkpoint

from nnunetv2_hiendmae.presets import ct_window_statistics
from pretrain.embed import ImageCases, embed_volume, preprocessed_cases, token_fraction
from pretrain.embed_cli import main
from pretrain.trained_encoder import load_trained_encoder
from pretrain.unlabeled import Case, Settings, plans_for

CMD = "nnUNetv2_hiendmae_embed"
E = 96  # vit_tiny


def table(out: Path) -> pd.DataFrame:
    parquet = out / "embeddings.parquet"
    return pd.read_parquet(parquet) if parquet.is_file() else pd.read_csv(out / "embeddings.csv")


def npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def ckpt(preprocessed_dataset, tmp_path_factory) -> Path:
    """vit_tiny pretraining checkpoint whose pretraining data were preprocessed as dataset 990 (crop 32 x 64 x 64)."""
    return write_checkpoint(tmp_path_factory.mktemp("embed") / "pretrain.pth", preprocessed_dataset["preprocessed"])


@pytest.fixture(scope="module")
def scans(preprocessed_dataset, tmp_path_factory) -> Path:
    """The three unlabelled scans, a corrupt file and a 2-channel case."""
    folder = tmp_path_factory.mktemp("scans") / "scans"
    shutil.copytree(preprocessed_dataset["unlabelled_scans"], folder)
    (folder / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not really a gzip file")
    (folder / "multi").mkdir()
    for c in range(2):
        shutil.copy(folder / "pool_000.nii.gz", folder / "multi" / f"two_{c:04d}.nii.gz")
    return folder


@pytest.fixture(scope="module")
def embedded(scans, ckpt, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("embedded") / "out"
    proc = run_cli(CMD, "-i", str(scans), "-pt", str(ckpt), "-o", str(out), "--tokens", "-np", "1", check=True)
    return {"out": out, "proc": proc}


# ------------------------------------------------------------------------------------------- the sliding window

class PositionEncoder(torch.nn.Module):
    """Stands in for the ViT: token features are [the token's first voxel, its index inside the window on axes 0, 1,
    2]; the CLS token is the window's first voxel (all four features)."""

    token_size = (2, 2, 2)
    embed_dim = 4

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        content = x[:, 0, ::2, ::2, ::2]  # [B, *window grid]
        local = torch.meshgrid(*[torch.arange(n, dtype=x.dtype) for n in content.shape[1:]], indexing="ij")
        features = torch.stack([content, *[a.expand_as(content) for a in local]], 1)  # [B, 4, *grid]
        cls = content[:, 0, 0, 0][:, None].expand(-1, 4)
        return torch.cat([cls[:, None], features.flatten(2).transpose(1, 2)], 1), []

    def pooled(self, normed: torch.Tensor) -> torch.Tensor:
        return normed[:, 0]  # the ViT's summary of a window: its CLS token


def test_overlapping_windows_average_their_token_features():
    grid = (6, 4, 5)  # tokens; windows of 4 x 4 x 3 tokens at half-patch steps start at (0, 2) x (0,) x (0, 1, 2)
    position = np.stack(np.meshgrid(*[np.arange(n) for n in grid], indexing="ij"))
    code = torch.from_numpy(100.0 * position[0] + 10.0 * position[1] + position[2]).float()
    image = code.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)[None]  # [1, 12, 8, 10]
    tokens, cls = embed_volume(PositionEncoder(), image, patch=(8, 8, 6), step_size=0.5, batch_size=4)
    assert tokens.shape == (4, *grid)
    assert torch.equal(tokens[0], code)  # every window's features land on the tokens they came from
    # a token's index inside the windows that cover it, averaged: e.g. token 2 of axis 0 is 2 in window 0, 0 in 2
    expected = [[0, 1, 1, 2, 2, 3], [0, 1, 2, 3], [0, 0.5, 1, 1.5, 2]]
    for axis, values in enumerate(expected):
        along = tokens[1 + axis].permute(axis, *[a for a in range(3) if a != axis]).reshape(grid[axis], -1)
        assert torch.equal(along, torch.tensor(values).float()[:, None].expand_as(along)), axis
    assert torch.equal(cls, torch.full((4,), 100.0 * 1 + 10.0 * 0 + 1))  # window starts averaged: (1, 0, 1)


def test_token_map_lies_on_the_image_it_came_from(tmp_path):
    """A body cube in an image with a zero border (nnU-Net crops it), transposed, resampled and padded: the token map
    laid over the image by token_origin and token_spacing puts the cube exactly where it is (a token of one voxel;
    the spacing halves, so the cube stays whole voxels; CT window -1000..1000: the body threshold, -500 HU, is
    half-way up the cube's edge)."""
    image = np.zeros((30, 40, 50), np.float32)  # SimpleITK's array order: z, y, x
    image[8:, :, :44] = -1000.0  # air inside a zero border that nnU-Net's crop to the nonzero region removes
    image[12:20, 10:22, 20:30] = 60.0
    im = sitk.GetImageFromArray(image)
    im.SetSpacing((1.5, 2.0, 3.0))
    sitk.WriteImage(im, str(tmp_path / "cube.nii.gz"))
    settings = Settings(1, "CT", [3.0, 6.0, 4.0], [2, 0, 1], ["CTNormalization"], [False],
                        {"0": ct_window_statistics(-1000, 1000)}, patch_size=[1, 1, 24])  # pads y: 20 -> 24 voxels
    item = ImageCases([Case("cube", [str(tmp_path / "cube.nii.gz")])], settings, plans_for("cube", settings, [0] * 3),
                      token=(1, 1, 1))[0]
    assert "error" not in item, item
    body = item["token_body"].numpy().transpose(1, 2, 0)  # transposed back: the reader's axes (z, y, x)
    assert body.sum() == 4 * 6 * 5  # the cube, 8 x 12 x 10 voxels at half the resolution
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in body.shape], indexing="ij")).reshape(3, -1)
    centre = item["token_origin"] + (idx * body.reshape(-1)).sum(1) / body.sum() * item["token_spacing"]
    np.testing.assert_allclose(centre, [15.5 * 3.0, 15.5 * 2.0, 24.5 * 1.5], atol=1e-6)  # mm from voxel (0, 0, 0)
    np.testing.assert_allclose(item["token_spacing"], [6.0, 4.0, 3.0])  # the target spacing, in the reader's order
    # tokens of several voxels: the fraction of each token's voxels in the body (here 1 and 4 of 8)
    mask = np.zeros((4, 2, 2), bool)
    mask[0, 0, 0] = True
    mask[2:, :, 0] = True
    np.testing.assert_array_equal(token_fraction(mask, (2, 2, 2)), np.array([0.125, 0.5]).reshape(2, 1, 1))


# ---------------------------------------------------------------------------------------------------- the command

def test_images_become_npz_files_a_table_and_a_skip_report(embedded, scans):
    out, proc = embedded["out"], embedded["proc"]
    assert "3 embedded (0 from an earlier run), 2 skipped" in proc.stdout
    assert "cases/s" in proc.stdout and "the encoder waited" in proc.stdout
    skipped = json.loads((out / "skipped.json").read_text())
    assert skipped["scans__corrupt"]["reason"].startswith("not a readable NIfTI: truncated or corrupt")
    assert skipped["scans__multi__two"]["reason"] == "has 2 channels, the encoder 1"
    names = sorted(p.stem for p in out.glob("*.npz"))
    assert names == ["scans__pool_000", "scans__pool_001", "scans__pool_002"]
    for name in names:
        z = npz(out / f"{name}.npz")
        assert z["source"].tolist() == [str((scans / f"{name.split('__')[1]}.nii.gz").resolve())]
        assert z["mean"].shape == z["cls"].shape == (E,) and z["tokens"].shape[0] == E
        assert z["token_body"].shape == z["tokens"].shape[1:] and 0 < z["token_body"].max() <= 1
        assert z["token_body"].min() == 0  # air around the body
        weighted = (z["tokens"] * z["token_body"]).sum((1, 2, 3)) / z["token_body"].sum()
        np.testing.assert_allclose(z["mean"], weighted, rtol=1e-5, atol=1e-6)  # mean over the body
        assert np.all(z["token_spacing"] > 0) and z["token_origin"].shape == (3,)
    rows = table(out).set_index("case")
    assert list(rows.index) == names
    assert list(rows.columns) == ["source", *[f"mean_{i}" for i in range(E)], *[f"cls_{i}" for i in range(E)]]
    np.testing.assert_allclose(rows.loc[names[1], [f"cls_{i}" for i in range(E)]].to_numpy(float),
                               npz(out / f"{names[1]}.npz")["cls"], rtol=1e-6)


def test_a_resumed_run_skips_finished_cases_and_completes_the_table(embedded, scans, ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(embedded["out"], out)
    (out / "scans__pool_001.npz").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")}
    for stale in ("embeddings.csv", "embeddings.parquet"):  # an earlier table, or one in the other format
        (out / stale).write_text("case\nscans__pool_000\n")
    proc = run_cli(CMD, "-i", str(scans), "-pt", str(ckpt), "-o", str(out), "--tokens", "-np", "0", check=True)
    assert "3 embedded (2 from an earlier run), 2 skipped" in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz") if p.name in kept} == kept
    np.testing.assert_array_equal(npz(out / "scans__pool_001.npz")["tokens"],
                                  npz(embedded["out"] / "scans__pool_001.npz")["tokens"])
    assert len(list(out.glob("embeddings.*"))) == 1
    assert list(table(out)["case"]) == ["scans__pool_000", "scans__pool_001", "scans__pool_002"]
    assert set(json.loads((out / "skipped.json").read_text())) == {"scans__corrupt", "scans__multi__two"}

    with pytest.raises(SystemExit) as exit_:
        main(["-i", str(scans), "-pt", str(ckpt), "-o", str(out), "--step-size", "1"])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
        f"error: {out} holds embeddings made with other settings (step_size, tokens differ): use another -o, or the "
        f"settings in {out / 'embed_settings.json'}"]


@pytest.fixture(scope="module")
def from_dataset(preprocessed_dataset, ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("from_dataset") / "out"
    run_cli(CMD, "-d", str(preprocessed_dataset["id"]), "-pt", str(ckpt), "-o", str(out), "--tokens", "-np", "1",
            check=True)
    return out


def test_image_files_embed_as_their_preprocessed_dataset(preprocessed_dataset, ckpt, from_dataset, tmp_path):
    """The checkpoint's pretraining data were preprocessed as dataset 990: its raw images, preprocessed from the
    checkpoint's metadata, give the embeddings of 990's preprocessed cases."""
    images = sorted((preprocessed_dataset["raw"] / "imagesTr").glob("*_0000.nii.gz"))[:2]
    listing = tmp_path / "two.txt"
    listing.write_text("\n".join(map(str, images)))
    out = tmp_path / "out"
    run_cli(CMD, "-i", str(listing), "-pt", str(ckpt), "-o", str(out), "--tokens", "-np", "0", check=True)
    assert npz(from_dataset / "case_000.npz")["source"][0].endswith("case_000.b2nd")
    assert len(table(from_dataset)) == 6
    for image in images:
        case = image.name[:-len("_0000.nii.gz")]
        a, b = npz(out / f"two__imagesTr__{case}.npz"), npz(from_dataset / f"{case}.npz")
        for key in ("mean", "cls", "tokens", "token_body", "token_spacing", "token_origin"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-4, err_msg=f"{case} {key}")


def test_a_fine_tuned_nnunet_checkpoint_embeds_with_its_encoder(preprocessed_dataset, ckpt, from_dataset, tmp_path):
    """A checkpoint_final.pth as nnUNetTrainer.save_checkpoint writes it, of a trainer that loaded the pretrained
    encoder (plans with the pretraining patch): its network's encoder and plans give the pretraining embeddings."""
    from nnunetv2_hiendmae.plans import main as plan_main
    from nnunetv2_hiendmae.trainers import nnUNetTrainerHiEndMAE_smoke

    folder = preprocessed_dataset["preprocessed"]
    plan_main(["-d", "990", "-pt", str(ckpt), "-o", "T_embed", "--patch-size", *map(str, CROP)])
    trainer = make_trainer(nnUNetTrainerHiEndMAE_smoke, folder, "T_embed")
    trainer.initialize()
    trainer._best_ema = np.float64(0.25)  # as after an epoch: nnU-Net's checkpoint holds numpy scalars
    path = tmp_path / "checkpoint_final.pth"
    trainer.save_checkpoint(str(path))
    loaded = load_trained_encoder(path)
    assert "fine-tuned by nnUNetTrainerHiEndMAE_smoke (T_embed, 3d_fullres, fold 0)" in loaded.description
    for key, value in trainer.network.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[key], value), key
    out = tmp_path / "out"
    run_cli(CMD, "-d", "990", "-pt", str(path), "-o", str(out), "--tokens", "-np", "0", check=True)
    for case in ("case_000", "case_003"):
        a, b = npz(out / f"{case}.npz"), npz(from_dataset / f"{case}.npz")
        for key in ("mean", "cls", "tokens"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=f"{case} {key}")


def test_a_dataset_preprocessed_otherwise_gets_a_note(preprocessed_dataset, tmp_path):
    other = write_checkpoint(tmp_path / "other.pth", preprocessed_dataset["preprocessed"], spacing=[4.0, 4.0, 4.0])
    cases, notes = preprocessed_cases("990", "nnUNetPlans", "3d_fullres", load_trained_encoder(other))
    assert len(cases) == 6 and len(notes) == 1 and notes[0].startswith("spacing ") and "[4.0, 4.0, 4.0]" in notes[0]


# -------------------------------------------------------------------------------------------------- bad input

def _nnunet_checkpoint_of_a_cnn(folder: Path, path: Path) -> Path:
    init = {"plans": json.loads((folder / "nnUNetPlans.json").read_text()), "configuration": "3d_fullres",
            "fold": 0, "dataset_json": json.loads((folder / "dataset.json").read_text()),
            "device": torch.device("cpu")}
    torch.save({"network_weights": {}, "init_args": init, "trainer_name": "nnUNetTrainer", "_best_ema": np.float64(0)},
               path)
    return path


BAD = {
    "no cases": ([], "give images with -i or a preprocessed dataset with -d (one of the two)"),
    "both": (["-i", "{scans}", "-d", "990"], "give images with -i or a preprocessed dataset with -d (one of the two)"),
    "plans without -d": (["-i", "{scans}", "-p", "nnUNetPlans"], "-p and -c choose the plans of a preprocessed "
                                                                   "dataset: they go with -d"),
    "reader with -d": (["-d", "990", "--reader", "SimpleITKIO"], "--file-ending and --reader choose how image files"),
    "step": (["-i", "{scans}", "--step-size", "0"], "--step-size must be in (0, 1], got 0.0"),
    "workers": (["-i", "{scans}", "-np", "-1"], "-b must be at least 1 and -np at least 0"),
    "reader": (["-i", "{scans}", "--reader", "Bogus"], "--reader Bogus is not an nnU-Net image reader"),
    "no checkpoint": (["-i", "{scans}", "-pt", "{tmp}/missing.pth"], "checkpoint not found: {tmp}/missing.pth"),
    "corrupt checkpoint": (["-i", "{scans}", "-pt", "{tmp}/corrupt.pth"], "{tmp}/corrupt.pth is not a readable "
                                                                            "checkpoint (truncated, corrupt"),
    "foreign checkpoint": (["-i", "{scans}", "-pt", "{tmp}/foreign.pth"], "{tmp}/foreign.pth is neither a "
                                                                            "nnunetv2_hiendmae pretraining checkpoint"),
    "cnn checkpoint": (["-i", "{scans}", "-pt", "{tmp}/cnn.pth"], "{tmp}/cnn.pth is an nnU-Net checkpoint of "
                                                                   "nnUNetTrainer, whose network is dynamic_network_"),
    "no images": (["-i", "{tmp}/empty"], "no images (.nii.gz, .nii, .nrrd, .mha, .gipl) found in {tmp}/empty"),
    "output is a file": (["-i", "{scans}", "-o", "{tmp}/corrupt.pth"], "-o {tmp}/corrupt.pth is a file; give a "
                                                                         "folder"),
    "foreign output": (["-i", "{scans}", "-o", "{tmp}/foreign_out"], "{tmp}/foreign_out holds .npz files that "
                                                                      "nnUNetv2_hiendmae_embed did not write"),
    "unknown dataset": (["-d", "989"], "dataset '989' not found"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_writes_nothing(case, scans, ckpt, preprocessed_dataset, tmp_path, capsys):
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 truncated zip")
    torch.save({"weights": {}}, tmp_path / "foreign.pth")
    _nnunet_checkpoint_of_a_cnn(preprocessed_dataset["preprocessed"], tmp_path / "cnn.pth")
    (tmp_path / "empty").mkdir()
    (tmp_path / "foreign_out").mkdir()
    np.savez(tmp_path / "foreign_out" / "mine.npz", a=np.zeros(1))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    argv, message = BAD[case]
    argv = [a.format(scans=scans, tmp=tmp_path) for a in argv]
    argv = argv + (["-pt", str(ckpt)] if "-pt" not in argv else []) + (["-o", str(tmp_path / "out")]
                                                                       if "-o" not in argv else [])
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: " + message.format(tmp=tmp_path)), err[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
