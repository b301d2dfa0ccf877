"""The linear probe (nnunetv2_hiendmae.probe) and nnUNetv2_hiendmae_probe: that it measures what it names, that it
never fits on the cases it scores, that it is deterministic and leaves a pretraining run's state alone, the command.

Dataset 990's organs are about one 16-voxel token wide, so at vit_tiny's token size no encoder can separate them
there (measured: an encoder given the true class fractions of each token scores 0.18, a random one 0.12). The test
that a label-encoding encoder beats a random one therefore uses the same phantoms at twice the size (Dataset993),
preprocessed in-process by nnU-Net's own DefaultPreprocessor with dataset 990's plans.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CROP, copy_preprocessed_dataset, run_cli, write_checkpoint

from nnunetv2_hiendmae import probe, probe_cli
from nnunetv2_hiendmae.encoders import build_encoder
from nnunetv2_hiendmae.presets import PROBE_SEED, encoder_config
from nnunetv2_hiendmae.vit import ViTEncoder3D, patchify

PATCH = (32, 48, 48)  # dataset 990's median image (18 x 46 x 44) rounded up to whole 16-voxel tokens
HU_EDGES = (52.0, 87.0, 140.0, 185.0)  # between soft tissue, liver, spleen, kidney and bone (demo/synthetic.py)


class HandBuiltEncoder(ViTEncoder3D):
    """vit_tiny's shape and forward contract; each token's features are the fractions of its voxels in the HU ranges
    of background, liver, spleen, kidney and bone: token features that encode the labels."""

    def __init__(self, intensity: dict):
        super().__init__(**{k: v for k, v in encoder_config("vit_tiny").items() if k != "arch"})
        edges = [(hu - intensity["mean"]) / intensity["std"] for hu in HU_EDGES]  # nnU-Net's CTNormalization
        self.edges = [-float("inf"), *edges, float("inf")]

    def forward(self, x, keep=None):
        voxels = patchify(x, self.token_size)  # [B, L, voxels per token]
        f = torch.stack([((voxels > lo) & (voxels <= hi)).float().mean(-1)
                         for lo, hi in zip(self.edges[:-1], self.edges[1:])], dim=-1)
        f = torch.cat([f, f.new_zeros(*f.shape[:2], self.embed_dim - f.shape[-1])], dim=-1)
        return torch.cat([f.new_zeros(f.shape[0], 1, self.embed_dim), f], dim=1), []


@pytest.fixture(scope="module")
def data(preprocessed_dataset) -> probe.ProbeData:
    return probe.load_probe_data(preprocessed_dataset["id"], 0, PATCH)


@pytest.fixture(scope="module")
def large_phantoms(preprocessed_dataset, tmp_path_factory) -> Path:
    """``nnUNet_preprocessed`` root holding Dataset993_ProbeLarge: 6 phantoms at twice dataset 990's size, through
    nnU-Net's DefaultPreprocessor with dataset 990's plans."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_hiendmae.demo.synthetic import make_datasets

    root = tmp_path_factory.mktemp("probe_phantoms")
    raw = make_datasets(root / "raw", 993, name="ProbeLarge", n_labelled=6, n_unlabelled=0, n_test=0, seed=1,
                        scale=2.0)["labelled"]
    folder = root / "nnUNet_preprocessed" / raw.name
    folder.mkdir(parents=True)
    plans = json.loads((preprocessed_dataset["preprocessed"] / "nnUNetPlans.json").read_text())
    (folder / "nnUNetPlans.json").write_text(json.dumps({**plans, "dataset_name": raw.name}))
    shutil.copy(raw / "dataset.json", folder / "dataset.json")
    manager = PlansManager(str(folder / "nnUNetPlans.json"))
    configuration = manager.get_configuration("3d_fullres")
    (folder / configuration.data_identifier).mkdir()
    dataset_json = json.loads((folder / "dataset.json").read_text())
    for image in sorted((raw / "imagesTr").glob("*_0000.nii.gz")):
        case = image.name[:-len("_0000.nii.gz")]
        DefaultPreprocessor(verbose=False).run_case_save(
            str(folder / configuration.data_identifier / case), [str(image)], str(raw / "labelsTr" / f"{case}.nii.gz"),
            manager, configuration, dataset_json)
    return root / "nnUNet_preprocessed"


