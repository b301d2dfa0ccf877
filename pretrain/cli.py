"""``nnUNetv2_hiendmae_pretrain``: Hi-End-MAE pretraining on nnU-Net preprocessed datasets."""
from __future__ import annotations

import argparse
import os

from nnunetv2_hiendmae.errors import ArgumentParser, cli_entry
from nnunetv2_hiendmae.presets import PRESETS

EPILOG = """\
examples:
  nnUNetv2_hiendmae_pretrain -d 1 2 3 -o $nnUNet_results/hiendmae_vit_b16
  torchrun --nproc_per_node=4 $(which nnUNetv2_hiendmae_pretrain) -d 1 -o OUT --batch-size 6

Reads $nnUNet_preprocessed/DatasetXXX_*/<plans>_<configuration>/ (create it with nnUNetv2_plan_and_preprocess).
Writes into OUT_DIR: checkpoint_latest.pth (every epoch, atomically), checkpoint_final.pth, training_log_*.txt,
progress.png and reconstruction_epoch_*.png. The checkpoint format is described in docs/checkpoint_format.md.
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="nnUNetv2_hiendmae_pretrain", description=__doc__.split(":", 1)[1].strip(),
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--datasets", nargs="+", required=True,
                   help="dataset ids or names (DatasetXXX_Name) to pretrain on; all must have the same channel count")
    p.add_argument("-o", "--output-dir", required=True, help="folder for checkpoints, log and figures")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier whose preprocessed data is read (default: %(default)s)")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration whose data is read (default: %(default)s)")
    p.add_argument("--arch", default="vit_b16", choices=list(PRESETS),
                   help="encoder preset: vit_b16 (768/12/12, 16^3 tokens), vit_l16 (1536/12/16), vit_l12 (1536/12/16, 12^3 "
                        "tokens, the released model), vit_tiny (CPU tests/demo) (default: %(default)s)")
    p.add_argument("--patch-size", nargs=3, type=int, default=[96, 96, 96], metavar=("X", "Y", "Z"),
                   help="crop size in voxels, in nnU-Net's (transposed) axis order; each a multiple of the token size (default: 96 96 96)")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of tokens masked per crop (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=24, help="volumes loaded per iteration and GPU (default: %(default)s)")
    p.add_argument("--crops-per-volume", type=int, default=8,
                   help="random crops taken from each loaded volume; a step sees batch-size x crops-per-volume crops (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=1000, help="training epochs (default: %(default)s)")
    p.add_argument("--iters-per-epoch", type=int, default=None,
                   help="iterations per epoch (default: cases / (batch-size x GPUs), i.e. each volume once per epoch)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of AdamW(0.9, 0.95), not scaled with batch (default: %(default)s)")
    p.add_argument("--warmup-epochs", type=int, default=10, help="linear warm-up epochs before the cosine decay (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.05,
                   help="AdamW weight decay; biases, norms, tokens and position embeddings get none (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="data-loading worker processes per GPU, 0 = load in the main process (default: %(default)s)")
    p.add_argument("--fold", type=int, default=None,
                   help="pretrain only on the training cases of this nnU-Net fold (splits_final.json), so a later "
                        "cross-validation on the same dataset is not leaked (default: all cases)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available, else cpu")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="autocast precision: auto = bf16 on CUDA, fp32 on CPU; fp16 uses a GradScaler (default: %(default)s)")
    p.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm to this value (default: off, as the reference)")
    p.add_argument("--accum-steps", type=int, default=1, help="accumulate gradients over this many iterations per optimiser step (default: 1)")
    p.add_argument("--pos-embed", choices=["sincos", "learned"], default="sincos",
                   help="encoder position embedding: fixed 3D sin-cos (reference default) or learned (default: %(default)s)")
    p.add_argument("--recon-every", type=int, default=10, help="write a reconstruction figure every N epochs (default: %(default)s)")
    p.add_argument("--no-progress-bar", action="store_true", help="disable the per-epoch tqdm bar (e.g. on clusters)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT_DIR from checkpoint_latest.pth (model, optimiser, "
                   "scaler, schedule, epoch and RNG state)")
    p.add_argument("--seed", type=int, default=41, help="random seed (reference: 41) (default: %(default)s)")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    import torch  # heavy imports after argument parsing keep --help fast

    from pretrain.train import PretrainConfig, pretrain

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = PretrainConfig(
        datasets=[str(d) for d in args.datasets], output_dir=args.output_dir, plans=args.plans,
        configuration=args.configuration, arch=args.arch, patch_size=list(args.patch_size), mask_ratio=args.mask_ratio,
        batch_size=args.batch_size, crops_per_volume=args.crops_per_volume, epochs=args.epochs,
        iters_per_epoch=args.iters_per_epoch, lr=args.lr, warmup_epochs=args.warmup_epochs, weight_decay=args.weight_decay,
        num_workers=args.num_workers, fold=args.fold, device=device, precision=args.precision, grad_clip=args.grad_clip,
        accum_steps=args.accum_steps, pos_embed=args.pos_embed, resume=args.resume, seed=args.seed,
        recon_every=args.recon_every, progress_bar=not args.no_progress_bar,
    )
    final = pretrain(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"pretrained checkpoint: {final}")
        print(f"next: nnUNetv2_hiendmae_plan -d DATASET -pt {final}")


if __name__ == "__main__":
    main()
