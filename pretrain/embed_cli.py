"""``nnUNetv2_hiendmae_embed``: per-case embeddings from a pretrained or fine-tuned encoder (docs/embeddings.md)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from nnunetv2_hiendmae.errors import ArgumentParser, UserError, cli_entry
from nnunetv2_hiendmae.presets import PRECISIONS

EPILOG = """\
examples:
  nnUNetv2_hiendmae_embed -i /data/ct_scans -pt $nnUNet_results/hiendmae_vit_b16/checkpoint_final.pth -o emb
  nnUNetv2_hiendmae_embed -i siteA/ siteB/ list.txt -pt pretrain.pth -o emb --tokens -np 8
  nnUNetv2_hiendmae_embed -d 4 -pt pretrain.pth -o emb4
  nnUNetv2_hiendmae_embed -i imagesTs/ -o emb -pt \\
      $nnUNet_results/Dataset004_X/nnUNetTrainerHiEndMAE__nnUNetPlans_HiEndMAE__3d_fullres/fold_0/checkpoint_final.pth

Writes to OUT: <case>.npz per case (source: its files; mean and cls: the pooled vectors [E]; with --tokens also
tokens [E, *grid], token_body, token_spacing and token_origin in mm, in the axis order of the image as nnU-Net's
reader returns it), embeddings.parquet (with pyarrow) or embeddings.csv (case, source, mean_0.., cls_0..) for all
cases in OUT, skipped.json (case -> files and reason) and embed_settings.json. Re-running the same command skips the
cases that have their .npz and rewrites the table; files are written atomically. Files that cannot be used
(unreadable, 2D, 4D, NaN, constant, another channel count) are skipped and reported.
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="nnUNetv2_hiendmae_embed",
                       description="Embed whole cases with a trained ViT encoder: per case the mean of its body's "
                                   "token features and the CLS token, optionally the token feature map, and a table "
                                   "of all cases, for linear probes, retrieval or clustering.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("cases (one of -i or -d)")
    data.add_argument("-i", "--inputs", nargs="+", action="extend", metavar="DIR_OR_LIST",
                      help="folders searched recursively for images (.nii.gz, .nii, .nrrd, .mha, .gipl), or .txt "
                           "files listing image paths; may be repeated. CASE_0000, CASE_0001, ... in one folder are "
                           "the channels of one case. Each case is preprocessed as the encoder's training data were "
                           "(spacing, axis order, normalisation from the checkpoint, by nnU-Net's own preprocessing)")
    data.add_argument("-d", "--dataset", metavar="DATASET",
                      help="a dataset in nnUNet_preprocessed (id or name), whose preprocessed cases are embedded as "
                           "they are (a note says where their preprocessing differs from the encoder's data)")
    data.add_argument("-p", "--plans", help="with -d: plans identifier (default: nnUNetPlans)")
    data.add_argument("-c", "--configuration", help="with -d: configuration (default: 3d_fullres)")
    data.add_argument("--file-ending", help="with -i: only files with this ending, e.g. .nii.gz (default: every "
                                            "supported one)")
    data.add_argument("--reader", metavar="CLASS",
                      help="with -i: nnU-Net image reader for every file, e.g. NibabelIOWithReorient (default: the "
                           "fine-tuned checkpoint's plans' reader, as nnUNetv2_predict; for a pretraining checkpoint "
                           "nnU-Net's first reader for each file ending)")
    p.add_argument("-pt", "--checkpoint", required=True, metavar="CKPT",
                   help="a pretraining checkpoint (nnUNetv2_hiendmae_pretrain or _import, or an nnssl Primus or "
                        "ResEnc-L checkpoint, a ResEnc giving its stride-16 feature map as tokens) or the "
                        "checkpoint_final.pth of nnUNetv2_train with an nnUNetTrainerHiEndMAE* trainer (its network's "
                        "encoder: the ViT or Primus)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (created if needed)")
    p.add_argument("--pool", nargs="+", choices=("mean", "cls"), default=["mean", "cls"],
                   help="pooled vectors to keep: mean = the token features averaged over the body (each token "
                        "weighted by its fraction of body voxels), cls = the CLS token averaged over the windows; for "
                        "Primus and a ResEnc, which have none, each window's mean token (a ResEnc: global average "
                        "pooling) averaged over the windows (default: mean cls)")
    p.add_argument("--tokens", action="store_true",
                   help="also keep the token feature map of each case with its spacing and origin, to lay it over "
                        "the image (E x grid floats per case: about 20 MB for ViT-B on a 300^3 voxel case)")
    p.add_argument("--step-size", type=float, default=0.5,
                   help="sliding-window step as a fraction of the patch, as nnUNetv2_predict's -step_size; overlapping "
                        "windows' token features are averaged (default: %(default)s)")
    p.add_argument("-b", "--batch-size", type=int, default=4,
                   help="windows per forward pass; more is faster on a GPU until memory runs out "
                        "(default: %(default)s)")
    p.add_argument("-np", "--num-processes", type=int, default=2,
                   help="worker processes that read and preprocess the next cases while the encoder runs, each "
                        "holding up to two cases in memory; 0 reads in the main process (default: %(default)s)")
    p.add_argument("-device", "--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto = cuda if available, else cpu (default: %(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast precision of the encoder: auto = bf16 on CUDA, fp32 on CPU (default: %(default)s)")
    return p


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if bool(args.inputs) == bool(args.dataset):
        raise UserError("give images with -i or a preprocessed dataset with -d (one of the two)")
    if args.inputs and (args.plans or args.configuration):
        raise UserError("-p and -c choose the plans of a preprocessed dataset: they go with -d")
    if args.dataset and (args.file_ending or args.reader):
        raise UserError("--file-ending and --reader choose how image files are read: they go with -i")
    if not 0 < args.step_size <= 1:
        raise UserError(f"--step-size must be in (0, 1], got {args.step_size}")
    if args.batch_size < 1 or args.num_processes < 0:
        raise UserError("-b must be at least 1 and -np at least 0")
    import torch  # heavy imports after parsing: --help stays instant

    from nnunetv2_hiendmae.precision import resolve_precision
    from pretrain.embed import Options, check_output, embed, image_cases, preprocessed_cases, run_settings
    from pretrain.trained_encoder import load_trained_encoder
    from pretrain.unlabeled import FILE_ENDINGS, find_cases, reader_names

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("-device cuda, but torch sees no CUDA device")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if args.reader and args.reader not in reader_names():
        raise UserError(f"--reader {args.reader} is not an nnU-Net image reader; "
                        f"choose one of {', '.join(reader_names())}")
    trained = load_trained_encoder(args.checkpoint)
    for note in trained.notes:
        print(f"note: {note}")
    if args.inputs:
        cases = find_cases(args.inputs, args.file_ending)
        if not cases:
            raise UserError(f"no images ({', '.join(FILE_ENDINGS)}) found in {' '.join(args.inputs)}")
        dataset = image_cases(cases, trained, args.reader)
    else:
        dataset, notes = preprocessed_cases(args.dataset, args.plans or "nnUNetPlans",
                                            args.configuration or "3d_fullres", trained)
        for note in notes:
            print(f"note: {dataset.settings.source} is preprocessed unlike the encoder's training data: {note}; "
                  f"its cases are embedded as they are", file=sys.stderr)
    options = Options(tuple(dict.fromkeys(args.pool)), args.tokens, args.step_size, args.batch_size,
                      resolve_precision(device, args.precision))
    run_info = run_settings(trained, dataset, options)
    out = Path(args.output).expanduser()
    check_output(out, run_info)
    report, timing, table = embed(dataset, trained, out, options, run_info, device, args.num_processes)
    if report.done + report.already == 0:
        raise UserError(f"no case could be embedded: {report.summary()}")
    print(report.summary())
    print(timing.summary())
    print(f"table: {table}")


if __name__ == "__main__":
    main()
