"""``nnUNetv2_hiendmae_study``: Does pretraining help my segmentation? One command that answers it fairly, at every
label budget.

Trains every (arm, label budget, fold) with the real ``nnUNetv2_train``, one after the other: the pretrained ViT, the
same ViT from scratch, nnU-Net's default, and on request the frozen (linear-probe analogue) and staged ViT, on the same
folds and the same nested label-budget subsets (:mod:`nnunetv2_hiendmae.variants`). Re-running continues: finished
runs are skipped, an interrupted one continues with ``--c``. Then the report: per budget, Dice per class and mean
foreground Dice, mean ± std over folds, paired differences to the ViT from scratch and to nnU-Net's default with
their 95 % paired t interval and a verdict each, and a learning curve (mean fg Dice against the label budget) —
``study.md``, ``study_dice.csv``, ``study_differences.csv``, ``learning_curve.png``, all written atomically.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from nnunetv2_hiendmae import compare, variants
from nnunetv2_hiendmae.errors import ArgumentParser, UserError, cli_entry
from nnunetv2_hiendmae.ext import ENV as EXT_ENV
from nnunetv2_hiendmae.ext import ext_path
from nnunetv2_hiendmae.fileio import atomic_write_json
from nnunetv2_hiendmae.nnunet_paths import DEFAULT_SPLIT
from nnunetv2_hiendmae.plans import CONFIGURATION, DEFAULT_NAME

ARMS_DEFAULT = ("pretrained", "scratch", variants.NNUNET_ARM)
BUDGETS_DEFAULT = (10, 25, variants.FULL_BUDGET)
REFERENCES = ("scratch", variants.NNUNET_ARM)  # every other arm is compared with these
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")  # nnU-Net's --c order
TIMES_FILE = "study_runs.json"
DESCRIPTION = """\
Does pretraining help my segmentation? Trains every (arm, label budget, fold) with the real nnUNetv2_train, one
after the other (the pretrained ViT, the same ViT from scratch, nnU-Net's default; on request the frozen and the
staged ViT), on the same folds and the same nested subsets of each fold's training cases; re-running continues
(finished runs are skipped, an interrupted one continues with --c). Then the report, per label budget: Dice per
class and mean foreground Dice (mean +- std over folds), paired differences to the ViT from scratch and to nnU-Net's
default with their 95 % interval and a verdict each, and a learning curve: study.md, study_dice.csv,
study_differences.csv and learning_curve.png.
"""
EPILOG = """\
examples:
  nnUNetv2_hiendmae_study -d 1 -pt $nnUNet_results/hiendmae_vit_b16/checkpoint_final.pth --dry-run
  nnUNetv2_hiendmae_study -d 1 -pt CKPT --budgets 5 10 25 100 --arms pretrained scratch nnunet frozen \\
      --schedule 250epochs -device cuda

