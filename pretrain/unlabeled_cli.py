"""``nnUNetv2_hiendmae_preprocess_unlabeled``: Folders of unlabelled scans -> a pretraining dataset in nnU-Net's
preprocessed format, read by ``nnUNetv2_hiendmae_pretrain -d ID`` like any other."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from nnunetv2_hiendmae.errors import ArgumentParser, UserError, cli_entry

EPILOG = """\
examples:
  nnUNetv2_hiendmae_preprocess_unlabeled -i /data/ct_pool -d 900 --name CTPool --ct-window -175 250
  nnUNetv2_hiendmae_preprocess_unlabeled -i /data/siteA /data/siteB list.txt -d 901 --like 4 -np 16
  nnUNetv2_hiendmae_pretrain -d 900 4 -o $nnUNet_results/hiendmae_pool

on a cluster, N jobs (e.g. a SLURM array, --array=0-49), then one plain run that finishes the dataset:
  nnUNetv2_hiendmae_preprocess_unlabeled -i /data/ct_pool -d 900 -np 8 --part $SLURM_ARRAY_TASK_ID --num-parts 50
  nnUNetv2_hiendmae_preprocess_unlabeled -i /data/ct_pool -d 900 -np 8

Writes $nnUNet_preprocessed/DatasetID_NAME/ (creating $nnUNet_preprocessed if needed): nnUNetPlans_3d_fullres/ (per
case <case>.b2nd, its body mask <case>_seg.b2nd and <case>.pkl with body locations for crop sampling and the content
fingerprint of the image as read), nnUNetPlans.json, dataset.json, dataset_fingerprint.json, cases.json (case ->
source files), content_fingerprints.json (case -> content fingerprint, for the leakage guard of
nnUNetv2_hiendmae_plan), skipped.json (case -> files and reason) and the settings (hiendmae_unlabeled.json). Nothing is
written to nnUNet_raw. Re-running the same command skips finished cases; a kill at any moment leaves nothing
half-written that a later run or the loader would trust. Files that cannot be used (unreadable, truncated, 2D, 4D,
NaN, constant) are skipped and reported; the command fails only if no case succeeds.