def test_an_encoder_whose_tokens_encode_the_labels_scores_clearly_above_random(large_phantoms, monkeypatch):
    monkeypatch.setenv("nnUNet_preprocessed", str(large_phantoms))
    split = probe.probe_split(993, 0)
    data = probe.load_probe_data(993, 0, PATCH)
    plans = json.loads((large_phantoms / split.dataset_name / "nnUNetPlans.json").read_text())
    hand = probe.probe_score(HandBuiltEncoder(plans["foreground_intensity_properties_per_channel"]["0"]), data)
    floor = probe.probe_score(probe.load_probe_encoder("random:vit_tiny", split).encoder, data)
    assert list(hand.class_dice) == [1, 2, 3] and split.labels == {1: "liver", 2: "spleen", 3: "kidney"}
    assert hand.score > floor.score + 0.1, (hand, floor)  # measured: 0.54 against 0.37
    assert hand.score == pytest.approx(np.mean(list(hand.class_dice.values())))
    assert all(d > 0.2 for d in hand.class_dice.values()), hand


def test_features_at_voxels_are_the_upsampled_token_features():
    grid = torch.randn(5, 2, 3, 4)  # an anisotropic token grid: any axis mix-up shows
    patch = (32, 48, 64)
    voxels = torch.tensor([[0, 0, 0], [31, 47, 63], [5, 20, 33], [16, 1, 62], [9, 40, 7]])
    upsampled = F.interpolate(grid[None], size=patch, mode="trilinear", align_corners=False)[0]
    expected = upsampled[:, voxels[:, 0], voxels[:, 1], voxels[:, 2]].T
    torch.testing.assert_close(probe.features_at(grid, voxels, patch), expected)