Each run is nnUNetv2_train DATASET 3d_fullres FOLD -tr TRAINER -p PLANS; the trainer names encode arm, schedule and
label budget (e.g. nnUNetTrainerHiEndMAE_frozen_250epochs_budget10; nnU-Net's own nnUNetTrainer_250epochs for its
arm at 100 %), so every result has its own nnU-Net output folder and nnUNetv2_predict uses it as usual. The cases of
a budget are the same for every arm and nested across budgets; each fold folder lists them in label_budget.json.
Intervals: 95 % paired t interval over folds of the per-fold differences (a bootstrap over 2-5 folds has next to no
distinct resamples); 'not distinguishable at n folds' means the interval includes 0, not that the arms are equal.
"""


@dataclass(frozen=True)
class Run:
    """One nnUNetv2_train call of the study."""

    arm: str
    budget: int  # percent of the fold's training cases
    fold: int
    trainer: str
    plans: str

    @property
    def entry(self) -> str:
        """``TRAINER__PLANS``, as nnUNetv2_hiendmae_compare names it."""
        return f"{self.trainer}__{self.plans}"

    @property
    def key(self) -> str:
        return f"{self.entry}/fold_{self.fold}"

    def title(self) -> str:
        return f"{variants.ARM_LABELS[self.arm]}, label budget {self.budget} %, fold {self.fold}"


@dataclass
class Study:
    """Everything a study needs, checked before anything is written (:func:`setup`)."""

    dataset: str  # DatasetXXX_Name
    checkpoint: Path
    plans: str
    nnunet_plans: str
    schedule: str
    folds: list[int]
    budgets: list[int]
    arms: list[str]
    device: str
    results: Path  # $nnUNet_results/DatasetXXX_Name
    preprocessed: Path  # $nnUNet_preprocessed/DatasetXXX_Name
    out_dir: Path
    runs: list[Run] = field(default_factory=list)
    split_source: str = DEFAULT_SPLIT  # the splits_final.json the folds come from
    guard: list[str] = field(default_factory=list)  # what the leakage guard said about the scored cases

    def fold_dir(self, run: Run) -> Path:
        return self.results / f"{run.entry}__{CONFIGURATION}" / f"fold_{run.fold}"

    def finished(self, run: Run) -> bool:
        return compare.summary_path(self.fold_dir(run)).is_file()

    def times(self) -> dict[str, dict]:
        """Wall time of each run this study finished (``study_runs.json``)."""
        try:
            return json.loads((self.out_dir / TIMES_FILE).read_text())
        except (OSError, ValueError):
            return {}


# ------------------------------------------------------------------------------------------------- setup


def plan_runs(arms: Sequence[str], budgets: Sequence[int], folds: Sequence[int], schedule: str, plans: str,
              nnunet_plans: str, recompute: bool = False) -> list[Run]:
    """Every (budget, fold, arm) in that order, so that the paired comparisons of a budget fill up fold by fold."""
    runs = []
    for budget in budgets:
        for fold in folds:
            for arm in arms:
                variant = variants.Variant(arm, schedule, budget, recompute and arm != variants.NNUNET_ARM)
                runs.append(Run(arm, budget, fold, variants.trainer_name(variant),
                                nnunet_plans if arm == variants.NNUNET_ARM else plans))
    return runs


def _unique(values: Sequence, flag: str) -> list:
    if len(set(values)) != len(values):
        raise UserError(f"{flag} lists a value twice: {' '.join(map(str, values))}")
    return list(values)


def existing_plans_for(path: Path, checkpoint: Path) -> bool:
    """Whether fine-tuning plans exist at ``path``; UserError if they were written for another checkpoint (results of
    two checkpoints must never share trainer/plans folders) or by another tool."""
    if not path.is_file():
        return False
    try:
        info = json.loads(path.read_text()).get("pretrain_info")
    except (OSError, ValueError, AttributeError):
        info = None
    if not isinstance(info, dict):
        raise UserError(f"{path} exists and was not written by nnUNetv2_hiendmae_plan: choose another -p")
    written_for = info.get("checkpoint")
    if not written_for or Path(written_for).resolve() != checkpoint:
        raise UserError(f"plans {path.stem} were written for {written_for or 'a from-scratch ViT'}, not {checkpoint}: "
                        "pass -p ANOTHER_NAME to study this checkpoint (its results then get folders of their own)")
    return True


def setup(args: argparse.Namespace) -> Study:
    """Check the arguments and the nnU-Net folders; writes nothing. UserError on anything wrong."""
    from nnunetv2_hiendmae.nnunet_paths import crossval_folds, dataset_name, nnunet_folder, plan_and_preprocess_command

    folds = None if args.folds is None else _unique(args.folds, "-f")
    budgets, arms = _unique(args.budgets, "--budgets"), _unique(args.arms, "--arms")
    checkpoint = Path(args.checkpoint).expanduser().resolve()
    if not checkpoint.is_file():
        raise UserError(f"checkpoint not found: {checkpoint}")
    name = dataset_name(args.dataset)
    preprocessed = nnunet_folder("nnUNet_preprocessed") / name
    plan_and_preprocess = plan_and_preprocess_command(name, CONFIGURATION)
    if not (preprocessed / "dataset.json").is_file():
        raise UserError(f"{name} is not preprocessed ({preprocessed}): run {plan_and_preprocess} first")
    if variants.NNUNET_ARM in arms and not (preprocessed / f"{args.nnunet_plans}.json").is_file():
        raise UserError(f"the nnunet arm needs {preprocessed / args.nnunet_plans}.json: run {plan_and_preprocess} (or "
                        "name other plans with --nnunet-plans)")
    if args.plans == args.nnunet_plans:
        raise UserError(f"-p {args.plans} would be nnU-Net's own plans: the ViT needs plans of its own")
    folds, split_source = crossval_folds(preprocessed, folds)
    existing_plans_for(preprocessed / f"{args.plans}.json", checkpoint)
    results = nnunet_folder("nnUNet_results", must_exist=False) / name  # nnUNetv2_train creates it
    out_dir = args.output_dir or results / f"hiendmae_study_{args.schedule}"
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path {out_dir} exists and is not a folder")
    runs = plan_runs(arms, budgets, folds, args.schedule, args.plans, args.nnunet_plans, args.recompute)
    return Study(name, checkpoint, args.plans, args.nnunet_plans, args.schedule, folds, budgets, arms, args.device,
                 results, preprocessed, Path(out_dir), runs, split_source)


# -------------------------------------------------------------------------------------------- progress


def fmt_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3 h 05 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def estimate_left(study: Study) -> float | None:
    """Seconds the unfinished runs will take: per run the mean wall time of the finished runs of its arm (the
    budget hardly matters: nnU-Net trains a fixed number of iterations per epoch), else of all finished runs; None
    before the first run this study timed has finished."""
    times = study.times()
    by_arm: dict[str, list[float]] = {}
    for run in study.runs:
        if run.key in times:
            by_arm.setdefault(run.arm, []).append(float(times[run.key]["seconds"]))
    every = [s for values in by_arm.values() for s in values]
    if not every:
        return None
    return sum(float(np.mean(by_arm.get(run.arm, every))) for run in study.runs if not study.finished(run))


def resume_point(fold_dir: Path) -> tuple[Path | None, list[Path]]:
    """The checkpoint ``nnUNetv2_train --c`` would continue from (final, latest, best: nnU-Net's order) and the ones
    before it that a kill left unreadable (a torch checkpoint is a zip archive whose directory is written last: a
    write cut short leaves none)."""
    unreadable = []
    for name in CHECKPOINTS:
        path = fold_dir / name
        if path.is_file():
            if zipfile.is_zipfile(path):
                return path, unreadable
            unreadable.append(path)
    return None, unreadable


def status(study: Study, run: Run) -> str:
    """``done``, ``interrupted: continues from ...``, ``started, no checkpoint: starts again`` or ``to do``."""
    if study.finished(run):
        seconds = study.times().get(run.key, {}).get("seconds")
        return "done" + (f" ({fmt_duration(seconds)})" if seconds is not None else "")
    fold_dir = study.fold_dir(run)
    if not fold_dir.is_dir():
        return "to do"
    checkpoint, unreadable = resume_point(fold_dir)
    aside = f"; {', '.join(p.name for p in unreadable)} unreadable, set aside" if unreadable else ""
    if checkpoint is None:
        return f"started, no checkpoint: starts again{aside}"
    return f"interrupted: continues from {checkpoint.name} with --c{aside}"


def counted(items: Sequence, noun: str) -> str:
    """``3 arms``, ``1 label budget``."""
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def listing(study: Study) -> str:
    """The ``--dry-run`` text: every run with its trainer and status, and the time left."""
    n_done = sum(study.finished(r) for r in study.runs)
    shape = " x ".join(counted(items, noun) for items, noun in
                       ((study.arms, "arm"), (study.budgets, "label budget"), (study.folds, "fold")))
    lines = [f"Study of {study.dataset}, {CONFIGURATION}, schedule {study.schedule}: {len(study.runs)} runs ({shape})",
             f"plans {study.plans}: " + ("present, written for this checkpoint"
                                         if (study.preprocessed / f"{study.plans}.json").is_file()
                                         else f"to be written by nnUNetv2_hiendmae_plan -pt {study.checkpoint}"),
             f"folds from {study.split_source}", f"report: {study.out_dir}", ""]
    rows = [("#", "arm", "budget", "fold", "trainer", "plans", "status")]
    rows += [(str(i), variants.ARM_LABELS[r.arm], f"{r.budget} %", str(r.fold), r.trainer, r.plans, status(study, r))
             for i, r in enumerate(study.runs, 1)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    left = estimate_left(study)
    lines += ["", f"{n_done} of {len(study.runs)} runs done; "
              + ("nothing left" if n_done == len(study.runs) else
                 f"about {fmt_duration(left)} left (mean wall time of this study's finished runs per arm)"
                 if left is not None else "no time estimate before the first run of this study has finished")]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ runs


def command_env(device: str) -> dict[str, str]:
    """The environment for nnU-Net's commands: ours, with this package's trainers on ``nnUNet_extTrainer``."""
    env = dict(os.environ)
    entries = [e for e in env.get(EXT_ENV, "").split(os.pathsep) if e.strip()]
    if not any(Path(e).expanduser().resolve() == ext_path() for e in entries):
        env[EXT_ENV] = os.pathsep.join([*entries, str(ext_path())])
    return env


def ensure_plans(study: Study, env: dict[str, str]) -> None:
    """Write the fine-tuning plans with ``nnUNetv2_hiendmae_plan`` unless they exist for this checkpoint or no arm
    trains the ViT."""
    from nnunetv2_hiendmae.commands import run_filtered

    if not any(run.plans == study.plans for run in study.runs):
        return
    if existing_plans_for(study.preprocessed / f"{study.plans}.json", study.checkpoint):
        print(f"plans {study.plans}: present, written for {study.checkpoint}")
        return
    cmd = ["nnUNetv2_hiendmae_plan", "-d", study.dataset, "-pt", str(study.checkpoint), "-o", study.plans]
    if run_filtered(cmd, env) != 0:
        raise UserError("nnUNetv2_hiendmae_plan failed (output above)")


def train(study: Study, run: Run, env: dict[str, str]) -> None:
    """One run through ``nnUNetv2_train`` (``--c`` from the checkpoint it left, unreadable ones renamed
    ``*.unreadable`` first); its wall time goes to ``study_runs.json``. UserError if it fails."""
    from nnunetv2_hiendmae.commands import run_filtered

    fold_dir = study.fold_dir(run)
    checkpoint, unreadable = resume_point(fold_dir)
    for path in unreadable:
        path.rename(path.with_name(path.name + ".unreadable"))
        print(f"{path} is unreadable (a write cut short): renamed to {path.name}.unreadable")
    cmd = ["nnUNetv2_train", study.dataset, CONFIGURATION, str(run.fold), "-tr", run.trainer, "-p", run.plans,
           "-device", study.device] + (["--c"] if checkpoint is not None else [])
    start = time.monotonic()
    code = run_filtered(cmd, env, on_cpu=study.device == "cpu")
    if code != 0 or not study.finished(run):
        raise UserError(f"nnUNetv2_train failed for {run.title()} ({run.trainer}, exit status {code}; output "
                        "above): re-run the study to continue")
    times = study.times()
    times[run.key] = {"seconds": round(time.monotonic() - start, 1), "continued": checkpoint is not None,
                      "finished": datetime.now().isoformat(" ", "seconds")}
    atomic_write_json(study.out_dir / TIMES_FILE, times)


def uses_pretrained_weights(study: Study) -> bool:
    """Whether an arm of the study starts from the checkpoint's encoder (not only from its plans)."""
    return any(variants.FINE_TUNING[arm].attributes.get("load_pretrained", True) for arm in study.arms
               if arm in variants.FINE_TUNING)


def leakage_guard(study: Study, strict: bool) -> list[str]:
    """The leakage guard of ``nnUNetv2_hiendmae_plan`` on the cases the study scores, the validation cases of its
    folds: the checkpoint's warnings (stderr) and notes (stdout), returned for the report; with ``strict`` a
    validation case the pretraining saw is a UserError. Nothing to check when no arm loads the checkpoint."""
    if not uses_pretrained_weights(study):
        return []
    from nnunetv2_hiendmae.checkpoint import load_checkpoint
    from nnunetv2_hiendmae.leakage import check_checkpoint

    pretrain = load_checkpoint(study.checkpoint)["pretrain"]
    warnings, notes = check_checkpoint(pretrain, study.dataset, strict, scored_folds=study.folds)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    for note in notes:
        print(f"note: {note}")
    return [line.strip() for line in warnings] or notes


def run_all(study: Study) -> None:
    """Plans once, then every run not finished yet, with a progress line each."""
    env = command_env(study.device)
    compare.prepare_out_dir(study.out_dir)
    ensure_plans(study, env)
    total = len(study.runs)
    for i, run in enumerate(study.runs, 1):
        state = status(study, run)
        if study.finished(run):
            print(f"[{i}/{total}] {run.title()}: {state}", flush=True)
            continue
        left = estimate_left(study)
        eta = f"; about {fmt_duration(left)} left in all" if left is not None else ""
        print(f"\n=== [{i}/{total}] {run.title()} ({run.trainer}): {state}{eta}", flush=True)
        train(study, run, env)
        print(f"=== [{i}/{total}] {run.title()}: finished in {fmt_duration(study.times()[run.key]['seconds'])}",
              flush=True)


# ---------------------------------------------------------------------------------------------- report


@dataclass
class Pair:
    """A paired comparison of one arm with a reference arm at one label budget, per metric column."""

    budget: int
    arm: str
    reference: str
    paired: dict  # column -> compare.Paired


@dataclass
class Report:
    """The study's numbers: one :class:`compare.Comparison` per label budget (entries in arm order) and the pairs."""

    study: Study
    comparisons: dict[int, compare.Comparison]
    pairs: list[Pair]

    def arm_entry(self, budget: int, arm: str) -> compare.EntryResult:
        return self.comparisons[budget].entries[self.study.arms.index(arm)]


def collect(study: Study) -> Report:
    """Read every run's ``fold_<f>/validation/summary.json`` with compare's reader and pair the arms."""
    folders = {r.entry: study.results / f"{r.entry}__{CONFIGURATION}" for r in study.runs}
    labels = compare.load_label_names([f for f in folders.values() if f.is_dir()])
    comparisons: dict[int, compare.Comparison] = {}
    for budget in study.budgets:
        entries, warnings = [], []
        for arm in study.arms:
            run = next(r for r in study.runs if r.arm == arm and r.budget == budget)
            entry, w = compare.collect_entry(run.entry, folders[run.entry], study.folds, labels) \
                if folders[run.entry].is_dir() else (compare.EntryResult(run.entry, folders[run.entry], {}),
                                                     [f"{run.entry}: no results folder"])
            entries.append(entry)
            warnings += w
        keys = sorted(set().union(*(r.class_dice for e in entries for r in e.folds.values())))
        comparisons[budget] = compare.Comparison(study.dataset, CONFIGURATION, keys,
                                                 compare.class_display_names(keys, labels), entries, warnings,
                                                 labels=[variants.ARM_LABELS[a] for a in study.arms])
    pairs = []
    for budget, comp in comparisons.items():
        for arm in study.arms:
            for reference in REFERENCES:
                if arm in REFERENCES or reference not in study.arms:
                    continue
                entry, ref = (comp.entries[study.arms.index(a)] for a in (arm, reference))
                pairs.append(Pair(budget, arm, reference, {c: compare.paired_difference(entry.values(c),
                                                                                        ref.values(c))
                                                           for c in comp.columns}))
    return Report(study, comparisons, pairs)


def pair_name(pair: Pair) -> str:
    return f"{variants.ARM_LABELS[pair.arm]} − {variants.ARM_LABELS[pair.reference]}"


def verdicts(report: Report, budget: int) -> list[str]:
    return [compare.verdict(p.paired[compare.FG_COLUMN], variants.ARM_LABELS[p.arm], variants.ARM_LABELS[p.reference])
            for p in report.pairs if p.budget == budget]


def render_markdown(report: Report) -> str:
    """``study.md``: verdicts first, then per budget the table and the paired differences, the learning curve."""
    study = report.study
    nnunet = next((r for r in study.runs if r.arm == variants.NNUNET_ARM and r.budget == variants.FULL_BUDGET), None)
    lines = [f"# Does pretraining help? {study.dataset}, {CONFIGURATION}, schedule {study.schedule}", "",
             f"Pretrained encoder `{study.checkpoint}`, fine-tuning plans `{study.plans}`"
             + (f"; nnU-Net's default: `{nnunet.entry}`" if nnunet else "") + ". "
             f"Folds {' '.join(map(str, study.folds))} of {study.split_source}; label budgets "
             f"{', '.join(f'{b} %' for b in study.budgets)} of each fold's training cases (nested subsets, the same "
             "for every arm, listed in each fold folder's `label_budget.json`); validation always on the fold's "
             "whole validation set (nnU-Net's `fold_<f>/validation/summary.json`). Mean ± sample std over folds.", "",
             f"{compare.CI_NOTE}.", "", "## Verdicts (mean fg Dice)", ""]
    for budget in study.budgets:
        lines += [f"- label budget {budget} %: {v}" for v in verdicts(report, budget)]
    for budget, comp in report.comparisons.items():
        lines += ["", f"## Label budget {budget} %", ""]
        header = ["arm", "trainer__plans", "folds", *[comp.column_name(c) for c in comp.columns]]
        rows = [[label, e.name, " ".join(map(str, e.fold_ids())), *[compare.fmt_mean_std(*comp.mean_std(e, c))
                                                                     for c in comp.columns]]
                for e, label in zip(comp.entries, comp.labels)]
        lines += compare.markdown_table(header, rows)
        pairs = [p for p in report.pairs if p.budget == budget]
        if pairs:
            lines += ["", "Paired differences, [95 % CI]:", ""]
            header = ["comparison", "paired folds", *[f"Δ {comp.column_name(c)}" for c in comp.columns]]
            rows = [[pair_name(p), " ".join(map(str, p.paired[compare.FG_COLUMN].folds)),
                     *[compare.fmt_interval(p.paired[c]) for c in comp.columns]] for p in pairs]
            lines += compare.markdown_table(header, rows)
    lines += ["", "## Learning curve", "", "![mean fg Dice against the label budget](learning_curve.png)", ""]
    header = ["arm", *[f"{b} %" for b in study.budgets]]
    rows = [[variants.ARM_LABELS[arm], *[compare.fmt_mean_std(*compare.mean_std(
        report.arm_entry(b, arm).values(compare.FG_COLUMN).values())) for b in study.budgets]] for arm in study.arms]
    lines += compare.markdown_table(header, rows)
    lines += ["", "## Leakage guard", ""] + ([f"- {line}" for line in study.guard] or
                                              ["- no arm loads the pretrained encoder: nothing to check"])
    notes = [w for comp in report.comparisons.values() for w in comp.warnings]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {w}" for w in notes]
    return "\n".join(lines) + "\n"


def render_dice_csv(report: Report) -> str:
    """``study_dice.csv``: per budget, arm and fold the Dice of every class and the mean fg Dice, plus mean/std."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    comp0 = next(iter(report.comparisons.values()))
    writer.writerow(["budget_percent", "arm", "entry", "fold", "n_folds",
                     *[f"Dice {comp0.column_name(c)}" if c != compare.FG_COLUMN else c for c in comp0.columns]])
    for budget, comp in report.comparisons.items():
        for arm, entry in zip(report.study.arms, comp.entries):
            for f in entry.fold_ids():
                writer.writerow([budget, arm, entry.name, f, 1,
                                 *[compare.csv_number(entry.values(c)[f]) for c in comp.columns]])
            for i, stat in enumerate(("mean", "std")):
                writer.writerow([budget, arm, entry.name, stat, len(entry.folds),
                                 *[compare.csv_number(comp.mean_std(entry, c)[i]) for c in comp.columns]])
    return buf.getvalue()


def render_differences_csv(report: Report) -> str:
    """``study_differences.csv``: per budget, pair and metric the paired difference, its std, 95 % paired t
    interval and verdict."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["budget_percent", "arm", "reference", "metric", "paired_folds", "n_folds", "mean_difference",
                     "std_difference", "ci95_low", "ci95_high", "verdict"])
    for pair in report.pairs:
        comp = report.comparisons[pair.budget]
        for c, p in pair.paired.items():
            writer.writerow([pair.budget, pair.arm, pair.reference, comp.column_name(c), " ".join(map(str, p.folds)),
                             len(p.folds), *[compare.csv_number(v) for v in (p.mean, p.std, p.ci_low, p.ci_high)],
                             compare.verdict(p, variants.ARM_LABELS[pair.arm], variants.ARM_LABELS[pair.reference],
                                             comp.column_name(c))])
    return buf.getvalue()


