"""``nnUNetv2_hiendmae_demo``: The whole workflow on a generated CT-like dataset, with the real commands.

generate data (a labelled dataset and a folder of unlabelled scans) -> nnUNetv2_plan_and_preprocess ->
nnUNetv2_hiendmae_preprocess_unlabeled -> nnUNetv2_hiendmae_pretrain -> nnUNetv2_hiendmae_plan -> nnUNetv2_train
(pretrained ViT, scratch ViT, nnU-Net default, through nnUNetv2_hiendmae_study) -> nnUNetv2_predict on held-out cases
-> nnUNetv2_hiendmae_compare and held-out Dice. Everything lives under one demo folder with its own nnU-Net tree;
finished steps are skipped when the demo is run again (--fresh starts clean).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from nnunetv2_hiendmae import variants
from nnunetv2_hiendmae.commands import NOISE_NOTE, run_filtered
from nnunetv2_hiendmae.errors import ArgumentParser, UserError, cli_entry
from pretrain import methods

DATASET_ID = 501
DEMO_PATCH = (16, 64, 64)  # pretraining and fine-tuning patch size, unless the method needs its own (registry)
PLANS = "nnUNetPlans_HiEndMAE"
EPILOG = """\
The defaults fit a 2-core CPU in about 15 minutes (vit_tiny, short schedules, fold 0). To scale up, e.g. on a GPU:
  nnUNetv2_hiendmae_demo --device cuda --arch vit_b16 --pretrain-epochs 200 --schedule 250epochs --folds 0 1 2 3 4
