"""Scores you can trust: the commands that score folds take them from the dataset's splits_final.json (and say so),
the linear probe checks the cases it scores against what the checkpoint pretrained on, and nnU-Net's results folder
is created by the commands that write into it, as nnU-Net's own do."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import cli_error, copy_preprocessed_dataset, pretrain_args, run_cli, write_checkpoint, write_summary

from nnunetv2_hiendmae.checkpoint import save_atomic
from nnunetv2_hiendmae.leakage import dataset_fingerprints

FAST_PROBE = ["-device", "cpu", "--max-cases", "2", "--crops-per-case", "1"]


@pytest.fixture
def two_folds(preprocessed_dataset, tmp_path):
    """A private $nnUNet_preprocessed whose dataset 990 has a splits_final.json of 2 folds (3 cases each), and the
    environment pointing at it, with a $nnUNet_results that does not exist yet."""
    root = tmp_path / "preprocessed"
    folder = copy_preprocessed_dataset(preprocessed_dataset["preprocessed"], root, 990, "HiEndTest")
    cases = sorted(p.name.removesuffix(".pkl") for p in (folder / "nnUNetPlans_3d_fullres").glob("*.pkl"))
    assert len(cases) == 6
    splits = [{"train": cases[3:], "val": cases[:3]}, {"train": cases[:3], "val": cases[3:]}]
    (folder / "splits_final.json").write_text(json.dumps(splits))
    env = {"nnUNet_preprocessed": str(root), "nnUNet_results": str(tmp_path / "results")}
    return {"folder": folder, "splits": splits, "env": env, "results": tmp_path / "results"}


def test_the_study_runs_the_folds_of_the_datasets_split_file_and_refuses_one_it_lacks(two_folds, tmp_path):
    ckpt = write_checkpoint(tmp_path / "pre.pth", two_folds["folder"])
    args = ["nnUNetv2_hiendmae_study", "-d", "990", "-pt", str(ckpt), "-p", "T_folds", "--arms", "scratch",
            "--budgets", "100", "--schedule", "smoke", "-device", "cpu"]
    splits_file = two_folds["folder"] / "splits_final.json"
    refused = run_cli(*args, "-f", "0", "2", env=two_folds["env"])
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and lines == [f"error: fold 2 is not in {splits_file}, which has 2 fold(s) (0 1): "
                                                 "choose among them, or leave out -f to run them all"], refused.stderr
    advised = run_cli(*args, "--dry-run", env=two_folds["env"], check=True)  # the advice: -f left out
    assert "2 runs (1 arm x 1 label budget x 2 folds)" in advised.stdout, advised.stdout
    assert f"folds from {splits_file}" in advised.stdout
    assert not two_folds["results"].exists()  # a dry run writes nothing, though the folder may be missing


def test_compare_checks_its_folds_against_the_split_file_and_names_it(two_folds, preprocessed_dataset):
    entry = two_folds["results"] / "Dataset990_HiEndTest" / "T__P__3d_fullres"
    for fold, dice in ((0, 0.61), (1, 0.47), (3, 0.9)):  # fold_3: nnU-Net's random split for a fold not in the file
        write_summary(entry / f"fold_{fold}" / "validation" / "summary.json", {1: dice, 2: dice - 0.1})
    refused = run_cli("nnUNetv2_hiendmae_compare", "-d", "990", "-r", "T__P", "-f", "0", "3", env=two_folds["env"])
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert f"fold 3 is not in {two_folds['folder'] / 'splits_final.json'}" in refused.stderr
    proc = run_cli("nnUNetv2_hiendmae_compare", "-d", "990", "-r", "T__P", env=two_folds["env"], check=True)
    assert f"folds of `{two_folds['folder'] / 'splits_final.json'}`" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if "| T__P |" in line)
    assert "| 0 1 |" in row  # fold 3 is left out: its validation cases overlap folds 0 and 1


def leaking_checkpoint(path, folder, case: str):
    """A checkpoint pretrained on another dataset holding a renamed copy of ``case`` of dataset 990."""
    ckpt_path = write_checkpoint(path, folder)
    ckpt = torch.load(ckpt_path, weights_only=True)
    fingerprint = dataset_fingerprints("990", "imagesTr", 1, progress=False)[case]
    ckpt["pretrain"]["datasets"] = ["Dataset991_Pool"]
    ckpt["pretrain"]["case_fingerprints"] = {"Dataset991_Pool/renamed_scan": fingerprint, "Dataset991_Pool/other": "0"}
    save_atomic(ckpt, ckpt_path)
    return ckpt_path


def test_the_probe_warns_about_scored_cases_its_checkpoint_saw_and_strict_refuses(two_folds, tmp_path):
    """Fold 1's first validation case is in the checkpoint's pretraining under another name: the probe of fold 1
    warns (and its report says so, with the split file), --strict refuses before anything is written; the probe of
    fold 0, whose validation cases the checkpoint never saw, says that it checked them. The report goes into a
    $nnUNet_results that did not exist."""
    seen = two_folds["splits"][1]["val"][0]
    ckpt = leaking_checkpoint(tmp_path / "leaky.pth", two_folds["folder"], seen)
    args = ["nnUNetv2_hiendmae_probe", "-d", "990", "-pt", str(ckpt), *FAST_PROBE]
    strict = run_cli(*args, "-f", "1", "--strict", env=two_folds["env"])
    lines = [line for line in strict.stderr.splitlines() if line.strip() and "content fingerprints of" not in line]
    assert strict.returncode == 2 and lines == [lines[-1]], strict.stderr
    assert lines[0].startswith(f"error: -pt {ckpt}: the pretraining saw 1 validation or test case(s) of "
                               "Dataset990_HiEndTest (--strict): fold 1 validation: " + seen)
    assert not two_folds["results"].exists()

    warned = run_cli(*args, "-f", "1", env=two_folds["env"], check=True)
    assert f"warning: {ckpt}: the pretraining saw 1 validation or test case(s)" in warned.stderr
    assert f"fold 1 validation: {seen} (as Dataset991_Pool/renamed_scan)" in warned.stderr
    report = (two_folds["results"] / "Dataset990_HiEndTest" / "hiendmae_probe_nnUNetPlans_3d_fullres_fold_1"
              / "probe.md").read_text()
    assert f"Fold 1 of {two_folds['folder'] / 'splits_final.json'}." in report
    assert f"- {ckpt}: the pretraining saw 1 validation or test case(s)" in report

    clean = run_cli(*args, "-f", "0", "--strict", env=two_folds["env"], check=True)
    assert "no validation case of fold(s) 0 of Dataset990_HiEndTest is among the 2 pretraining cases" in clean.stdout
    assert "warning" not in clean.stderr


def test_the_in_run_probe_on_cases_the_run_pretrains_on_is_refused_with_strict(preprocessed_dataset, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*pretrain_args(preprocessed_dataset, out, 1, 1, "--probe-dataset", "990", "--strict"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: --probe-dataset 990: the pretraining saw ") and "fold 0 validation" in lines[0]
    assert not out.exists()


def test_the_study_checks_the_folds_it_scores_against_what_its_checkpoint_saw(two_folds, tmp_path, monkeypatch,
                                                                              capsys):
    """A checkpoint that saw fold 1's first validation case: a study of folds 0 and 1 with an arm that loads it
    warns (and --strict refuses), a study of fold 0 says that it checked the fold and found nothing, and a study whose
    only arm starts from random weights has nothing to check."""
    from nnunetv2_hiendmae import study as st

    for key, value in two_folds["env"].items():
        monkeypatch.setenv(key, value)
    seen = two_folds["splits"][1]["val"][0]
    ckpt = leaking_checkpoint(tmp_path / "leaky.pth", two_folds["folder"], seen)
    args = ["-d", "990", "-pt", str(ckpt), "-p", "T_guard", "--budgets", "100", "--schedule", "smoke", "-device",
            "cpu", "--dry-run"]
    st.main([*args, "--arms", "scratch", "frozen", "nnunet"])  # one arm that loads the checkpoint is enough
    out, err = capsys.readouterr()
    assert "warning: the pretraining saw 1 validation or test case(s) of Dataset990_HiEndTest" in err
    assert f"fold 1 validation: {seen} (as Dataset991_Pool/renamed_scan)" in err and "6 runs" in out
    study = st.setup(st.build_parser().parse_args([*args, "--arms", "frozen"]))
    study.guard = st.leakage_guard(study, False)  # what study.md's section lists
    assert study.guard[0].startswith("the pretraining saw 1 validation or test case(s) of Dataset990_HiEndTest")
    assert f"fold 1 validation: {seen} (as Dataset991_Pool/renamed_scan)" in study.guard
    capsys.readouterr()

    code, lines, _ = cli_error(st.main, [*args, "--arms", "frozen", "--strict"], capsys)
    lines = [line for line in lines if line.strip() and "content fingerprints of" not in line]  # progress bars
    assert code == 2 and len(lines) == 1 and lines[0].startswith(
        "error: the pretraining saw 1 validation or test case(s) of Dataset990_HiEndTest (--strict): fold 1 "
        f"validation: {seen}"), lines

    st.main([*args, "--arms", "frozen", "-f", "0", "--strict"])
    out, err = capsys.readouterr()
    assert "no validation case of fold(s) 0 of Dataset990_HiEndTest is among the 2 pretraining cases" in out
    assert "warning" not in err
    st.main([*args, "--arms", "scratch", "--strict"])  # random weights: the checkpoint's pretraining is not used
    out, err = capsys.readouterr()
    assert "pretraining" not in out + err and not two_folds["results"].exists()


def test_compare_checks_each_pretrained_entry_on_its_folds_and_says_so(two_folds, tmp_path, monkeypatch, capsys):
    """Three entries scored on folds 0 and 1: our pretrained trainer on plans naming a checkpoint that saw fold 1's
    first validation case (a warning, a section of comparison.md; --strict refuses and writes nothing), the same
    ViT from scratch and nnU-Net's own trainer (neither loads the checkpoint: nothing to check). On fold 0 alone the
    guard reports the fold clean; plans naming a checkpoint that is gone give a note."""
    from nnunetv2_hiendmae import compare

    for key, value in two_folds["env"].items():
        monkeypatch.setenv(key, value)
    seen = two_folds["splits"][1]["val"][0]
    ckpt = leaking_checkpoint(tmp_path / "leaky.pth", two_folds["folder"], seen)
    results = two_folds["results"] / "Dataset990_HiEndTest"
    entries = {"nnUNetTrainer__nnUNetPlans": None, "nnUNetTrainerHiEndMAE_smoke__T_leak": str(ckpt),
               "nnUNetTrainerHiEndMAE_scratch_smoke__T_leak": str(ckpt),
               "nnUNetTrainerHiEndMAE_frozen_smoke__T_gone": str(tmp_path / "gone.pth"),
               "nnUNetTrainerHiEndMAE_staged_smoke__T_noinfo": None}
    for i, (entry, checkpoint) in enumerate(entries.items()):
        folder = results / f"{entry}__3d_fullres"
        for fold in (0, 1):
            write_summary(folder / f"fold_{fold}" / "validation" / "summary.json", {1: 0.5 + 0.1 * i - 0.07 * fold,
                                                                                   2: 0.3 + 0.05 * i + 0.02 * fold})
        (folder / "plans.json").write_text(json.dumps({"pretrain_info": {"checkpoint": checkpoint}}
                                                      if "noinfo" not in entry else {"pretrain_info": None}))
    out_dir = tmp_path / "report"
    argv = ["-d", "990", "-r", *entries, "-o", str(out_dir)]

    code, lines, _ = cli_error(compare.main, [*argv, "--strict"], capsys)
    lines = [line for line in lines if line.strip() and "content fingerprints of" not in line]  # progress bars
    assert code == 2 and len(lines) == 1 and lines[0].startswith(
        "error: nnUNetTrainerHiEndMAE_smoke__T_leak: the pretraining saw 1 validation or test case(s) of "
        f"Dataset990_HiEndTest (--strict): fold 1 validation: {seen}"), lines
    assert not out_dir.exists()

    compare.main(argv)
    out, err = capsys.readouterr()
    assert (f"warning: nnUNetTrainerHiEndMAE_smoke__T_leak: fold 1 validation: {seen} "
            "(as Dataset991_Pool/renamed_scan)") in err
    assert f"note: nnUNetTrainerHiEndMAE_frozen_smoke__T_gone: its pretraining checkpoint {tmp_path / 'gone.pth'} " \
           "is not there" in out
    section = (out_dir / "comparison.md").read_text().split("## Leakage guard\n\n")[1].split("\n\n")[0].splitlines()
    assert section == ["- nnUNetTrainerHiEndMAE_smoke__T_leak: the pretraining saw 1 validation or test case(s) of "
                       "Dataset990_HiEndTest; figures on them are optimistic:",
                       f"- nnUNetTrainerHiEndMAE_frozen_smoke__T_gone: its pretraining checkpoint "
                       f"{tmp_path / 'gone.pth'} is not there: the leakage guard cannot check what the encoder saw",
                       "- nnUNetTrainerHiEndMAE_staged_smoke__T_noinfo: its plans.json names no pretraining "
                       "checkpoint: the leakage guard cannot check what the encoder saw"]

    compare.main([*argv[:3], "nnUNetTrainer__nnUNetPlans", "nnUNetTrainerHiEndMAE_smoke__T_leak", "-f", "0",
                  "--strict", "-o", str(out_dir)])
    out, err = capsys.readouterr()
    assert ("note: nnUNetTrainerHiEndMAE_smoke__T_leak: leakage guard: no validation case of fold(s) 0 of "
            "Dataset990_HiEndTest is among the 2 pretraining cases") in out and "warning" not in err


def test_compare_guards_entries_of_one_checkpoint_and_folds_with_one_check(tmp_path, monkeypatch):
    """The frozen and the full fine-tuning of one checkpoint, scored on the same folds: the dataset's images are read
    for the guard once, and each entry gets the result under its own name; other folds are checked again."""
    from nnunetv2_hiendmae import checkpoint as checkpoint_module
    from nnunetv2_hiendmae import compare, leakage

    ckpt = tmp_path / "pre.pth"
    ckpt.write_bytes(b"")
    calls = []

    def check(pretrain, dataset, strict, scored_folds):
        calls.append(list(scored_folds))
        return [f"  fold {scored_folds[-1]} validation: case_00{len(calls)}"], []

    monkeypatch.setattr(leakage, "check_checkpoint", check)
    monkeypatch.setattr(checkpoint_module, "load_checkpoint", lambda path: {"pretrain": {}})
    entries = []
    for name, folds in (("nnUNetTrainerHiEndMAE_smoke__P", (0, 1)), ("nnUNetTrainerHiEndMAE_frozen_smoke__P", (0, 1)),
                        ("nnUNetTrainerHiEndMAE_staged_smoke__P", (0, 2))):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "plans.json").write_text(json.dumps({"pretrain_info": {"checkpoint": str(ckpt)}}))
        entries.append(compare.EntryResult(name, folder, dict.fromkeys(folds)))
    checked: dict = {}
    said = [compare.leakage_guard(entry, "Dataset990_HiEndTest", False, checked)[0] for entry in entries]
    assert calls == [[0, 1], [0, 2]]
    assert said == [["nnUNetTrainerHiEndMAE_smoke__P: fold 1 validation: case_001"],
                    ["nnUNetTrainerHiEndMAE_frozen_smoke__P: fold 1 validation: case_001"],
                    ["nnUNetTrainerHiEndMAE_staged_smoke__P: fold 2 validation: case_002"]]
