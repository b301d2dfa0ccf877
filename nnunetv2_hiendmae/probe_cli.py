"""``nnUNetv2_hiendmae_probe``: rank pretraining checkpoints by the linear probe on a labelled nnU-Net dataset.

Every input is checked before anything is written: the dataset and fold, every ``-pt`` value (each checkpoint is
loaded and its encoder built, then released; the leakage guard compares the fold's validation cases with the
checkpoint's pretraining cases), every patch size, the output folder. Then each encoder is probed
(:mod:`nnunetv2_hiendmae.probe`) and its row printed; ``probe.csv`` and ``probe.md`` are rewritten atomically after
each row, so an interrupted run leaves the rows done so far.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nnunetv2_hiendmae.errors import ArgumentParser, UserError, cli_entry
from nnunetv2_hiendmae.presets import PRESETS, PROBE_CROPS_PER_CASE, PROBE_MAX_CASES, PROBE_SEED

DEFAULT_PLANS = "nnUNetPlans"
DEFAULT_CONFIGURATION = "3d_fullres"


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of ``nnUNetv2_hiendmae_probe``."""
    p = ArgumentParser(
        prog="nnUNetv2_hiendmae_probe",
        description="Score pretrained encoders with a linear probe on a labelled nnU-Net-preprocessed dataset: one "
                    "linear layer fitted on the frozen encoder's token features from fixed crops of fold F's "
                    "training cases, scored by the mean foreground Dice of its upsampled predictions on fold F's "
                    "validation cases. Prints one row per encoder and writes probe.csv and probe.md.",
        epilog="Read the score as a ranking, not as a segmentation result: a checkpoint must beat random:ARCH (the "
               "same encoder at its initial weights), and a linear probe at token resolution scores far below a "
               "fine-tuned network. The same inputs give the same numbers on the same device. See docs/probe.md.",
    )
    p.add_argument("-d", "--dataset", required=True,
                   help="labelled dataset id (e.g. 4) or name (e.g. Dataset004_Hippocampus) in $nnUNet_preprocessed "
                        "(nnUNetv2_plan_and_preprocess), with the encoders' channel count")
    p.add_argument("-f", "--fold", type=int, default=0,
                   help="nnU-Net fold: the fit uses only its training cases, the score only its validation cases "
                        "(splits_final.json, else nnU-Net's default 5-fold split, made in memory; default: 0)")
    p.add_argument("-pt", "--pretrained", nargs="+", required=True, metavar="CKPT",
                   help="pretraining checkpoints (checkpoint_final.pth, checkpoint_latest.pth, "
                        "nnUNetv2_hiendmae_import output, an nnssl Primus or ResEnc-L checkpoint, a ResEnc probed on "
                        "its stride-16 feature map) and/or random:ARCH "
                        f"(ARCH one of {', '.join(PRESETS)}, or resenc_l, nnssl's ResEnc-L: "
                        "that encoder at its initial weights, the floor every checkpoint must beat)")
    p.add_argument("-o", "--output-dir", type=Path, metavar="DIR",
                   help="where to write probe.csv and probe.md (default: $nnUNet_results/<Dataset>/"
                        "hiendmae_probe_<plans>_<configuration>_fold_<F>)")
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="patch size in voxels, in nnU-Net's transposed axis order (as the plans' patch_size), a "
                        "multiple of the token size; default: each checkpoint's pretraining patch, and for "
                        "random:ARCH the first checkpoint's, else the median image rounded up to whole tokens (at "
                        "most 96 per axis)")
    p.add_argument("-device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="where to run the encoders: auto is cuda when a GPU is visible, else cpu (default: auto)")
    p.add_argument("--seed", type=int, default=PROBE_SEED,
                   help=f"seed of the fit crops and of the random:ARCH weights (default: {PROBE_SEED}, the "
                        "pretraining's default, so that random:ARCH is the initial encoder of a default run)")
    p.add_argument("-p", "--plans", default=DEFAULT_PLANS,
                   help=f"nnU-Net plans identifier whose preprocessed data is read (default: {DEFAULT_PLANS})")
    p.add_argument("-c", "--configuration", default=DEFAULT_CONFIGURATION,
                   help=f"nnU-Net configuration whose preprocessed data is read (default: {DEFAULT_CONFIGURATION})")
    p.add_argument("--crops-per-case", type=int, default=PROBE_CROPS_PER_CASE,
                   help="fit crops per training case, every other one centred on a foreground voxel (default: "
                        f"{PROBE_CROPS_PER_CASE})")
    p.add_argument("--strict", action="store_true",
                   help="refuse a checkpoint whose pretraining saw a validation case of the fold (compared by "
                        "content, as nnUNetv2_hiendmae_plan does) instead of warning and noting it in probe.md")
    p.add_argument("--max-cases", type=int, default=PROBE_MAX_CASES,
                   help="at most this many training cases give fit crops and at most this many validation cases are "
                        f"scored, a seeded subset of each (default: {PROBE_MAX_CASES})")
    return p


@dataclass
class ProbeRow:
    """One encoder's line of the report."""

    name: str
    method: str
    epochs: int | None
    patch_size: list[int]
    score: float
    class_dice: list[float]
    seconds: float


def columns(labels: dict[int, str]) -> list[str]:
    """The report's columns: encoder, method, epochs, patch, mean foreground Dice, Dice per label, seconds."""
    return ["checkpoint", "method", "epochs", "patch size", "mean fg Dice", *[f"Dice {n}" for n in labels.values()],
            "seconds"]


def _cells(row: ProbeRow, number) -> list[str]:
    return [row.name, row.method, "" if row.epochs is None else str(row.epochs), "x".join(map(str, row.patch_size)),
            number(row.score), *[number(d) for d in row.class_dice], f"{row.seconds:.1f}"]


def render_csv(labels: dict[int, str], rows: list[ProbeRow]) -> str:
    """One line per encoder, Dice to 10 significant digits."""
    from nnunetv2_hiendmae.compare import csv_number

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([columns(labels), *[_cells(r, csv_number) for r in rows]])
    return buf.getvalue()


def _dice4(x: float) -> str:
    return f"{x:.4f}"


def markdown_rows(labels: dict[int, str], rows: list[ProbeRow]) -> list[str]:
    """The table as Markdown lines, Dice to 4 decimals."""
    from nnunetv2_hiendmae.compare import markdown_table

    return markdown_table(columns(labels), [_cells(r, _dice4) for r in rows])


def render_markdown(data, rows: list[ProbeRow], device: str, guard: list[str]) -> str:
    """The table, with what was measured how and how to read it (``data``: the :class:`ProbeData` of the run), and
    what the leakage guard said about each checkpoint (``guard``)."""
    split = data.split
    lines = [f"# Linear probe: {split.dataset_name}, fold {split.fold} ({split.plans}, {split.configuration})", "",
             f"Fold {split.fold} of {split.split_source}.", "",
             f"One linear layer on each frozen encoder's final normed token features, fitted on "
             f"{len(data.fit_crops)} fixed crops from {len(data.fit_cases)} of the fold's {len(split.train_cases)} "
             f"training cases; Dice of its upsampled predictions on {len(data.val)} of the fold's "
             f"{len(split.val_cases)} validation cases (sliding window, preprocessed voxels). Seed {data.seed}, "
             f"device {device}.", "",
             "A checkpoint must beat random:ARCH, the same encoder at its initial weights. A linear probe ranks "
             "encoders; it is not the Dice of a fine-tuned network (docs/probe.md).", ""]
    checked = ["", f"Leakage guard (fold {split.fold}'s validation cases against each checkpoint's pretraining cases, "
                   "by content):", "", *[f"- {line}" for line in guard]] if guard else []
    return "\n".join(lines + markdown_rows(split.labels, rows) + checked) + "\n"


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: check every input, probe each encoder, print its row, write probe.csv and probe.md."""
    args = build_parser().parse_args(argv)
    if args.crops_per_case < 1 or args.max_cases < 1:
        raise UserError("--crops-per-case and --max-cases must be at least 1")
    if len(set(args.pretrained)) != len(args.pretrained):
        raise UserError("a -pt value is given more than once")
    import torch

    from nnunetv2_hiendmae import probe
    from nnunetv2_hiendmae.compare import prepare_out_dir, write_files
    from nnunetv2_hiendmae.leakage import check_checkpoint
    from nnunetv2_hiendmae.nnssl import preprocessing_note
    from nnunetv2_hiendmae.nnunet_paths import nnunet_folder

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("-device cuda but no CUDA GPU is visible; use -device cpu")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    split = probe.probe_split(args.dataset, args.fold, args.plans, args.configuration)
    checked = []  # (pretraining patch, token size) of each -pt value; its encoder is built here, then released
    guard = []  # what the leakage guard says about each checkpoint, for the report
    for spec in args.pretrained:
        subject = probe.load_probe_encoder(spec, split, args.seed)
        checked.append((subject.patch_size, subject.encoder.token_size))
        read_from_nnssl = preprocessing_note(subject.pretrain or {})
        if read_from_nnssl:
            print(f"note: {spec}: {read_from_nnssl}; {split.dataset_name} is probed as preprocessed by {args.plans}")
        if subject.pretrain is not None:
            try:
                warnings, notes = check_checkpoint(subject.pretrain, split.dataset_name, args.strict,
                                                   scored_folds=[split.fold])
            except UserError as e:
                raise UserError(f"-pt {spec}: {e}") from None
            said = ([f"{spec}: {' '.join(line.strip() for line in warnings[:2])}"] if warnings else
                    [f"{spec}: {note}" for note in notes])
            guard += said
            for line in warnings:
                print(f"warning: {spec}: {line}", file=sys.stderr)
            for note in notes:
                print(f"note: {spec}: {note}")
    del subject
    first = next((own for own, _ in checked if own is not None), None)
    patches = [probe.probe_patch(token, split, own, args.patch_size, first) for own, token in checked]
    out = args.output_dir or (nnunet_folder("nnUNet_results", must_exist=False) / split.dataset_name
                              / f"hiendmae_probe_{args.plans}_{args.configuration}_fold_{split.fold}")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory")

    print(f"{split.dataset_name} fold {split.fold} of {split.split_source}")
    table = markdown_rows(split.labels, [])
    print("\n".join(table), flush=True)
    datasets, rows = {}, []
    for spec, patch in zip(args.pretrained, patches):
        if tuple(patch) not in datasets:
            datasets[tuple(patch)] = probe.load_probe_data(
                split.dataset_name, split.fold, patch, args.plans, args.configuration, seed=args.seed,
                crops_per_case=args.crops_per_case, max_cases=args.max_cases)
        data = datasets[tuple(patch)]
        subject = probe.load_probe_encoder(spec, split, args.seed)
        result = probe.probe_score(subject.encoder.to(device), data, progress=True)
        rows.append(ProbeRow(spec, subject.method, subject.epochs, patch, result.score,
                             list(result.class_dice.values()), result.seconds))
        print(markdown_rows(split.labels, rows[-1:])[-1], flush=True)
        prepare_out_dir(out)
        write_files({out / "probe.csv": render_csv(split.labels, rows).encode("utf-8"),
                     out / "probe.md": render_markdown(data, rows, device.type, guard).encode("utf-8")})
    print(f"\nwrote probe.csv and probe.md to {out}")


if __name__ == "__main__":
    main()
