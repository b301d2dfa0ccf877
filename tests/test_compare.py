"""Tests for nnUNetv2_hiendmae_compare on fake nnUNet_results trees (CPU, no training needed)."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_summary

from nnunetv2_hiendmae import compare as cmp

DATASET = "Dataset007_Fake"
REF = "nnUNetTrainer__nnUNetPlans"
OURS = "nnUNetTrainer_HiEndMAE__nnUNetPlans"
CFG = "3d_fullres"

# per-fold (liver, tumor) Dice; the reference has folds 0-2, ours only 0-1 (fold_2 unfinished)
REF_DICE = {0: (0.80, 0.60), 1: (0.82, 0.64), 2: (0.78, 0.62)}
OURS_DICE = {0: (0.85, 0.70), 1: (0.84, 0.66)}


def make_entry(root: Path, entry: str, dice: dict, labels: dict | None = None, cfg: str = CFG,
               keys: tuple = (1, 2)) -> Path:
    folder = root / DATASET / f"{entry}__{cfg}"
    folder.mkdir(parents=True, exist_ok=True)
    if labels is not None:
        (folder / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".nii.gz"}))
    for fold, values in dice.items():
        write_summary(folder / f"fold_{fold}" / "validation" / "summary.json", dict(zip(keys, values)))
    return folder


@pytest.fixture
def results(tmp_path: Path) -> Path:
    root = tmp_path / "nnUNet_results"
    make_entry(root, REF, REF_DICE, labels={"background": 0, "liver": 1, "tumor": 2})
    ours = make_entry(root, OURS, OURS_DICE)
    (ours / "fold_2").mkdir()  # started but no validation yet
    write_summary(ours / "fold_all" / "validation" / "summary.json", {1: 0.99, 2: 0.99})  # must be ignored
    for name in ("nnUNet_raw", "nnUNet_preprocessed"):
        (tmp_path / name).mkdir()
    return root


@pytest.fixture
def env(results: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """nnU-Net path variables for the fake tree, both in this process and for subprocesses."""
    values = {"nnUNet_results": str(results), "nnUNet_raw": str(results.parent / "nnUNet_raw"),
              "nnUNet_preprocessed": str(results.parent / "nnUNet_preprocessed")}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return values


def run_cli(args: list[str], env_vars: dict | None) -> subprocess.CompletedProcess:
    """Run the installed console script with only the given nnU-Net variables set."""
    script = shutil.which("nnUNetv2_hiendmae_compare", path=str(Path(sys.executable).parent))
    cmd = [script] if script else [sys.executable, "-m", "nnunetv2_hiendmae.compare"]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    environ.update(env_vars or {})
    environ["MPLBACKEND"] = "Agg"
    return subprocess.run(cmd + args, env=environ, capture_output=True, text=True, timeout=120)


def fg(dice: tuple) -> float:
    return float(np.mean(dice))


# ------------------------------------------------------------------------------------------ numbers


def test_statistics_by_hand():
    m, s = cmp.mean_std([0.70, 0.73, 0.70])
    assert m == pytest.approx(0.71)
    assert s == pytest.approx(math.sqrt((0.01 ** 2 + 0.02 ** 2 + 0.01 ** 2) / 2))
    m, s = cmp.mean_std([0.5, math.nan])
    assert m == 0.5 and math.isnan(s)
    assert all(math.isnan(v) for v in cmp.mean_std([math.nan]))
    p = cmp.paired_difference({0: 0.9, 1: 0.8, 3: 0.7}, {0: 0.85, 1: 0.78, 2: 0.5})
    assert p.folds == [0, 1]
    assert p.mean == pytest.approx((0.05 + 0.02) / 2)
    assert p.std == pytest.approx(math.sqrt(2 * 0.015 ** 2))


def test_canonical_key_matches_nnunet():
    from nnunetv2.evaluation.evaluate_predictions import key_to_label_or_region, label_or_region_to_key

    for value in (1, 12, (1, 2, 3), (2,)):
        key = label_or_region_to_key(value)
        expected = key_to_label_or_region(key)
        assert cmp.canonical_key(key) == (expected if isinstance(expected, tuple) else (expected,))


def test_compare_values(env, results, tmp_path):
    out = tmp_path / "out"
    comp = cmp.compare("7", [REF, OURS], CFG, None, out)
    assert comp.dataset == DATASET
    assert comp.classes == [(1,), (2,)]
    assert comp.class_names == {(1,): "liver", (2,): "tumor"}
    ref, ours = comp.entries
    assert ref.fold_ids() == [0, 1, 2]
    assert ours.fold_ids() == [0, 1]  # fold_2 has no summary, fold_all ignored
    for f, d in REF_DICE.items():
        assert ref.folds[f].class_dice == {(1,): pytest.approx(d[0]), (2,): pytest.approx(d[1])}
        assert ref.folds[f].fg_dice == pytest.approx(fg(d))

    ref_fg = [fg(d) for d in REF_DICE.values()]  # 0.70, 0.73, 0.70
    m, s = comp.mean_std(ref, cmp.FG_COLUMN)
    assert m == pytest.approx(np.mean(ref_fg)) and m == pytest.approx(0.71)
    assert s == pytest.approx(np.std(ref_fg, ddof=1))
    m, s = comp.mean_std(ours, (2,))
    assert m == pytest.approx(0.68) and s == pytest.approx(math.sqrt(2 * 0.02 ** 2))

    p = comp.paired(ours, cmp.FG_COLUMN)
    diffs = [fg(OURS_DICE[f]) - fg(REF_DICE[f]) for f in (0, 1)]  # 0.075, 0.02
    assert p.folds == [0, 1]
    assert p.mean == pytest.approx(0.0475) and p.mean == pytest.approx(np.mean(diffs))
    assert p.std == pytest.approx(np.std(diffs, ddof=1))
    p = comp.paired(ours, (1,))
    assert p.mean == pytest.approx(0.035) and p.std == pytest.approx(math.sqrt(2 * 0.015 ** 2))

    text = "\n".join(comp.warnings)
    assert f"{OURS}: fold 2 skipped" in text and "summary.json not found" in text
    assert "folds differ between entries" in text
    assert f"{REF}: 0 1 2" in text and f"{OURS}: 0 1" in text
    assert sorted(p.name for p in out.iterdir()) == ["comparison.csv", "comparison.md", "comparison.png"]


def test_cli_outputs(env, results):
    proc = run_cli(["-d", "7", "-r", REF, OURS], env)
    assert proc.returncode == 0, proc.stderr
    out = results / DATASET / f"hiendmae_compare_{CFG}"  # default location

    # stdout: the table, with hand-computed numbers
    assert "| liver | tumor | mean fg Dice |" in proc.stdout
    assert f"| nnU-Net default | {REF} | 0 1 2 | 0.8000 ± 0.0200 | 0.6200 ± 0.0200 | 0.7100 ± 0.0173 | reference |" \
        in proc.stdout
    assert f"| HiEndMAE | {OURS} | 0 1 | 0.8450 ± 0.0071 | 0.6800 ± 0.0283 | 0.7625 ± 0.0177 | +0.0475 ± 0.0389 " \
           "(n=2) |" in proc.stdout
    assert "| fold 0 | fold 1 | fold 2 |" in proc.stdout and "| HiEndMAE | 0.7750 | 0.7500 | — |" in proc.stdout
    # the paired differences with their 95 % paired t interval (t(0.975, 1) = 12.706) and the verdict
    half = 12.7062047 * math.sqrt(2 * 0.0275 ** 2) / math.sqrt(2)
    assert f"| HiEndMAE | 0 1 | +0.0350 [{0.035 - 12.7062047 * 0.015:+.4f}, {0.035 + 12.7062047 * 0.015:+.4f}] |" \
        in proc.stdout
    assert (f"- HiEndMAE vs nnU-Net default: not distinguishable at 2 folds (Δ mean fg Dice +0.0475, 95 % CI "
            f"[{0.0475 - half:+.4f}, {0.0475 + half:+.4f}], 2 folds)") in proc.stdout
    # stderr: plain warnings about folds
    assert "warning: folds differ between entries" in proc.stderr
    assert f"warning: {OURS}: fold 2 skipped" in proc.stderr

    files = sorted(p.name for p in out.iterdir())
    assert files == ["comparison.csv", "comparison.md", "comparison.png"]  # no temp files left behind
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "comparison.md").read_text()
    assert "## Notes" in md and "folds differ between entries" in md and "+0.0475 ± 0.0389" in md

    rows = list(csv.DictReader((out / "comparison.csv").open()))
    by = {(r["entry"], r["fold"]): r for r in rows}
    assert set(by) == {(REF, "0"), (REF, "1"), (REF, "2"), (REF, "mean"), (REF, "std"),
                       (OURS, "0"), (OURS, "1"), (OURS, "mean"), (OURS, "std"), (OURS, "ci95_low"), (OURS, "ci95_high")}
    assert by[(REF, "0")]["arm"] == "nnU-Net default" and by[(OURS, "mean")]["arm"] == "HiEndMAE"
    half = 12.7062047 * math.sqrt(2 * 0.0275 ** 2) / math.sqrt(2)
    assert float(by[(OURS, "ci95_low")]["delta mean fg Dice"]) == pytest.approx(0.0475 - half)
    assert float(by[(OURS, "ci95_high")]["delta mean fg Dice"]) == pytest.approx(0.0475 + half)
    assert by[(OURS, "ci95_low")]["mean fg Dice"] == ""  # an interval of the difference, not of the entry
    r = by[(OURS, "0")]
    assert float(r["Dice liver"]) == pytest.approx(0.85)
    assert float(r["delta liver"]) == pytest.approx(0.05)
    assert float(r["mean fg Dice"]) == pytest.approx(0.775)
    assert float(r["delta mean fg Dice"]) == pytest.approx(0.075)
    r = by[(OURS, "mean")]
    assert r["n_folds"] == "2" and r["folds"] == "0 1" and r["paired_folds"] == "0 1"
    assert float(r["mean fg Dice"]) == pytest.approx(0.7625)
    assert float(r["delta mean fg Dice"]) == pytest.approx(0.0475)
    assert float(r["delta tumor"]) == pytest.approx((0.10 + 0.02) / 2)
    r = by[(OURS, "std")]
    assert float(r["mean fg Dice"]) == pytest.approx(math.sqrt(2 * 0.0125 ** 2))
    assert float(r["delta mean fg Dice"]) == pytest.approx(math.sqrt(2 * 0.0275 ** 2))
    r = by[(REF, "std")]
    assert float(r["mean fg Dice"]) == pytest.approx(math.sqrt(0.0006 / 2))
    assert r["delta mean fg Dice"] == "" and by[(REF, "2")]["delta liver"] == ""


def test_cli_fold_selection(env, results, tmp_path):
    out = tmp_path / "sel"
    proc = run_cli(["-d", DATASET, "-r", REF, OURS, "-f", "0", "1", "-o", str(out)], env)
    assert proc.returncode == 0, proc.stderr
    assert "folds differ" not in proc.stderr and proc.stderr == ""
    rows = {(r["entry"], r["fold"]): r for r in csv.DictReader((out / "comparison.csv").open())}
    assert float(rows[(REF, "mean")]["mean fg Dice"]) == pytest.approx(0.715)
    assert rows[(REF, "mean")]["folds"] == "0 1"

    proc = run_cli(["-d", DATASET, "-r", OURS, REF, "-f", "1", "4", "-o", str(out)], env)
    assert proc.returncode == 0, proc.stderr
    assert f"warning: {OURS}: fold 4 missing" in proc.stderr
    assert f"warning: {REF}: fold 4 missing" in proc.stderr
    rows = {(r["entry"], r["fold"]): r for r in csv.DictReader((out / "comparison.csv").open())}
    assert float(rows[(REF, "mean")]["delta mean fg Dice"]) == pytest.approx(0.73 - 0.75)


def test_nan_class_and_regions(env, results, tmp_path):
    entry = "nnUNetTrainer__nnUNetResEncUNetMPlans"
    make_entry(results, entry, {0: (0.9, math.nan), 1: (0.8, 0.5)}, keys=((1, 2), (2,)),
               labels={"background": 0, "whole": [1, 2], "core": [2]})
    comp = cmp.compare(7, [entry], CFG, None, tmp_path / "o")
    e = comp.entries[0]
    assert comp.class_names == {(1, 2): "whole", (2,): "core"}
    assert math.isnan(e.folds[0].class_dice[(2,)])
    assert e.folds[0].fg_dice == pytest.approx(0.9)  # nnU-Net's own fg mean is nan here
    assert comp.mean_std(e, (2,))[0] == pytest.approx(0.5)  # nanmean over folds
    assert comp.mean_std(e, cmp.FG_COLUMN)[0] == pytest.approx((0.9 + 0.65) / 2)
    assert any("fold 0: Dice of class core is nan" in w for w in comp.warnings)
    rows = {(r["entry"], r["fold"]): r for r in csv.DictReader((tmp_path / "o" / "comparison.csv").open())}
    assert rows[(entry, "0")]["Dice core"] == "nan"


def test_no_shared_fold(env, results, tmp_path):
    entry = "nnUNetTrainer__nnUNetResEncUNetLPlans"
    make_entry(results, entry, {4: (0.5, 0.5)})
    comp = cmp.compare(7, [REF, entry], CFG, None, tmp_path / "o")
    assert any(f"{entry} shares no fold with {REF}" in w for w in comp.warnings)
    p = comp.paired(comp.entries[1], cmp.FG_COLUMN)
    assert p.folds == [] and math.isnan(p.mean)
    assert "no shared fold" in (tmp_path / "o" / "comparison.md").read_text()


# ------------------------------------------------------------------------------------------- errors


def _broken_tree(results: Path) -> None:
    (results / DATASET / f"nnUNetTrainer__Empty__{CFG}" / "fold_0").mkdir(parents=True)
    bad = results / DATASET / f"nnUNetTrainer__Broken__{CFG}" / "fold_0" / "validation"
    bad.mkdir(parents=True)
    (bad / "summary.json").write_text('{"foreground_mean": {"Dice": 0.5}}')


@pytest.mark.parametrize("args, unset, expected", [
    (["-d", "7", "-r", REF], True, "error: nnUNet_results is not set"),
    (["-d", "99", "-r", REF], False, "error: dataset '99' not found"),
    (["-d", "Dataset099_Nope", "-r", REF], False, "error: dataset Dataset099_Nope has no results folder"),
    (["-d", "abc", "-r", REF], False, "error: dataset 'abc' not found"),
    (["-d", "7", "-r", REF, "nnUNetTrainer__MissingPlans"], False,
     "error: no results for nnUNetTrainer__MissingPlans with configuration 3d_fullres"),
    (["-d", "7", "-r", REF, "-c", "2d"], False,
     "error: no results for nnUNetTrainer__nnUNetPlans with configuration 2d"),
    (["-d", "7", "-r", "nnUNetTrainer__Empty"], False, "error: nnUNetTrainer__Empty: no validation/summary.json"),
    (["-d", "7", "-r", REF, "-f", "7", "8"], False, "error: nnUNetTrainer__nnUNetPlans: no validation/summary.json "
                                                    "for folds 7 8"),
    (["-d", "7", "-r", "nnUNetTrainer__Broken"], False, "error: cannot read "),
    (["-d", "7", "-r", "nnUNetTrainer"], False, "error: -r value 'nnUNetTrainer' is not TRAINER__PLANS"),
    (["-d", "7", "-r", f"{REF}__3d_fullres"], False, "drop the configuration part"),
    (["-d", "7", "-r", REF, REF], False, "is given more than once"),
    (["-d", "7", "-r", REF, "-f", "x"], False, "error: argument -f/--folds: invalid int value"),
    (["-d", "7", "-r", REF, "-f", "-1"], False, "error: -f needs one or more non-negative fold numbers"),
    (["-r", REF], False, "error: the following arguments are required: -d/--dataset"),
])
def test_bad_input(env, results, args, unset, expected):
    _broken_tree(results)
    before = sorted(p.name for p in (results / DATASET).iterdir())
    proc = run_cli(args, None if unset else env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected in lines[0]
    assert proc.stdout == ""
    assert sorted(p.name for p in (results / DATASET).iterdir()) == before  # nothing written


def test_output_path_is_a_file(env, results, tmp_path):
    target = tmp_path / "taken"
    target.write_text("keep me")
    proc = run_cli(["-d", "7", "-r", REF, "-o", str(target)], env)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: output path")
    assert target.read_text() == "keep me"


def test_help_explains_flags():
    proc = run_cli(["--help"], None)
    assert proc.returncode == 0
    for flag in ("--dataset", "--configuration", "--entries", "--folds", "--output-dir", "paired"):
        assert flag in proc.stdout


def _texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_figure_labels_folds_and_says_when_there_is_no_spread(env, results, tmp_path):
    from matplotlib.collections import LineCollection

    make_entry(results, "nnUNetTrainer__OneFold", {3: (0.7, 0.5)})
    comp = cmp.compare(7, [REF, "nnUNetTrainer__OneFold"], CFG, None, tmp_path / "o")
    fig = cmp.comparison_figure(comp)
    texts = _texts(fig)
    assert {"fold 0", "fold 1", "fold 2", "fold 3"} <= set(texts)  # each dot says which fold it is
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["nnU-Net default (nnUNetPlans)", "nnU-Net default (OneFold)\n(1 fold: no spread)"]
    fg = fig.axes[0]
    bars = [c for c in fg.collections if isinstance(c, LineCollection)]
    assert len(bars) == 1 and len(bars[0].get_segments()) == 1  # one error bar: the 3-fold reference only


def test_figure_names_arms_by_short_labels(env, results, tmp_path):
    """Trainer names of 40+ characters ran into each other under the bars: the figure uses short arm names, the
    tables keep the trainer names."""
    names = ["nnUNetTrainerHiEndMAE_250epochs", "nnUNetTrainerHiEndMAE_scratch_250epochs", "nnUNetTrainer_250epochs"]
    entries = [f"{n}__{'nnUNetPlans' if n.startswith('nnUNetTrainer_') else 'nnUNetPlans_HiEndMAE'}" for n in names]
    for entry in entries:
        make_entry(results, entry, REF_DICE)
    comp = cmp.compare(7, entries, CFG, None, tmp_path / "o")
    fig = cmp.comparison_figure(comp)
    labels = ["pretrained ViT", "ViT from scratch", "nnU-Net default"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == labels
    assert [t.get_text() for t in fig.legends[0].get_texts()] == labels
    md = (tmp_path / "o" / "comparison.md").read_text()
    for label, entry in zip(labels, entries):
        assert f"| {label} | {entry} |" in md


def test_entry_labels_name_what_differs():
    assert cmp.entry_labels(["nnUNetTrainerHiEndMAE_budget10__P", "nnUNetTrainerHiEndMAE__P"]) == \
        ["pretrained ViT, 10 % labels", "pretrained ViT"]
    assert cmp.entry_labels(["nnUNetTrainer__nnUNetPlans", "nnUNetTrainer__nnUNetResEncUNetMPlans"]) == \
        ["nnU-Net default (nnUNetPlans)", "nnU-Net default (nnUNetResEncUNetMPlans)"]
    assert cmp.entry_labels(["nnUNetTrainerHiEndMAE_smoke__P", "nnUNetTrainerHiEndMAE_demo__P"]) == \
        ["pretrained ViT, smoke", "pretrained ViT, demo"]


def test_paired_t_interval_by_hand():
    from scipy import stats

    diffs = {0: 0.03, 1: -0.01, 2: 0.05, 3: 0.02, 4: 0.04}
    p = cmp.paired_difference({f: 0.8 + d for f, d in diffs.items()}, {f: 0.8 for f in diffs})
    d = np.array(list(diffs.values()))
    half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)  # t(0.975, 4) = 2.776
    assert stats.t.ppf(0.975, 4) == pytest.approx(2.7764451)
    assert (p.ci_low, p.ci_high) == (pytest.approx(d.mean() - half), pytest.approx(d.mean() + half))
    assert p.ci_low < 0 < p.ci_high  # 0.026 ± 0.029: not distinguishable at 5 folds
    assert cmp.verdict(p, "A", "B").startswith("A vs B: not distinguishable at 5 folds (Δ mean fg Dice +0.0260, "
                                               f"95 % CI [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}]")
    better = cmp.paired_difference({0: 0.9, 1: 0.85, 2: 0.8}, {0: 0.8, 1: 0.76, 2: 0.69})  # +0.10, +0.09, +0.11
    assert better.ci_low > 0 and cmp.verdict(better, "A", "B").startswith("A better than B (Δ mean fg Dice +0.1000")
    worse = cmp.paired_difference({0: 0.8, 1: 0.76, 2: 0.69}, {0: 0.9, 1: 0.85, 2: 0.8})
    assert worse.ci_high < 0 and cmp.verdict(worse, "A", "B").startswith("A worse than B")
    one = cmp.paired_difference({0: 0.9}, {0: 0.8})
    assert math.isnan(one.ci_low) and "one shared fold, no interval and no verdict" in cmp.verdict(one, "A", "B")
    assert "no shared fold" in cmp.verdict(cmp.paired_difference({0: 0.9}, {1: 0.8}), "A", "B")
