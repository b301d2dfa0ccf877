"""The positive control: on phantoms whose labels only context tells apart (``context_phantoms.py``), does the chain
(unlabelled pool -> pretraining -> probe / plans -> fine-tuning in nnU-Net) transfer what pretraining learned?

A failure here means a defect in the chain, not bad luck: a local feature cannot name the organs, an encoder that has
learned where they lie relative to the landmark can, and reconstructing masked regions of such scans needs exactly
that. Every step is the real command, in a work folder with its own nnU-Net tree; re-running skips finished steps.

1. ``context_phantoms.py``: a labelled dataset (``--labelled`` + 4 test cases) and a pool of ``--unlabelled`` scans;
2. ``nnUNetv2_plan_and_preprocess`` for the labelled dataset, ``nnUNetv2_hiendmae_preprocess_unlabeled --like`` for the
   pool (the same spacing and normalisation);
3. ``nnUNetv2_hiendmae_pretrain`` (Hi-End-MAE, ``vit_tiny``) on the pool only, with the held-out loss and the probe on
   the labelled dataset's fold 0 every 10 % of the run (its ``progress.png`` is the figure of docs/pretraining.md);
4. ``nnUNetv2_hiendmae_probe`` on folds 0, 1 and 2: ``random:vit_tiny`` (the encoder's initial weights) against the
   final checkpoint;
5. ``nnUNetv2_hiendmae_study`` at the smallest label budget (5 %: 2 training cases per fold): the pretrained ViT
   against the same ViT from scratch on the same folds (``--skip-study`` leaves it out);
6. ``benchmark.md`` in the work folder: both comparisons, paired over folds, with 95 % t intervals.

    python benchmarks/pretraining_benefit.py --work /tmp/benefit            # about 45 min on a 2-core CPU
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from context_phantoms import make_context_datasets

from nnunetv2_hiendmae.commands import executable
from nnunetv2_hiendmae.compare import t_interval

DATASET = 520  # labelled; 521 is the pool
FOLDS = (0, 1, 2)


def run(cmd: list[str], env: dict, log: Path) -> None:
    """One real command, its output appended to ``log``; stops the benchmark if it fails."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run([executable(cmd[0]), *cmd[1:]], env=env, stdout=f, stderr=subprocess.STDOUT)
    print(f"{time.perf_counter() - t0:7.0f} s  {' '.join(cmd)}", flush=True)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean of ``b - a`` over folds and its 95 % paired t interval (nnunetv2_hiendmae.compare.t_interval)."""
    diffs = [y - x for x, y in zip(a, b)]
    return sum(diffs) / len(diffs), *t_interval(diffs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="work folder (its own nnU-Net tree)")
    p.add_argument("--labelled", type=int, default=24, help="labelled training cases (default: 24)")
    p.add_argument("--unlabelled", type=int, default=120, help="unlabelled scans for pretraining (default: 120)")
    p.add_argument("--epochs", type=int, default=300, help="pretraining epochs (default: 300)")
    p.add_argument("--patch-size", type=int, nargs=3, default=[32, 64, 64], help="patch size (default: 32 64 64)")
    p.add_argument("--schedule", default="demo", help="the study's fine-tuning schedule (default: demo)")
    p.add_argument("--skip-study", action="store_true", help="stop after the probe")
    p.add_argument("-np", type=int, default=2, help="processes for preprocessing and loader workers (default: 2)")
    a = p.parse_args()

    work = a.work.resolve()
    roots = {k: work / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for folder in roots.values():
        folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{k: str(v) for k, v in roots.items()}, "nnUNet_compile": "0"}
    env.pop("nnUNet_n_proc_DA", None)
    log, pool = work / "commands.log", work / "pool"
    name = f"Dataset{DATASET:03d}_ContextPhantoms"

    if not (roots["nnUNet_raw"] / name / "dataset.json").is_file():
        make_context_datasets(roots["nnUNet_raw"], DATASET, pool, a.labelled, a.unlabelled)
    if not (roots["nnUNet_preprocessed"] / name / "nnUNetPlans_3d_fullres").is_dir():
        run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET), "-c", "3d_fullres", "-np", str(a.np)], env, log)
    pool_plans = roots["nnUNet_preprocessed"] / f"Dataset{DATASET + 1:03d}_ContextPool" / "nnUNetPlans.json"
    if not pool_plans.is_file():
        run(["nnUNetv2_hiendmae_preprocess_unlabeled", "-i", str(pool), "-d", str(DATASET + 1), "--name",
             "ContextPool", "--like", str(DATASET), "-np", str(a.np)], env, log)

    out = work / "pretrain"
    ckpt = out / "checkpoint_final.pth"
    if not ckpt.is_file():
        resume = ["--resume"] if (out / "checkpoint_latest.pth").is_file() else []
        run(["nnUNetv2_hiendmae_pretrain", "-d", str(DATASET + 1), "-o", str(out), "--arch", "vit_tiny",
             "--patch-size", *map(str, a.patch_size), "--batch-size", "4", "--crops-per-volume", "4",
             "--epochs", str(a.epochs), "--lr", "1e-3", "--warmup-epochs", "10", "--probe-dataset", str(DATASET),
             "--probe-fold", "0", "--num-workers", str(a.np), "--device", "cpu", "--no-progress-bar",
             "--checkpoint-minutes", "2", *resume], env, log)

    probe = {}
    for fold in FOLDS:
        table = work / "probe" / f"fold_{fold}" / "probe.csv"
        if not table.is_file():
            run(["nnUNetv2_hiendmae_probe", "-d", str(DATASET), "-f", str(fold), "-pt", "random:vit_tiny", str(ckpt),
                 "-o", str(table.parent), "-device", "cpu"], env, log)
        with open(table) as f:
            probe[fold] = [float(row["mean fg Dice"]) for row in csv.DictReader(f)]  # random first, then the checkpoint
    lines = [f"# Positive control: {a.labelled} labelled context phantoms, {a.unlabelled} unlabelled, "
             f"Hi-End-MAE vit_tiny for {a.epochs} epochs", "", "## Linear probe (mean foreground Dice), folds "
             f"{', '.join(map(str, FOLDS))}", "", "| fold | random:vit_tiny | pretrained |", "|---|---|---|"]
    scores = {"random": [], "pretrained": []}
    for fold, score in probe.items():
        scores["random"].append(score[0])
        scores["pretrained"].append(score[1])
        lines.append(f"| {fold} | {score[0]:.4f} | {score[1]:.4f} |")
    mean, low, high = paired(scores["random"], scores["pretrained"])
    lines += ["", f"Pretrained - random, paired over folds: {mean:+.4f} (95 % t interval {low:+.4f} to {high:+.4f})"]

    if not a.skip_study:
        study = work / "study"
        run(["nnUNetv2_hiendmae_study", "-d", str(DATASET), "-pt", str(ckpt), "-f", *map(str, FOLDS), "--budgets",
             "5", "--arms", "pretrained", "scratch", "--schedule", a.schedule, "-o", str(study), "-device", "cpu"],
            {**env, "nnUNet_n_proc_DA": str(a.np)}, log)
        report = study / "study.md"
        lines += ["", "## Fine-tuning at the smallest label budget (nnUNetv2_hiendmae_study)", "",
                  report.read_text() if report.is_file() else f"(no report in {study})"]
    (work / "benchmark.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(scores))


if __name__ == "__main__":
    main()
