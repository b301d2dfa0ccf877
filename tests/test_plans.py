"""nnUNetv2_hiendmae_plan: plans content, when nnU-Net's preprocessing runs (and what it never touches), bad input.

Content and errors are checked in-process (``build_plan`` writes nothing; ``main`` exits 2 with one line); writing
and preprocessing through the real console script.
"""
from __future__ import annotations

import json
import pydoc
from pathlib import Path

import pytest
import torch
from conftest import CROP, TOKEN, run_cli, write_checkpoint

from nnunetv2_hiendmae.checkpoint import encoder_fingerprint
from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.network import HiEndUNETR
from nnunetv2_hiendmae.plans import (
    CONFIGURATION,
    DEFAULT_NAME,
    Dataset,
    build_plan,
    main,
    normalisation,
    parser,
    pretrained_source,
)

# The released model's CT statistics (HU [-175, 250] -> [0, 1] through CTNormalization), unlike the dataset's own.
PRETRAIN_CT = {"max": 250.0, "mean": -175.0, "median": 0.0, "min": -175.0, "percentile_00_5": -175.0,
               "percentile_99_5": 250.0, "std": 425.0}
PRETRAIN_SPACING = [4.0, 4.0, 4.0]


@pytest.fixture(scope="module")
def ckpts(preprocessed_dataset, tmp_path_factory) -> dict[str, Path]:
    """``same``: the dataset's own spacing and normalisation; ``pretrain``: 4 mm and the release's CT statistics,
    learned position embedding."""
    folder, out = preprocessed_dataset["preprocessed"], tmp_path_factory.mktemp("ckpts")
    return {"same": write_checkpoint(out / "same.pth", folder),
            "pretrain": write_checkpoint(out / "pretrain.pth", folder, spacing=PRETRAIN_SPACING,
                                         props={"0": PRETRAIN_CT}, pos_embed="learned")}


def plan(*argv: str):
    return build_plan(parser().parse_args(list(argv)))


def base(preprocessed_dataset) -> tuple[dict, dict]:
    plans = json.loads((preprocessed_dataset["preprocessed"] / "nnUNetPlans.json").read_text())
    return plans, plans["configurations"][CONFIGURATION]


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_pretrained_plans_content(preprocessed_dataset, ckpts):
    p = plan("-d", "990", "-pt", str(ckpts["pretrain"]), "-o", "T_content")
    plans, cfg = p.plans, p.plans["configurations"][CONFIGURATION]
    base_plans, base_cfg = base(preprocessed_dataset)
    ckpt = torch.load(ckpts["pretrain"], weights_only=True)

    assert plans["plans_name"] == "T_content" and list(plans["configurations"]) == [CONFIGURATION]
    assert cfg["architecture"]["network_class_name"] == "nnunetv2_hiendmae.network.HiEndUNETR"
    assert pydoc.locate(cfg["architecture"]["network_class_name"]) is HiEndUNETR
    encoder = {k: v for k, v in ckpt["encoder"].items() if k != "in_channels"}  # nnU-Net gives the channel count
    assert cfg["architecture"]["arch_kwargs"] == {"encoder": encoder, "feature_size": 16}
    assert cfg["batch_size"] == 2
    # patch: whole tokens, never above the crop, shrunk to the small dataset's median shape at 4 mm
    assert all(s % TOKEN == 0 and TOKEN <= s <= c for s, c in zip(cfg["patch_size"], CROP))
    assert cfg["patch_size"] != CROP
    assert all(s >= m or s == c for s, m, c in zip(cfg["patch_size"], cfg["median_image_size_in_voxels"], CROP))
    # spacing and normalisation from the pretraining; the median shape recomputed for that spacing
    assert cfg["spacing"] == PRETRAIN_SPACING
    assert cfg["median_image_size_in_voxels"] != base_cfg["median_image_size_in_voxels"]
    assert cfg["normalization_schemes"] == ["CTNormalization"]
    assert plans["foreground_intensity_properties_per_channel"] == {"0": PRETRAIN_CT}
    info = plans["pretrain_info"]
    assert info["checkpoint"] == str(ckpts["pretrain"].resolve()) and Path(info["checkpoint"]).is_absolute()
    assert info["encoder_sha256"] == encoder_fingerprint(torch.load(ckpts["pretrain"], weights_only=True))
    assert (info["arch"], info["method"], info["spacing"], info["normalization"]) == (
        "vit_tiny", "hiend_mae", "pretrain", "pretrain")
    # new data: its own identifier, preprocessing needed; the rest of the base plans kept
    assert cfg["data_identifier"] == f"T_content_{CONFIGURATION}" and p.data == "preprocess"
    assert plans["transpose_forward"] == base_plans["transpose_forward"]
    assert cfg["resampling_fn_data"] == base_cfg["resampling_fn_data"]