With --part K --num-parts N, a job preprocesses cases K, K+N, K+2N, ... of the sorted case list (nnU-Net's
-part_id/-num_parts rule; every part must be given the same inputs and flags) and writes no shared file except the
settings, which every part computes alike (CT statistics included) and the first one stores. Run the same command
without --part after all parts have ended: it writes dataset.json, the plans and the case lists, and preprocesses
what the parts did not (failures, killed jobs).
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="nnUNetv2_hiendmae_preprocess_unlabeled",
                       description="Turn folders of unlabelled scans into a pretraining dataset in nnU-Net's "
                                   "preprocessed format, which nnUNetv2_hiendmae_pretrain -d ID reads like any other.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--inputs", nargs="+", required=True, metavar="DIR_OR_LIST",
                   help="folders searched recursively for images (.nii.gz, .nii, .nrrd, .mha, .gipl), or .txt files "
                        "listing image paths; CASE_0000, CASE_0001, ... in one folder are the channels of one case")
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id of the new dataset")
    p.add_argument("--name", default="Unlabeled", help="dataset name after the id (default: %(default)s)")
    p.add_argument("--modality", nargs="+", choices=("CT", "MR"), default=["CT"],
                   help="CT: nnU-Net's CTNormalization (window or the pool's statistics); MR: per-image z-score; one "
                        "value for every channel, or one per channel (CASE_0000, CASE_0001, ...), e.g. CT MR: then "
                        "--ct-window applies to the CT channels only (default: CT)")
    p.add_argument("--spacing", type=float, nargs=3, default=[1.5, 1.5, 1.5], metavar=("X", "Y", "Z"),
                   help="target spacing in mm, in the images' axis order as nnU-Net reads them (default: 1.5 1.5 1.5, "
                        "the released Hi-End-MAE spacing)")
    p.add_argument("--ct-window", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="CT: map HU [LOW, HIGH] to [0, 1] (clipped) through CTNormalization; -175 250 reproduces the "
                        "released weights' mapping (default: clip and z-score with the pool's body statistics)")
    p.add_argument("--like", metavar="DATASET",
                   help="take spacing, axis order and normalisation from this dataset's nnU-Net plans (pretrain on the "
                        "pool, fine-tune on DATASET, both preprocessed alike); excludes --spacing, --ct-window and "
                        "--modality")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans of --like (default: %(default)s)")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="configuration of --like (default: %(default)s)")
    p.add_argument("--patch-size", type=int, nargs=3, default=[96, 96, 96], metavar=("X", "Y", "Z"),
                   help="pretraining patch size the blosc2 chunks are laid out for, as nnU-Net does for its patch "
                        "(default: 96 96 96)")
    p.add_argument("-np", "--num-processes", type=int, default=4,
                   help="cases preprocessed in parallel; memory grows with it (default: %(default)s)")
    p.add_argument("--file-ending", help="only files with this ending, e.g. .nii.gz (default: every supported one)")
    p.add_argument("--reader", metavar="CLASS",
                   help="nnU-Net image reader for every file, as overwrite_image_reader_writer in a dataset.json, e.g. "
                        "NibabelIOWithReorient (default: nnU-Net's first reader for each file ending, SimpleITKIO for "
                        "NIfTI)")
    p.add_argument("--part", type=int, metavar="K",
                   help="with --num-parts N: preprocess only part K (0 to N-1) of the cases, as one of N jobs running "
                        "at the same time; then a run without --part finishes the dataset (default: all cases)")
    p.add_argument("--num-parts", type=int, metavar="N", help="number of parts the cases are split into (with --part)")
    return p


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    given = {a.dest for a in p._actions if a.dest != "help" and getattr(args, a.dest) != a.default}
    if args.like and given & {"spacing", "ct_window", "modality"}:
        raise UserError("--like takes spacing and normalisation from the dataset: drop --spacing, --ct-window and "
                        "--modality")
    if args.ct_window and "CT" not in args.modality:
        raise UserError("--ct-window is for CT channels (--modality CT, or one value per channel such as CT MR)")
    if args.ct_window and args.ct_window[0] >= args.ct_window[1]:
        raise UserError(f"--ct-window LOW HIGH needs LOW < HIGH, got {args.ct_window[0]} {args.ct_window[1]}")
    if not 0 <= args.dataset_id <= 999 or args.num_processes < 1 or min(args.spacing) <= 0 or min(args.patch_size) < 1:
        raise UserError("-d must be in 0..999, -np at least 1, --spacing and --patch-size positive")
    if (args.part is None) != (args.num_parts is None):
        raise UserError("--part K and --num-parts N go together")
    if args.part is not None and not 0 <= args.part < args.num_parts:
        raise UserError(f"--part must be in 0..{args.num_parts - 1} for --num-parts {args.num_parts} "
                        f"(counted from 0, like SLURM_ARRAY_TASK_ID with --array=0-{args.num_parts - 1})"
                        if args.num_parts >= 1 else "--num-parts must be at least 1")
    part = None if args.part is None else (args.part, args.num_parts)
    from pretrain.unlabeled import preprocess_unlabeled, reader_names  # nnU-Net: after parsing, --help is instant

    if args.reader and args.reader not in reader_names():
        raise UserError(f"--reader {args.reader} is not an nnU-Net image reader; "
                        f"choose one of {', '.join(reader_names())}")
    folder, report = preprocess_unlabeled(
        args.inputs, args.dataset_id, args.name,
        {"like": args.like, "plans": args.plans, "configuration": args.configuration, "modality": args.modality,
         "spacing": args.spacing, "ct_window": args.ct_window, "patch_size": args.patch_size, "reader": args.reader},
        processes=args.num_processes, file_ending=args.file_ending, part=part)
    if part is not None:  # a part whose cases all fail is no error: the final run reports them
        print(f"part {args.part} of {args.num_parts}: {report.summary()}")
        print(f"next: when all {args.num_parts} parts have ended, the same command without --part and --num-parts "
              f"finishes {folder}")
        return
    if report.done + report.already == 0:
        raise UserError(f"no case could be preprocessed: {report.summary()}")
    print(report.summary())
    print(f"dataset: {folder}")
    print(f"next: nnUNetv2_hiendmae_pretrain -d {args.dataset_id} -o OUTPUT_FOLDER")


if __name__ == "__main__":
    main()