def _split(folder: Path, fold: int) -> dict[str, list[str]]:
    """Fold ``fold`` as nnU-Net defines it: splits_final.json, else its default split of the preprocessed cases."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    if (folder / "splits_final.json").is_file():
        return json.loads((folder / "splits_final.json").read_text())[fold]
    cases = sorted(p.name[:-len(".pkl")] for p in (folder / "nnUNetPlans_3d_fullres").glob("*.pkl"))
    return generate_crossval_split(cases, seed=12345, n_splits=5)[fold]


def _assert_fit_and_scored_cases_follow(data: probe.ProbeData, split: dict) -> None:
    train, val = set(split["train"]), set(split["val"])
    assert data.fit_cases and set(data.fit_cases) <= train and not set(data.fit_cases) & val
    assert data.val_cases and set(data.val_cases) <= val and set(data.val_cases).isdisjoint(data.fit_cases)
    assert (sorted(data.split.train_cases), sorted(data.split.val_cases)) == (sorted(train), sorted(val))


def test_validation_cases_are_never_in_the_fit(preprocessed_dataset, data, tmp_path, monkeypatch):
    folder = preprocessed_dataset["preprocessed"]
    split = _split(folder, 0)
    _assert_fit_and_scored_cases_follow(data, split)
    assert data.val_cases == sorted(split["val"]) and len(data.fit_crops) == 4 * len(split["train"])
    # every fit crop is the pixels of the training case it names, at the place it names
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    cases = infer_dataset_class(data.split.folder)(data.split.folder, data.fit_cases)
    for (case, start), image in zip(data.fit_crops, data.fit_images):
        case_image = np.asarray(cases.load_case(case)[0])
        inside = tuple(slice(max(s, 0), min(s + p, n)) for s, p, n in zip(start, PATCH, case_image.shape[1:]))
        local = tuple(slice(i.start - s, i.stop - s) for i, s in zip(inside, start))
        np.testing.assert_array_equal(image.numpy()[(slice(None), *local)], case_image[(slice(None), *inside)])
    assert int(data.points[:, 0].max()) == len(data.fit_crops) - 1  # the fitted voxels lie in those crops only

    # a splits_final.json of the user's own is followed, and a smaller case budget picks within each side
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    copy = copy_preprocessed_dataset(folder, tmp_path, 985)
    own = [{"train": ["case_003", "case_005"], "val": ["case_000", "case_001", "case_002", "case_004"]}]
    (copy / "splits_final.json").write_text(json.dumps(own))
    small = probe.load_probe_data(985, 0, PATCH, max_cases=1)
    _assert_fit_and_scored_cases_follow(small, own[0])
    assert len(small.fit_cases) == len(small.val_cases) == 1


def test_same_score_twice_global_rng_and_encoder_modes_untouched(data):
    encoder = probe.load_probe_encoder("random:vit_tiny", data.split).encoder.train()
    encoder.blocks[1].eval()  # a mixed state must come back as it was, not as all-train
    modes = [m.training for m in encoder.modules()]
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    first, second = probe.probe_score(encoder, data), probe.probe_score(encoder, data)
    assert (first.score, first.class_dice) == (second.score, second.class_dice) and not np.isnan(first.score)
    assert torch.equal(torch.get_rng_state(), states[0]) and np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]
    assert [m.training for m in encoder.modules()] == modes
    # the data are a function of their arguments; random:ARCH is the seed's initial encoder, drawn aside
    again = probe.load_probe_data(data.split.dataset_name, 0, PATCH)
    assert again.fit_crops == data.fit_crops and torch.equal(again.fit_images, data.fit_images)
    assert torch.equal(again.points, data.points) and torch.equal(again.point_weights, data.point_weights)
    torch.manual_seed(PROBE_SEED)
    expected = build_encoder(encoder_config("vit_tiny", 1)).state_dict()
    torch.manual_seed(7)
    state = torch.get_rng_state()
    built = probe.load_probe_encoder("random:vit_tiny", data.split).encoder.state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(built[k], v) for k, v in expected.items())


def test_every_class_weighs_the_same_in_the_fit_and_the_weights_reach_the_loss(data):
    """Dataset 990's smaller organs stay under the sampling cap, so the classes have different voxel counts: each must
    still weigh ``1 / classes`` in all. A class given no weight is never predicted, while the same encoder with the
    balanced weights predicts it: the weights, not the voxel counts, decide the fit. With weight on the liver alone,
    every scored voxel is predicted liver, and its score is nnU-Net's Dice of that prediction, ``2 |liver| /
    (|liver| + |scored voxels|)`` per case, averaged over the cases (a recall would be 1)."""
    counts = torch.bincount(data.point_classes)
    assert len(counts) == 4 and len(set(counts.tolist())) > 1, counts  # unequal: equal weights per voxel would differ
    sums = torch.zeros(4, dtype=torch.float64).index_add_(0, data.point_classes, data.point_weights.double())
    torch.testing.assert_close(sums, torch.full((4,), 0.25, dtype=torch.float64))
    encoder = probe.load_probe_encoder("random:vit_tiny", data.split).encoder
    weights = data.point_weights.clone()
    weights[data.point_classes == 3] = 0  # the kidneys (label 3) weigh nothing
    balanced = probe.probe_score(encoder, data)
    without = probe.probe_score(encoder, dataclasses.replace(data, point_weights=weights))
    assert balanced.class_dice[3] > 0 and without.class_dice[3] == 0, (balanced, without)
    liver = probe.probe_score(encoder, dataclasses.replace(data, point_weights=data.point_weights * (
        data.point_classes == 1)))
    sizes = [((c.classes == 1).sum().item(), (c.classes != probe.NOT_SCORED).sum().item()) for c in data.val]
    assert liver.class_dice[1] == pytest.approx(np.mean([2 * n / (n + scored) for n, scored in sizes]), rel=1e-9)
    assert liver.class_dice[2] == liver.class_dice[3] == 0 and len({n for n, _ in sizes}) == len(sizes) > 1


def test_probe_seed_is_the_pretraining_default():
    from pretrain.config import PretrainConfig

    assert PretrainConfig(datasets=["1"], output_dir="x").seed == PROBE_SEED


def test_random_resenc_l_is_nnssls_resenc_l_at_nnunets_initial_weights_and_is_probed(data):
    """``random:resenc_l``, the floor of an nnssl ResEnc-L checkpoint: ResEnc-L's encoder (dynamic-network-
    architectures' layout, every parameter of get_res_enc_l's encoder), initialised as nnU-Net initialises a new ResEnc
    U-Net (He normal with slope 1e-2, zero biases, the last norm of every residual block at zero) from the seed, and
    probed at a patch of whole 16-voxel tokens: its first forward on real data."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    from nnunetv2_hiendmae.resenc import RESENC_L, resolve_classes

    subject = probe.load_probe_encoder("random:resenc_l", data.split)
    encoder, state = subject.encoder, subject.encoder.state_dict()
    with torch.device("meta"):
        reference = ResidualEncoderUNet(1, **resolve_classes(RESENC_L), num_classes=2,
                                        n_conv_per_stage_decoder=[1] * 5).encoder.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in reference.items()}
    assert (subject.method, subject.epochs, subject.patch_size) == ("random init", 0, None)
    assert encoder.token_size == (16, 16, 16) and encoder.embed_dim == 320 and not encoder.training
    last_norms = [k for k in state if k.endswith("conv2.norm.weight")]  # each residual block's last norm
    assert len(last_norms) == 26 and all(not state[k].any() for k in last_norms)
    conv = state["stages.3.blocks.2.conv1.conv.weight"]  # [256, 256, 3, 3, 3]: fan-in 256 x 27
    assert conv.std().item() == pytest.approx((2 / (1 + 1e-4) / (256 * 27)) ** 0.5, rel=0.02)
    assert not state["stages.3.blocks.2.conv1.conv.bias"].any()
    again = probe.load_probe_encoder("random:resenc_l", data.split).encoder.state_dict()
    assert all(torch.equal(again[k], v) for k, v in state.items())  # from the seed, not the global random state
    assert probe.probe_patch(encoder.token_size, data.split) == list(PATCH)
    result = probe.probe_score(encoder, data)
    assert 0 <= result.score <= 1 and list(result.class_dice) == [1, 2, 3]
    help_text = " ".join(probe_cli.build_parser().format_help().split())
    assert all(f"{arch}," in help_text or f"{arch}:" in help_text for arch in probe.RANDOM_ARCHS)  # -pt's help