def test_dataset_modes_keep_the_dataset_preprocessing_and_share_its_data(preprocessed_dataset, ckpts):
    p = plan("-d", "990", "-pt", str(ckpts["pretrain"]), "-o", "T_dsmode", "--spacing", "dataset",
             "--normalization", "dataset")
    base_plans, base_cfg = base(preprocessed_dataset)
    cfg = p.plans["configurations"][CONFIGURATION]
    assert cfg["spacing"] == base_cfg["spacing"]
    assert (p.plans["foreground_intensity_properties_per_channel"]
            == base_plans["foreground_intensity_properties_per_channel"])
    assert (p.data, cfg["data_identifier"]) == ("reuse", base_cfg["data_identifier"])


def test_patch_size_override(preprocessed_dataset, ckpts):
    p = plan("-d", "990", "-pt", str(ckpts["same"]), "--patch-size", "16", "32", "64")
    assert p.plans["configurations"][CONFIGURATION]["patch_size"] == [16, 32, 64]


def test_other_modality_keeps_the_dataset_normalisation(preprocessed_dataset, tmp_path):
    ckpt = write_checkpoint(tmp_path / "mr.pth", preprocessed_dataset["preprocessed"], schemes=["ZScoreNormalization"],
                            props={"0": PRETRAIN_CT})
    p = plan("-d", "990", "-pt", str(ckpt))
    base_plans, _ = base(preprocessed_dataset)
    assert p.plans["configurations"][CONFIGURATION]["normalization_schemes"] == ["CTNormalization"]
    assert (p.plans["foreground_intensity_properties_per_channel"]
            == base_plans["foreground_intensity_properties_per_channel"])
    assert any("kept the dataset's normalisation" in n for n in p.notes)


def fake_dataset(preprocessed_dataset, schemes: list[str]) -> Dataset:
    """The test dataset as if it had ``len(schemes)`` channels (for channel rules without another dataset)."""
    plans, cfg = base(preprocessed_dataset)
    props = {str(c): dict(plans["foreground_intensity_properties_per_channel"]["0"]) for c in range(len(schemes))}
    cfg = {**cfg, "normalization_schemes": schemes, "use_mask_for_norm": [False] * len(schemes)}
    return Dataset(990, preprocessed_dataset["preprocessed"],
                   {**plans, "foreground_intensity_properties_per_channel": props},
                   cfg, {}, {"channel_names": {str(c): s for c, s in enumerate(schemes)}})


def test_one_channel_checkpoint_on_two_channels(preprocessed_dataset, ckpts):
    ds = fake_dataset(preprocessed_dataset, ["CTNormalization", "ZScoreNormalization"])
    notes: list[str] = []
    src = pretrained_source(str(ckpts["pretrain"]), None, ds, notes)
    assert "in_channels" not in src.encoder and any("repeated" in n for n in notes)
    schemes, masks, props = normalisation(ds, src.pretrain, src.checkpoint, notes)
    assert schemes == ["CTNormalization", "ZScoreNormalization"]
    assert props["0"] == PRETRAIN_CT and props["1"] != PRETRAIN_CT  # CT statistics only where the scheme matches
    assert any(n.startswith("channel 1") for n in notes)


def test_channel_counts_that_cannot_be_adapted(preprocessed_dataset, tmp_path):
    ckpt = write_checkpoint(tmp_path / "two.pth", preprocessed_dataset["preprocessed"], in_channels=2,
                            props={"0": PRETRAIN_CT, "1": PRETRAIN_CT}, schemes=["CTNormalization"] * 2)
    ds = fake_dataset(preprocessed_dataset, ["CTNormalization"] * 3)
    with pytest.raises(UserError, match="2 channels, the dataset has 3"):
        pretrained_source(str(ckpt), None, ds, [])