def learning_curve_figure(report: Report):
    """Mean fg Dice (over folds) against the label budget per arm, ± std shaded, each fold a dot; log budget axis.
    Agg canvas directly (no pyplot state, no window)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    study = report.study
    fig = Figure(figsize=(7.5, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    budgets = np.asarray(study.budgets, dtype=float)
    for i, arm in enumerate(study.arms):
        color = f"C{i % 10}"
        stats = [compare.mean_std(report.arm_entry(b, arm).values(compare.FG_COLUMN).values()) for b in study.budgets]
        means, stds = np.asarray([m for m, _ in stats]), np.asarray([s for _, s in stats])
        order = np.argsort(budgets)
        ax.plot(budgets[order], means[order], "o-", color=color, label=variants.ARM_LABELS[arm])
        band = ~np.isnan(stds[order])
        ax.fill_between(budgets[order][band], (means - stds)[order][band], (means + stds)[order][band], color=color,
                        alpha=0.15, linewidth=0)
        for budget in study.budgets:
            values = list(report.arm_entry(budget, arm).values(compare.FG_COLUMN).values())
            jitter = budget * (1 + 0.02 * (i - (len(study.arms) - 1) / 2))  # arms side by side at a budget
            ax.scatter([jitter] * len(values), values, color=color, s=10, alpha=0.6, zorder=3)
    ax.set_xscale("log")
    ax.set_xticks(budgets, [f"{b:g} %" for b in budgets])
    ax.minorticks_off()
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("label budget (share of each fold's training cases)")
    ax.set_ylabel("mean foreground Dice (validation)")
    folds = f"{len(study.folds)} fold{'s' if len(study.folds) > 1 else ''}"
    ax.set_title(f"{study.dataset}: mean over {folds} ± std (shaded), dots = folds", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def write_report(report: Report) -> list[Path]:
    """All four files, each atomically; returns their paths."""
    buf = io.BytesIO()
    learning_curve_figure(report).savefig(buf, format="png", dpi=110)
    out = report.study.out_dir
    files = {out / "study.md": render_markdown(report).encode("utf-8"),
             out / "study_dice.csv": render_dice_csv(report).encode("utf-8"),
             out / "study_differences.csv": render_differences_csv(report).encode("utf-8"),
             out / "learning_curve.png": buf.getvalue()}
    compare.prepare_out_dir(out)
    compare.write_files(files)
    return list(files)


# ------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of ``nnUNetv2_hiendmae_study``."""
    p = ArgumentParser(prog="nnUNetv2_hiendmae_study", description=DESCRIPTION,
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", required=True,
                   help="dataset id or DatasetXXX_Name, planned and preprocessed by nnUNetv2_plan_and_preprocess")
    p.add_argument("-pt", "--checkpoint", required=True, metavar="CHECKPOINT",
                   help="the pretraining checkpoint (nnUNetv2_hiendmae_pretrain or nnUNetv2_hiendmae_import "
                        "output, or an nnssl Primus checkpoint); "
                        "its fine-tuning plans are written once with nnUNetv2_hiendmae_plan, or reused if -p names "
                        "plans written for it")
    p.add_argument("-f", "--folds", nargs="+", type=int, metavar="F",
                   help="folds of nnU-Net's cross-validation, of the dataset's splits_final.json (default: every fold "
                        "it has, or nnU-Net's default 0 1 2 3 4 where there is none; a fold it lacks is refused)")
    p.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS_DEFAULT),
                   choices=[*variants.BUDGETS, variants.FULL_BUDGET], metavar="PERCENT",
                   help="label budgets, percent of each fold's training cases: "
                        f"{', '.join(map(str, [*variants.BUDGETS, variants.FULL_BUDGET]))} (at least 2 cases; "
                        f"default: {' '.join(map(str, BUDGETS_DEFAULT))})")
    p.add_argument("--arms", nargs="+", default=list(ARMS_DEFAULT), choices=variants.ARMS, metavar="ARM",
                   help="what to train: pretrained (the pretrained ViT fine-tuned), scratch (the same ViT from random "
                        "weights), nnunet (nnU-Net's default trainer and network), frozen (the pretrained ViT frozen, "
                        "only the UNETR decoder learns: the linear-probe analogue), staged (frozen for the first 10 %% "
                        f"of the epochs, then fine-tuned) (default: {' '.join(ARMS_DEFAULT)})")
    p.add_argument("--schedule", choices=list(variants.SCHEDULES), default="full",
                   help="training length of every arm: full (nnU-Net's 1000 epochs), 100epochs, 250epochs, demo "
                        "(6 x 10 iterations, CPU) or smoke (2 x 3 iterations, tests) (default: %(default)s)")
    p.add_argument("--recompute", action="store_true",
                   help="the ViT arms recompute their full-resolution blocks in the backward: the same gradients for "
                        "less GPU memory (the _recompute trainers)")
    p.add_argument("-p", "--plans", default=DEFAULT_NAME,
                   help="name of the ViT's fine-tuning plans (default: %(default)s)")
    p.add_argument("--nnunet-plans", default="nnUNetPlans",
                   help="plans of the nnunet arm, e.g. nnUNetResEncUNetMPlans (default: %(default)s)")
    p.add_argument("-device", choices=("cuda", "cpu", "mps"), default="cuda",
                   help="device for nnUNetv2_train, as its own -device flag (default: %(default)s)")
    p.add_argument("-o", "--output-dir", type=Path, metavar="DIR",
                   help="where the report goes (default: $nnUNet_results/<Dataset>/hiendmae_study_<schedule>)")
    p.add_argument("--strict", action="store_true",
                   help="refuse the study when the checkpoint's pretraining saw a validation case of its folds "
                        "(leakage guard, docs/finetuning.md; default: a warning, also in study.md)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the runs, which are done, and an estimate of the time left; train and write nothing")
    return p


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: check, train what is missing, report."""
    args = build_parser().parse_args(argv)
    study = setup(args)
    study.guard = leakage_guard(study, args.strict)
    if args.dry_run:
        print(listing(study))
        return
    run_all(study)
    report = collect(study)
    files = write_report(report)
    print("\n" + "\n".join(f"label budget {b} %: {v}" for b in study.budgets for v in verdicts(report, b)))
    print(f"\nwrote {', '.join(f.name for f in files)} to {study.out_dir}")


if __name__ == "__main__":
    sys.exit(main())
