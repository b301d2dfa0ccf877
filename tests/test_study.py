"""nnUNetv2_hiendmae_study: the runs it plans, how it resumes, its report (numbers against the fold summaries, paired
t intervals, verdicts, learning curve), and the real command end to end with a SIGKILL and a re-run."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TRAIN_ENV, cli_error, console_script, kill_tree, run_cli, write_checkpoint, write_summary
from scipy import stats

from nnunetv2_hiendmae import study as st
from nnunetv2_hiendmae import variants
from nnunetv2_hiendmae.compare import FG_COLUMN

LABELS = {"background": 0, "liver": 1, "tumor": 2}


def fake_study(tmp_path: Path, arms=("pretrained", "scratch", "nnunet"), budgets=(10, 100), folds=(0, 1, 2)):
    results = tmp_path / "results" / "Dataset007_Fake"
    out = tmp_path / "report"
    runs = st.plan_runs(arms, budgets, folds, "250epochs", "nnUNetPlans_HiEndMAE", "nnUNetPlans")
    return st.Study("Dataset007_Fake", tmp_path / "pre.pth", "nnUNetPlans_HiEndMAE", "nnUNetPlans", "250epochs",
                    list(folds), list(budgets), list(arms), "cpu", results, tmp_path / "pre", out, runs=runs)


def test_runs_are_every_arm_budget_and_fold_with_their_trainers(tmp_path):
    study = fake_study(tmp_path, arms=("pretrained", "nnunet", "frozen"), budgets=(25, 100), folds=(0, 1))
    assert [(r.budget, r.fold, r.arm) for r in study.runs][:4] == \
        [(25, 0, "pretrained"), (25, 0, "nnunet"), (25, 0, "frozen"), (25, 1, "pretrained")]
    trainers = {(r.arm, r.budget): (r.trainer, r.plans) for r in study.runs}
    assert trainers[("frozen", 25)] == ("nnUNetTrainerHiEndMAE_frozen_250epochs_budget25", "nnUNetPlans_HiEndMAE")
    assert trainers[("nnunet", 25)] == ("nnUNetTrainerHiEndMAEBaseline_250epochs_budget25", "nnUNetPlans")
    assert trainers[("nnunet", 100)] == ("nnUNetTrainer_250epochs", "nnUNetPlans")  # nnU-Net's own results reused
    assert len({study.fold_dir(r) for r in study.runs}) == len(study.runs) == 12  # never two runs in one folder
    recompute = st.plan_runs(["scratch", "nnunet"], [100], [0], "full", "P", "nnUNetPlans", recompute=True)
    assert [r.trainer for r in recompute] == ["nnUNetTrainerHiEndMAE_scratch_recompute", "nnUNetTrainer"]


def test_resume_point_follows_nnunet_and_sets_unreadable_checkpoints_aside(tmp_path):
    fold = tmp_path / "fold_0"
    fold.mkdir()
    assert st.resume_point(fold) == (None, [])
    torch.save({"current_epoch": 3}, fold / "checkpoint_best.pth")
    assert st.resume_point(fold) == (fold / "checkpoint_best.pth", [])
    torch.save({"current_epoch": 5}, fold / "checkpoint_latest.pth")
    assert st.resume_point(fold) == (fold / "checkpoint_latest.pth", [])  # nnU-Net's --c prefers latest to best
    data = (fold / "checkpoint_latest.pth").read_bytes()
    (fold / "checkpoint_latest.pth").write_bytes(data[: len(data) // 2])  # a write cut short by a kill
    assert st.resume_point(fold) == (fold / "checkpoint_best.pth", [fold / "checkpoint_latest.pth"])


def test_time_estimate_from_finished_runs_per_arm(tmp_path):
    study = fake_study(tmp_path, budgets=(100,), folds=(0, 1, 2))
    assert st.estimate_left(study) is None
    done = {study.runs[0]: 100, study.runs[1]: 40, study.runs[3]: 80}  # pretrained folds 0 and 1, scratch fold 0
    for run in done:
        write_summary(st.compare.summary_path(study.fold_dir(run)), {1: 0.5, 2: 0.5})
    study.out_dir.mkdir()
    (study.out_dir / st.TIMES_FILE).write_text(json.dumps({r.key: {"seconds": s} for r, s in done.items()}))
    # left: pretrained fold 2 (its mean, 90 s), scratch folds 1-2 (40 s each), nnunet folds 0-2 (no time of its own:
    # the mean of all finished runs, 73.3 s)
    assert st.estimate_left(study) == pytest.approx(90 + 2 * 40 + 3 * 220 / 3)
    assert st.status(study, study.runs[3]) == "done (80 s)" and st.status(study, study.runs[2]) == "to do"
    assert "3 of 9 runs done; about 6 min left" in st.listing(study)
    assert ": 9 runs (3 arms x 1 label budget x 3 folds)" in st.listing(study)


# per (arm, budget) and fold: (liver, tumor) Dice. pretrained beats scratch at both budgets in every fold by about
# 0.1; against nnU-Net it wins one fold and loses another (not distinguishable)
DICE = {("pretrained", 10): [(0.70, 0.50), (0.74, 0.52), (0.66, 0.44)],
        ("scratch", 10): [(0.60, 0.40), (0.62, 0.44), (0.57, 0.33)],
        ("nnunet", 10): [(0.80, 0.50), (0.60, 0.40), (0.70, 0.40)],
        ("pretrained", 100): [(0.85, 0.70), (0.84, 0.66), (0.80, 0.62)],
        ("scratch", 100): [(0.75, 0.60), (0.76, 0.54), (0.71, 0.50)],
        ("nnunet", 100): [(0.90, 0.70), (0.80, 0.60), (0.83, 0.70)]}


def test_report_numbers_intervals_verdicts_and_figure(tmp_path):
    study = fake_study(tmp_path)
    for run in study.runs:
        write_summary(st.compare.summary_path(study.fold_dir(run)), dict(zip((1, 2), DICE[(run.arm, run.budget)]
                                                                             [run.fold])))
        (study.fold_dir(run).parent / "dataset.json").write_text(json.dumps({"labels": LABELS}))
    report = st.collect(study)
    files = st.write_report(report)
    assert sorted(p.name for p in study.out_dir.iterdir()) == \
        ["learning_curve.png", "study.md", "study_dice.csv", "study_differences.csv"]  # no temporary file left
    assert [f.name for f in files] == ["study.md", "study_dice.csv", "study_differences.csv", "learning_curve.png"]

    fg = {key: np.array([np.mean(v) for v in values]) for key, values in DICE.items()}
    dice = list(csv.DictReader((study.out_dir / "study_dice.csv").open()))
    row = next(r for r in dice if (r["arm"], r["budget_percent"], r["fold"]) == ("scratch", "10", "mean"))
    assert float(row[FG_COLUMN]) == pytest.approx(fg[("scratch", 10)].mean())
    assert float(row["Dice liver"]) == pytest.approx(np.mean([v[0] for v in DICE[("scratch", 10)]]))
    row = next(r for r in dice if (r["arm"], r["budget_percent"], r["fold"]) == ("nnunet", "100", "std"))
    assert float(row[FG_COLUMN]) == pytest.approx(fg[("nnunet", 100)].std(ddof=1))
    assert row["entry"] == "nnUNetTrainer_250epochs__nnUNetPlans"

    differences = list(csv.DictReader((study.out_dir / "study_differences.csv").open()))
    assert {(r["arm"], r["reference"]) for r in differences} == {("pretrained", "scratch"), ("pretrained", "nnunet")}
    t = stats.t.ppf(0.975, 2)  # 3 folds: 4.303
    for budget in (10, 100):
        for reference, expected in (("scratch", "better than"), ("nnunet", "not distinguishable")):
            d = fg[("pretrained", budget)] - fg[(reference, budget)]
            half = t * d.std(ddof=1) / math.sqrt(3)
            r = next(r for r in differences if (r["budget_percent"], r["reference"], r["metric"]) ==
                     (str(budget), reference, FG_COLUMN))
            assert float(r["mean_difference"]) == pytest.approx(d.mean())
            assert (float(r["ci95_low"]), float(r["ci95_high"])) == \
                (pytest.approx(d.mean() - half), pytest.approx(d.mean() + half))
            assert r["n_folds"] == "3" and r["paired_folds"] == "0 1 2" and expected in r["verdict"], r
    md = (study.out_dir / "study.md").read_text()
    d = fg[("pretrained", 10)] - fg[("scratch", 10)]
    half = t * d.std(ddof=1) / math.sqrt(3)
    assert (f"- label budget 10 %: pretrained ViT better than ViT from scratch (Δ mean fg Dice {d.mean():+.4f}, "
            f"95 % CI [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}], 3 folds)") in md
    assert "- label budget 100 %: pretrained ViT vs nnU-Net default: not distinguishable at 3 folds" in md
    assert "paired t interval" in md and "![mean fg Dice against the label budget](learning_curve.png)" in md
    assert "| ViT from scratch | nnUNetTrainerHiEndMAE_scratch_250epochs_budget10__nnUNetPlans_HiEndMAE | 0 1 2 |" in md

    fig = st.learning_curve_figure(report)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["pretrained ViT", "ViT from scratch",
                                                                    "nnU-Net default"]
    for line, arm in zip(ax.get_lines(), ("pretrained", "scratch", "nnunet")):
        assert list(line.get_xdata()) == [10, 100]
        assert list(line.get_ydata()) == pytest.approx([fg[(arm, 10)].mean(), fg[(arm, 100)].mean()])
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["10 %", "100 %"]
    assert (study.out_dir / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, expected", [
    (["-d", "990", "-pt", "missing.pth"], "error: checkpoint not found"),
    (["-d", "123", "-pt", "{ckpt}"], "error: dataset '123' not found"),
    (["-d", "990", "-pt", "{ckpt}", "-f", "0", "0"], "error: -f lists a value twice"),
    (["-d", "990", "-pt", "{ckpt}", "--budgets", "30"], "error: argument --budgets: invalid choice: 30"),
    (["-d", "990", "-pt", "{ckpt}", "--arms", "linear"], "error: argument --arms: invalid choice: 'linear'"),
    (["-d", "990", "-pt", "{ckpt}", "-p", "T_study_other"], "error: plans T_study_other were written for "),
    (["-d", "990", "-pt", "{ckpt}", "-p", "nnUNetPlans"], "error: -p nnUNetPlans would be nnU-Net's own plans"),
    (["-d", "990", "-pt", "{ckpt}", "--nnunet-plans", "Missing"], "error: the nnunet arm needs "),
])
def test_bad_input_is_one_line_and_writes_nothing(preprocessed_dataset, nnunet_dirs, tmp_path, capsys, args, expected):
    from nnunetv2_hiendmae.plans import main as plan_main

    folder = preprocessed_dataset["preprocessed"]
    ckpt = write_checkpoint(tmp_path / "pre.pth", folder)
    other = write_checkpoint(tmp_path / "other.pth", folder, seed=1)
    if not (folder / "T_study_other.json").exists():
        plan_main(["-d", "990", "-pt", str(other), "-o", "T_study_other"])
    before = sorted(p.name for p in folder.iterdir()), sorted(p.name for p in nnunet_dirs["nnUNet_results"].rglob("*"))
    code, lines, _ = cli_error(st.main, [*[a.format(ckpt=ckpt) for a in args], "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(expected), lines
    assert not (tmp_path / "out").exists()
    after = sorted(p.name for p in folder.iterdir()), sorted(p.name for p in nnunet_dirs["nnUNet_results"].rglob("*"))
    assert after == before


def test_the_installed_command_reports_bad_input_in_one_line(preprocessed_dataset, tmp_path):
    """The console script itself, once: one line on stderr even after torch and nnU-Net are imported."""
    ckpt = write_checkpoint(tmp_path / "pre.pth", preprocessed_dataset["preprocessed"])
    proc = run_cli("nnUNetv2_hiendmae_study", "-d", "123", "-pt", str(ckpt), "-o", str(tmp_path / "out"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: dataset '123' not found"), lines
    assert not (tmp_path / "out").exists()


def wait_for(condition, proc: subprocess.Popen, timeout: float = 1500) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the study ended before the kill"
        assert time.monotonic() < end, "timed out waiting for the study"
        time.sleep(0.2)


@pytest.mark.slow
def test_study_end_to_end_survives_a_kill_and_reports(preprocessed_dataset, tmp_path, capsys, monkeypatch):
    """2 folds x 2 arms (frozen pretrained ViT, nnU-Net default) at the 50 % label budget on the smoke schedule
    through the real nnUNetv2_train; SIGKILL once two runs are done and the third has a checkpoint; the re-run redoes
    nothing finished, continues the interrupted run with --c, and reports what the summaries say. (The scratch arm
    and the full budget run in tests/test_demo.py's study; the report's statistics for three arms and two budgets are
    checked on summaries in this file, the trainer of every arm and budget in
    test_runs_are_every_arm_budget_and_fold_with_their_trainers.)"""
    # a results tree of its own (nnUNetv2_train creates it): other tests' folds of these trainers leave this one's
    # listing as it is
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "nnUNet_results"))
    folder = preprocessed_dataset["preprocessed"]
    ckpt = write_checkpoint(tmp_path / "pre.pth", folder)
    out = tmp_path / "study"
    # folds 1 and 2 validate on one case each (fold 0 on two): the cheapest two folds of dataset 990
    args = ["-d", "990", "-pt", str(ckpt), "-p", "T_study", "-f", "1", "2", "--budgets", "50", "--arms",
            "frozen", "nnunet", "--schedule", "smoke", "-device", "cpu", "-o", str(out)]

    st.main([*args, "--dry-run"])  # in this process: the listing needs no process of its own
    dry = capsys.readouterr().out
    assert "4 runs (2 arms x 1 label budget x 2 folds)" in dry and "to be written" in dry
    assert dry.count("to do") == 4 and "no time estimate" in dry
    assert not out.exists() and not (folder / "T_study.json").exists()  # a dry run writes nothing

    study = st.setup(st.build_parser().parse_args(args))
    with open(tmp_path / "first.log", "wb") as log:
        proc = subprocess.Popen([console_script("nnUNetv2_hiendmae_study"), *args], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, **TRAIN_ENV}, start_new_session=True)
        try:
            third = study.fold_dir(study.runs[2])
            # killed once the third run's first checkpoint is complete (a torch zip with its directory)
            wait_for(lambda: len(study.times()) >= 2 and zipfile.is_zipfile(third / "checkpoint_best.pth"), proc)
        finally:
            kill_tree(proc)
    finished = {r.key: st.compare.summary_path(study.fold_dir(r)).stat().st_mtime_ns for r in study.runs[:2]}
    interrupted = st.status(study, study.runs[2])
    assert interrupted.startswith("interrupted: continues from checkpoint_"), interrupted

    again = run_cli("nnUNetv2_hiendmae_study", *args, env=TRAIN_ENV, check=True, timeout=2400)
    assert f"[1/4] {study.runs[0].title()}: done" in again.stdout
    assert f"[2/4] {study.runs[1].title()}: done" in again.stdout
    assert again.stdout.count("$ nnUNetv2_train") == 2  # the two finished runs are not redone
    assert f"=== [3/4] {study.runs[2].title()} ({study.runs[2].trainer}): {interrupted}" in again.stdout
    assert study.runs[2].arm == "frozen"  # the third run: fold 2's frozen ViT, on the study's plans
    assert f"-tr {study.runs[2].trainer} -p T_study -device cpu --c\n" in again.stdout
    for run in study.runs[:2]:
        assert st.compare.summary_path(study.fold_dir(run)).stat().st_mtime_ns == finished[run.key]
    assert all(study.finished(r) for r in study.runs) and len(study.times()) == 4
    assert "$ nnUNetv2_hiendmae_plan" not in again.stdout  # the plans were written once, by the first run

    # the report holds what the fold summaries say
    assert sorted(p.name for p in out.iterdir()) == ["learning_curve.png", "study.md", "study_dice.csv",
                                                     "study_differences.csv", st.TIMES_FILE]
    fg = {(r.arm, r.budget, r.fold): json.loads(st.compare.summary_path(study.fold_dir(r)).read_text())
          ["foreground_mean"]["Dice"] for r in study.runs}
    dice = {(r["arm"], r["budget_percent"], r["fold"]): r for r in csv.DictReader((out / "study_dice.csv").open())}
    for (arm, budget, fold), value in fg.items():
        assert float(dice[(arm, str(budget), str(fold))][FG_COLUMN]) == pytest.approx(value)
    differences = list(csv.DictReader((out / "study_differences.csv").open()))
    for budget in (50,):
        for reference in ("nnunet",):
            d = np.array([fg[("frozen", budget, f)] - fg[(reference, budget, f)] for f in (1, 2)])
            half = stats.t.ppf(0.975, 1) * d.std(ddof=1) / math.sqrt(2)
            row = next(r for r in differences if (r["budget_percent"], r["reference"], r["metric"]) ==
                       (str(budget), reference, FG_COLUMN))
            assert float(row["ci95_low"]) == pytest.approx(d.mean() - half)
            assert float(row["ci95_high"]) == pytest.approx(d.mean() + half)
            assert f"label budget {budget} %: {row['verdict']}" in again.stdout
    md = (out / "study.md").read_text()
    assert "95 % CI" in md and "## Verdicts (mean fg Dice)" in md and "learning_curve.png" in md
    # the checkpoint pretrained on dataset 990 itself: the validation case of each fold scored is named
    assert ("## Leakage guard\n\n- the pretraining saw 2 validation or test case(s) of Dataset990_HiEndTest; figures "
            "on them are optimistic:\n- fold 1 validation: ") in md
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the label budget: the same nested cases for every arm of a fold, recorded in each fold folder
    for fold in (1, 2):
        records = [json.loads((study.fold_dir(r) / "label_budget.json").read_text())
                   for r in study.runs if r.budget == 50 and r.fold == fold]
        assert len(records) == 2 and all(r["training_cases"] == records[0]["training_cases"] for r in records)
        split = json.loads((folder / "splits_final.json").read_text())[fold]
        assert records[0]["training_cases"] == variants.budget_cases(split["train"], 50, fold)

    # the frozen run: its final encoder is the pretrained one, bit for bit
    from nnunetv2_hiendmae.trainers import nnUNetTrainerHiEndMAE_frozen_smoke
    from nnunetv2_hiendmae.weights import load_pretrained_encoder

    frozen = next(r for r in study.runs if r.arm == "frozen" and r.fold == 1)
    final = torch.load(study.fold_dir(frozen) / "checkpoint_final.pth", weights_only=False)["network_weights"]
    plans = json.loads((folder / "T_study.json").read_text())
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    network = nnUNetTrainerHiEndMAE_frozen_smoke.build_network_architecture(  # (the encoder is the same for any head)
        manager, manager.get_configuration("3d_fullres"), 1, 2, False)
    load_pretrained_encoder(network, torch.load(ckpt, weights_only=True))
    for key, value in network.encoder.state_dict().items():
        assert torch.equal(final[f"encoder.{key}"], value), key