@pytest.mark.slow
def test_cli_preprocesses_new_data_once_and_touches_no_other_plans_data(preprocessed_dataset, ckpts):
    folder = preprocessed_dataset["preprocessed"]
    base_plans_file, base_data = folder / "nnUNetPlans.json", folder / "nnUNetPlans_3d_fullres"
    before = (base_plans_file.read_bytes(), snapshot(base_data))

    proc = run_cli("nnUNetv2_hiendmae_plan", "-d", "990", "-pt", str(ckpts["pretrain"]), "-o", "T_pre", "-np", "1",
                   check=True)
    assert "preprocessed now" in proc.stdout
    for line in ("export nnUNet_extTrainer=$(nnUNetv2_hiendmae_ext_path)",
                 "nnUNetv2_train 990 3d_fullres FOLD -tr nnUNetTrainerHiEndMAE -p T_pre",
                 "nnUNetv2_predict -i INPUT_FOLDER -o OUTPUT_FOLDER -d 990 -c 3d_fullres -tr nnUNetTrainerHiEndMAE "
                 "-p T_pre -f 0"):
        assert line in proc.stdout
    plans = json.loads((folder / "T_pre.json").read_text())
    data = folder / plans["configurations"][CONFIGURATION]["data_identifier"]
    assert data.name == "T_pre_3d_fullres" and len(list(data.glob("*.pkl"))) == 6
    assert (base_plans_file.read_bytes(), snapshot(base_data)) == before
    assert not list(folder.glob(".*"))  # no staging plans or temporary files left behind

    written = snapshot(data)
    again = run_cli("nnUNetv2_hiendmae_plan", "-d", "990", "-pt", str(ckpts["pretrain"]), "-o", "T_pre", "-np", "1",
                    check=True)
    assert "already preprocessed" in again.stdout and snapshot(data) == written


@pytest.mark.slow
def test_cli_shares_the_base_data_when_nothing_changes(preprocessed_dataset, ckpts):
    folder = preprocessed_dataset["preprocessed"]
    dirs = {p.name for p in folder.iterdir() if p.is_dir()}
    proc = run_cli("nnUNetv2_hiendmae_plan", "-d", "990", "-pt", str(ckpts["same"]), "-o", "T_same", check=True)
    assert "shared with the base plans" in proc.stdout
    assert json.loads((folder / "T_same.json").read_text())["configurations"][CONFIGURATION]["data_identifier"] \
        == "nnUNetPlans_3d_fullres"
    assert {p.name for p in folder.iterdir() if p.is_dir()} == dirs


@pytest.mark.slow
def test_cli_scratch_plans(preprocessed_dataset):
    folder = preprocessed_dataset["preprocessed"]
    proc = run_cli("nnUNetv2_hiendmae_plan", "-d", "990", "--arch", "vit_b16", check=True)
    name = f"{DEFAULT_NAME}_scratch_vit_b16"
    assert f"-tr nnUNetTrainerHiEndMAE_scratch -p {name}" in proc.stdout
    plans = json.loads((folder / f"{name}.json").read_text())
    cfg = plans["configurations"][CONFIGURATION]
    assert plans["pretrain_info"]["checkpoint"] is None and plans["pretrain_info"]["method"] == "scratch"
    encoder = cfg["architecture"]["arch_kwargs"]["encoder"]
    assert (encoder["arch"], encoder["pos_embed"], "in_channels" in encoder) == ("vit_b16", "sincos", False)
    assert all(s % 16 == 0 and 16 <= s <= 96 for s in cfg["patch_size"]) and cfg["patch_size"] != [96, 96, 96]
    assert cfg["data_identifier"] == "nnUNetPlans_3d_fullres"  # dataset spacing and normalisation: shared data


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("-d", "-pt", "--arch", "-pl_base", "-o", "--patch-size", "--spacing", "--normalization", "-np",
                 "--strict"):
        assert flag in out