def test_random_resenc_l_takes_the_dataset_s_channels():
    """``random:resenc_l`` on a dataset of two channels (CT and PET, say) is ResEnc-L with a stem of two input
    channels, as nnU-Net builds it for that dataset; a ViT preset likewise."""
    from types import SimpleNamespace

    two = SimpleNamespace(channels=2)  # all that random:ARCH reads of the split
    encoder = probe.load_probe_encoder("random:resenc_l", two).encoder
    assert encoder.in_channels == 2 and encoder.state_dict()["stem.convs.0.conv.weight"].shape == (32, 2, 3, 3, 3)
    assert probe.load_probe_encoder("random:vit_tiny", two).encoder.in_channels == 2


# ------------------------------------------------------------------------------------------------------------ command


def test_command_prints_a_row_per_encoder_and_writes_csv_and_markdown(preprocessed_dataset, tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt.pth", preprocessed_dataset["preprocessed"])
    out = tmp_path / "probe"
    proc = run_cli("nnUNetv2_hiendmae_probe", "-d", str(preprocessed_dataset["id"]), "-pt", "random:vit_tiny",
                   str(ckpt), "-o", str(out), "-device", "cpu", check=True, timeout=600, env={"OMP_NUM_THREADS": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(lines) == 3 and "mean fg Dice" in lines[0]
    assert lines[1].startswith("| random:vit_tiny | random init | 0 |") and lines[2].startswith(f"| {ckpt} |")
    with open(out / "probe.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["checkpoint"] for r in rows] == ["random:vit_tiny", str(ckpt)]
    assert [r["patch size"] for r in rows] == ["x".join(map(str, CROP))] * 2  # random:ARCH takes the checkpoint's
    assert rows[1]["method"] == "hiend_mae"
    for r in rows:
        dice = [float(r[f"Dice {n}"]) for n in ("liver", "spleen", "kidney")]
        assert 0 <= float(r["mean fg Dice"]) <= 1 and float(r["mean fg Dice"]) == pytest.approx(np.mean(dice))
        assert float(r["seconds"]) > 0
    markdown = (out / "probe.md").read_text()
    assert "fold 0" in markdown and "must beat random:ARCH" in markdown and lines[1] in markdown
    assert sorted(p.name for p in out.iterdir()) == ["probe.csv", "probe.md"]  # no temporary file left


def test_bad_input_is_one_line_and_writes_nothing(preprocessed_dataset, tmp_path, capsys):
    folder = preprocessed_dataset["preprocessed"]
    two_channels = write_checkpoint(tmp_path / "two.pth", folder, in_channels=2)
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    out = tmp_path / "out"
    d = str(preprocessed_dataset["id"])
    cases = [
        (["-d", "977", "-pt", "random:vit_tiny"], "dataset '977' not found"),
        (["-d", d, "-f", "5", "-pt", "random:vit_tiny"], "fold 5 is out of range"),
        (["-d", d, "-pt", str(two_channels)], "pretrained on 2 channels, Dataset990_HiEndTest has 1"),
        (["-d", d, "-pt", str(tmp_path / "junk.pth")], "is not a readable checkpoint"),
        (["-d", d, "-pt", str(tmp_path / "missing.pth")], "checkpoint not found"),
        (["-d", d, "-pt", "random:vit_huge"], "unknown architecture 'vit_huge'"),
        (["-d", d, "-pt", "random:resenc_m"], f"choose from {', '.join(probe.RANDOM_ARCHS)}"),
        (["-d", d, "-pt", "random:vit_tiny", "--patch-size", "20", "48", "48"], "not a multiple of the token size"),
        (["-d", str(preprocessed_dataset["unlabelled_id"]), "-pt", "random:vit_tiny"], "no foreground labels"),
    ]
    for argv, needle in cases:
        with pytest.raises(SystemExit) as exc:
            probe_cli.main([*argv, "-o", str(out), "-device", "cpu"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
        assert not out.exists()