"""
ARMS = ("pretrained", "scratch", variants.NNUNET_ARM)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="nnUNetv2_hiendmae_demo", description=__doc__.split(":", 1)[1].strip(),
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", default="demo_output",
                   help="demo folder; holds its own nnUNet_raw/preprocessed/results (default: %(default)s)")
    p.add_argument("--fresh", action="store_true",
                   help="delete the demo folder first and start clean (default: continue, skipping finished steps)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="device for pretraining, training and prediction (default: %(default)s)")
    p.add_argument("--arch", default="vit_tiny",
                   help="ViT preset to pretrain and fine-tune: vit_tiny, vit_b16, vit_l16, vit_l12 "
                        "(default: %(default)s)")
    p.add_argument("--labelled", type=int, default=20,
                   help="labelled training cases to generate (default: %(default)s)")
    p.add_argument("--unlabelled", type=int, default=30,
                   help="unlabelled scans, the pretraining data (from 10 on, 5 %% of them are held out for the "
                        "held-out loss) (default: %(default)s)")
    p.add_argument("--test", type=int, default=4,
                   help="held-out test cases for prediction and Dice (default: %(default)s)")
    p.add_argument("--method", choices=list(methods.METHODS), default="hiend_mae",
                   help="pretraining method, with its small settings for a CPU (default: %(default)s)")
    own = ", ".join(f"{' '.join(map(str, m.small_patch))} for {n}" for n, m in methods.METHODS.items() if m.small_patch)
    p.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="pretraining patch size, a multiple of the token size; also the ViT's fine-tuning patch size "
                        f"(default: {' '.join(map(str, DEMO_PATCH))}{'; ' + own if own else ''})")
    p.add_argument("--pretrain-epochs", type=int, default=12, help="pretraining epochs (default: %(default)s)")
    p.add_argument("--pretrain-iters", type=int, default=25,
                   help="pretraining iterations per epoch (default: %(default)s)")
    p.add_argument("--pretrain-batch", type=int, default=4,
                   help="volumes per pretraining iteration (default: %(default)s)")
    p.add_argument("--schedule", choices=list(variants.SCHEDULES), default="demo",
                   help="fine-tuning length for all three trainers: smoke (seconds, for checks), demo (short, CPU), "
                        "100epochs, 250epochs or full (1000 epochs; nnU-Net's defaults) (default: %(default)s)")
    p.add_argument("--folds", nargs="+", default=["0"], help="folds to train, e.g. 0 1 2 3 4 (default: 0)")
    p.add_argument("--num-workers", type=int, default=1,
                   help="data-loading processes for pretraining and nnU-Net, and nnU-Net's planning processes; on a "
                        "small CPU more workers only steal cores from the training process (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated dataset (default: %(default)s)")
    p.add_argument("--scale", type=float, default=0.7,
                   help="size of the generated volumes (1.0: about 28x75x75 voxels after preprocessing); the default "
                        "keeps nnU-Net's CNN baseline affordable on a CPU (default: %(default)s)")
    return p


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.root = Path(args.output).resolve()
        self.raw, self.pre, self.res = (self.root / "nnUNet_raw", self.root / "nnUNet_preprocessed",
                                        self.root / "nnUNet_results")
        from nnunetv2_hiendmae.ext import ext_path

        self.env = {**os.environ, "nnUNet_raw": str(self.raw), "nnUNet_preprocessed": str(self.pre),
                    "nnUNet_results": str(self.res), "nnUNet_compile": os.environ.get("nnUNet_compile", "0"),
                    "nnUNet_extTrainer": str(ext_path())}
        self.env.pop("nnUNet_n_proc_DA", None)  # set per command: 0 would crash nnU-Net's planning
        self.dataset = f"Dataset{DATASET_ID:03d}_HiEndDemo"
        self.trainers = [(variants.trainer_name(variants.Variant(arm, args.schedule)),
                          "nnUNetPlans" if arm == variants.NNUNET_ARM else PLANS, variants.ARM_LABELS[arm])
                         for arm in ARMS]
        self.n_steps, self.step_no, self.t0 = 9, 0, time.time()

    def step(self, title: str) -> None:
        self.step_no += 1
        print(f"\n=== [{self.step_no}/{self.n_steps}] {title}  (t = {time.time() - self.t0:.0f} s)", flush=True)

    def run(self, *cmd: str, extra_env: dict | None = None) -> None:
        """Run one real command; stream its output without nnU-Net's known noise (:mod:`nnunetv2_hiendmae.commands`);
        stop the demo with a clear message if it fails."""
        code = run_filtered(cmd, {**self.env, **(extra_env or {})}, on_cpu=self.args.device == "cpu")
        if code != 0:
            raise UserError(f"step {self.step_no} failed: `{cmd[0]}` exited with {code} (output above). "
                            f"Re-run to continue from this step, or add --fresh to start clean")

    def main(self) -> None:
        a = self.args
        if a.fresh and self.root.exists():
            shutil.rmtree(self.root)
        for d in (self.raw, self.pre, self.res):
            d.mkdir(parents=True, exist_ok=True)
        train_env = {"nnUNet_n_proc_DA": str(a.num_workers), "nnUNet_def_n_proc": str(max(1, a.num_workers))}

        print(NOISE_NOTE)
        self.step("generate a CT-like dataset (labelled + held-out test cases) and a folder of unlabelled scans")
        pool = self.root / "unlabelled_scans"
        if not (self.raw / self.dataset / "dataset.json").exists():
            from nnunetv2_hiendmae.demo.synthetic import make_datasets

            make_datasets(self.raw, DATASET_ID, n_labelled=a.labelled, n_unlabelled=a.unlabelled, n_test=a.test,
                          seed=a.seed, scale=a.scale, pool=pool)
        print(f"raw data: {self.raw}; unlabelled scans (no labels): {pool}")

        self.step("nnU-Net planning and preprocessing of the labelled dataset")
        if not (self.pre / self.dataset / "nnUNetPlans_3d_fullres").is_dir():
            workers = str(max(1, a.num_workers))  # the fingerprint's too: nnU-Net's default starts 8 processes
            self.run("nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres",
                     "-np", workers, "-npfp", workers, "--verify_dataset_integrity")

        self.step("preprocess the unlabelled scans like the labelled dataset (nnUNetv2_hiendmae_preprocess_unlabeled)")
        pool_plans = self.pre / f"Dataset{DATASET_ID + 1:03d}_HiEndDemoUnlabelled" / "nnUNetPlans.json"
        if not pool_plans.exists():  # the plans are written last
            self.run("nnUNetv2_hiendmae_preprocess_unlabeled", "-i", str(pool), "-d", str(DATASET_ID + 1), "--name",
                     "HiEndDemoUnlabelled", "--like", str(DATASET_ID), "-np", str(max(1, a.num_workers)))

        # the unlabelled scans only: labelled images in the pretraining would be validation images of some fold
        self.step(f"pretraining ({a.method}) on the unlabelled scans, with the held-out loss and a linear probe on "
                  f"the labelled dataset's fold {a.folds[0]}")
        ckpt = self.root / "pretrain" / "checkpoint_final.pth"
        if not ckpt.exists():
            patch = a.patch_size or methods.METHODS[a.method].small_patch or DEMO_PATCH
            views = methods.small_flags(a.method)
            cmd = ["nnUNetv2_hiendmae_pretrain", "-d", str(DATASET_ID + 1), "-o", str(ckpt.parent), "--method",
                   a.method,
                   "--arch", a.arch, "--patch-size", *map(str, patch), "--batch-size", str(a.pretrain_batch), *views,
                   "--epochs", str(a.pretrain_epochs), "--iters-per-epoch", str(a.pretrain_iters),
                   "--warmup-epochs", "1", "--lr", "1e-3" if a.arch == "vit_tiny" else "1e-4", "--recon-every", "4",
                   "--num-workers", str(a.num_workers), "--device", a.device, "--checkpoint-minutes", "1",
                   "--probe-dataset", str(DATASET_ID), "--probe-fold", a.folds[0]]
            if (ckpt.parent / "checkpoint_latest.pth").exists():
                cmd = ["nnUNetv2_hiendmae_pretrain", "--resume", "-o", str(ckpt.parent)]
            self.run(*cmd)

        self.step("write the fine-tuning plans from the checkpoint")
        if not (self.pre / self.dataset / f"{PLANS}.json").exists():
            self.run("nnUNetv2_hiendmae_plan", "-d", str(DATASET_ID), "-pt", str(ckpt), "-o", PLANS,
                     "-np", str(max(1, a.num_workers)))

        self.step(f"nnUNetv2_train through nnUNetv2_hiendmae_study, fold(s) {' '.join(a.folds)}: "
                  + ", ".join(t for t, _, _ in self.trainers))
        self.run("nnUNetv2_hiendmae_study", "-d", str(DATASET_ID), "-pt", str(ckpt), "-p", PLANS, "-f", *a.folds,
                 "--budgets", str(variants.FULL_BUDGET), "--arms", *ARMS, "--schedule", a.schedule,
                 "-device", a.device, "-o", str(self.root / "study"), extra_env=train_env)

        self.step("nnUNetv2_predict on the held-out test cases")
        pred_root = self.root / "predictions"
        for trainer, plans, _ in self.trainers:
            out = pred_root / trainer
            if len(list(out.glob("*.nii.gz"))) < a.test:
                tta = ["--disable_tta"] if a.device == "cpu" else []  # 8 mirrorings cost 8x on a CPU; same for all
                self.run("nnUNetv2_predict", "-i", str(self.raw / self.dataset / "imagesTs"), "-o", str(out),
                         "-d", str(DATASET_ID), "-c", "3d_fullres", "-tr", trainer, "-p", plans, "-f", *a.folds,
                         "-device", a.device, "-npp", "1", "-nps", "1", "--disable_progress_bar", *tta,
                         extra_env=train_env)

        self.step("compare the cross-validation results (nnUNetv2_hiendmae_compare)")
        compare_dir = self.root / "comparison"
        self.run("nnUNetv2_hiendmae_compare", "-d", str(DATASET_ID), "-c", "3d_fullres", "-o", str(compare_dir),
                 "-r", *[f"{t}__{p}" for t, p, _ in self.trainers])

        self.step("Dice on the held-out test cases")
        held_out = self.held_out_dice(pred_root)
        self.report(held_out, compare_dir, ckpt.parent, pred_root)

    def held_out_dice(self, pred_root: Path) -> dict[str, dict]:
        """nnU-Net's own evaluation of each trainer's predictions against labelsTs."""
        from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder_simple

        labels = json.loads((self.raw / self.dataset / "dataset.json").read_text())["labels"]
        fg = [v for k, v in labels.items() if v != 0]
        result = {}
        for trainer, _, name in self.trainers:
            summary = pred_root / trainer / "summary_heldout.json"
            compute_metrics_on_folder_simple(str(self.raw / self.dataset / "labelsTs"), str(pred_root / trainer), fg,
                                             str(summary), num_processes=1, chill=False)
            s = json.loads(summary.read_text())
            result[name] = {"mean": s["foreground_mean"]["Dice"],
                            **{k: s["mean"][str(v)]["Dice"] for k, v in labels.items() if v != 0}}
        return result

    def report(self, held_out: dict, compare_dir: Path, pretrain_dir: Path, pred_root: Path) -> None:
        classes = [k for k in next(iter(held_out.values())) if k != "mean"]
        print("\nHeld-out test Dice (nnU-Net's evaluation of nnUNetv2_predict outputs):")
        print("| trainer | " + " | ".join(classes) + " | mean fg Dice |")
        print("|---" * (len(classes) + 2) + "|")
        for name, d in held_out.items():
            print(f"| {name} | " + " | ".join(f"{d[c]:.3f}" for c in classes) + f" | {d['mean']:.3f} |")
        (self.root / "heldout_dice.json").write_text(json.dumps(held_out, indent=2))
        if self.args.schedule in ("smoke", "demo"):
            print(f"Note: the {self.args.schedule!r} schedule shows that the pipeline works, "
                  "not which method is better: "
                  "a few dozen iterations are far too few (nnU-Net's SGD recipe often still predicts only background). "
                  "Compare with --schedule 250epochs or full and --folds 0 1 2 3 4 on a GPU.")
        print(f"\nDemo finished in {time.time() - self.t0:.0f} s. Where to look:")
        print(f"  comparison table and plot:   {compare_dir}/comparison.md, comparison.png")
        print(f"  study report, learning curve: {self.root / 'study'}/study.md, learning_curve.png")
        print(f"  pretraining curves:          {pretrain_dir}/progress.png")
        print(f"  reconstructions:             {pretrain_dir}/reconstruction_epoch_*.png")
        print(f"  nnU-Net training folders:    {self.res / self.dataset}")
        print(f"  held-out predictions:        {pred_root}/<trainer>/*.nii.gz")
        print(f"  held-out Dice:               {self.root / 'heldout_dice.json'}")


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.unlabelled < 1:
        raise UserError("--unlabelled must be at least 1: the demo pretrains on the unlabelled scans only")
    Demo(args).main()


if __name__ == "__main__":
    sys.exit(main())