def bad_input_cases(tmp: Path, folder: Path, ckpts: dict) -> list[tuple[list[str], dict, str]]:
    """``(argv, environment changes, expected message part)``."""
    corrupt = tmp / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    foreign = tmp / "foreign.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    two = write_checkpoint(tmp / "two.pth", folder, in_channels=2, schemes=["CTNormalization"] * 2,
                           props={"0": PRETRAIN_CT, "1": PRETRAIN_CT})
    same = str(ckpts["same"])
    return [
        (["-d", "990", "-pt", same], {"nnUNet_preprocessed": None}, "nnUNet_preprocessed is not set"),
        (["-d", "987", "-pt", same], {}, "dataset '987' not found in nnUNet_raw"),
        (["-d", "990", "-pt", same, "-pl_base", "NoSuchPlans"], {}, "NoSuchPlans.json not found"),
        (["-d", "990", "-pt", str(tmp / "missing.pth")], {}, "checkpoint not found"),
        (["-d", "990", "-pt", str(corrupt)], {}, "is not a readable checkpoint (truncated, corrupt or not a torch"),
        (["-d", "990", "-pt", str(foreign)], {}, "is a torch file but not a nnunetv2_hiendmae pretraining checkpoint"),
        (["-d", "990", "-pt", str(two)], {}, "pretrained on 2 channels, the dataset has 1"),
        (["-d", "990", "-pt", same, "--patch-size", "32", "40", "48"], {}, "not a multiple of the token size"),
        (["-d", "990"], {}, "give -pt CHECKPOINT"),
        (["-d", "990", "-pt", same, "--arch", "vit_b16"], {}, "holds a vit_tiny encoder"),
        (["-d", "990", "--arch", "vit_b16", "--spacing", "pretrain"], {}, "need a pretrained checkpoint"),
        (["-d", "990", "-pt", same, "-o", "nnUNetPlans"], {}, "would overwrite the base plans"),
    ]


def test_bad_input_one_line_exit_2_nothing_written(preprocessed_dataset, ckpts, tmp_path, monkeypatch, capsys):
    folder = preprocessed_dataset["preprocessed"]
    for argv, env, message in bad_input_cases(tmp_path, folder, ckpts):
        before = snapshot(folder)
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.delenv(k) if v is None else m.setenv(k, v)
            with pytest.raises(SystemExit) as e:
                main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2, argv
        assert err.startswith("error: ") and "\n" not in err and message in err, (argv, err)
        assert snapshot(folder) == before, argv


def test_refuses_a_data_folder_that_another_plans_file_uses(preprocessed_dataset, ckpts, capsys):
    folder = preprocessed_dataset["preprocessed"]
    other = folder / "SomeoneElsesPlans.json"
    other.write_text(json.dumps({"configurations": {CONFIGURATION: {"data_identifier": f"T_clash_{CONFIGURATION}"}}}))
    try:
        with pytest.raises(SystemExit) as e:
            main(["-d", "990", "-pt", str(ckpts["pretrain"]), "-o", "T_clash"])
        assert e.value.code == 2
        assert "belongs to SomeoneElsesPlans.json" in capsys.readouterr().err
        assert not (folder / "T_clash.json").exists() and not (folder / f"T_clash_{CONFIGURATION}").exists()
    finally:
        other.unlink()


def test_refuses_to_overwrite_plans_it_did_not_write(preprocessed_dataset, ckpts, capsys):
    folder = preprocessed_dataset["preprocessed"]
    foreign = folder / "T_foreign.json"
    foreign.write_text(json.dumps({"plans_name": "T_foreign", "configurations": {}}))
    try:
        with pytest.raises(SystemExit):
            main(["-d", "990", "-pt", str(ckpts["same"]), "-o", "T_foreign"])
        assert "was not written by nnUNetv2_hiendmae_plan" in capsys.readouterr().err
        assert json.loads(foreign.read_text()) == {"plans_name": "T_foreign", "configurations": {}}
    finally:
        foreign.unlink()


@pytest.mark.slow
def test_cli_bad_input_exit_code(preprocessed_dataset, tmp_path):
    proc = run_cli("nnUNetv2_hiendmae_plan", "-d", "990", "-pt", str(tmp_path / "missing.pth"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: checkpoint not found")
