"""``nnUNetv2_hiendmae_import``: convert a checkpoint of the reference Hi-End-MAE code (e.g. the released
``hi_end_mae_10k.pth``) into a nnunetv2_hiendmae pretraining checkpoint (see
:mod:`pretrain.reference_checkpoint`).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from nnunetv2_hiendmae.errors import ArgumentParser, cli_entry
from nnunetv2_hiendmae.presets import PRESETS, REFERENCE_PATCH


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="nnUNetv2_hiendmae_import",
        description="Convert a checkpoint saved by the reference Hi-End-MAE code (e.g. the released "
                    "hi_end_mae_10k.pth) into a nnunetv2_hiendmae pretraining checkpoint, with metadata for the "
                    "release's preprocessing (1.5 mm spacing, one CT channel, HU [-175, 250] -> [0, 1]).",
        epilog="Security: the file is first read with torch.load(weights_only=True). Reference checkpoints may "
               "contain other Python objects; the file is then unpickled fully (weights_only=False), which can run "
               "code stored in it, so only import files from a trusted source, or pass --weights-only to refuse.",
    )
    p.add_argument("-i", "--input", required=True, help="checkpoint saved by the reference code (RELEASED.pth)")
    p.add_argument("-o", "--output", required=True,
                   help="where to write our checkpoint (CHECKPOINT.pth; its folder is created)")
    p.add_argument("--arch", choices=list(PRESETS), default=None,
                   help="encoder preset; default: the preset whose embed_dim, depth and token size match the weights "
                        "(an --arch that does not match them is an error)")
    p.add_argument("--patch-size", type=int, nargs="+", default=[REFERENCE_PATCH], metavar="N",
                   help="patch size the model was pretrained on, 1 or 3 values (default: 96, as in the reference)")
    p.add_argument("--weights-only", action="store_true",
                   help="never unpickle Python objects: fail if the file holds anything besides tensors")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    return p


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from pretrain.reference_checkpoint import import_reference  # torch: after parsing, so --help is instant

    ckpt = import_reference(args.input, args.output, arch=args.arch, force=args.force, patch_size=args.patch_size,
                            allow_unpickle=not args.weights_only)
    enc, dec = ckpt["encoder"], ckpt["model"]["decoder"]
    dec_txt = (f"decoder {dec['embed_dim']} wide, {dec['self_depth']}+{dec['cross_depth']} blocks"
               if dec else "no decoder")
    print(f"imported {enc['arch']} (in_channels {enc['in_channels']}, token size {enc['token_size']}, "
          f"pos_embed {enc['pos_embed']}; {dec_txt}; {len(ckpt['weights'])} tensors) -> {args.output}")


if __name__ == "__main__":
    main()
