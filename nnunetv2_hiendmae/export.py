"""``nnUNetv2_hiendmae_export``: a pretrained encoder in the files nnU-Net's own loaders read (docs/interop.md).

``--format pretrained_weights``: ``{"network_weights": state dict}`` of our fine-tuning network for a plans file of
``nnUNetv2_hiendmae_plan`` (:class:`~nnunetv2_hiendmae.network.HiEndUNETR` or
:class:`~nnunetv2_hiendmae.primus_network.PrimusNetwork`), the pretrained encoder loaded as our trainers load it
(:func:`~nnunetv2_hiendmae.weights.load_pretrained_encoder`: stem adapted to the dataset's channels, learned position
embedding to the plans' patch) and the decoder seeded. nnU-Net 2.8.1's ``nnUNetv2_train -pretrained_weights``
(``nnunetv2/run/load_pretrained_weights.py``) requires every key of the network except ``.seg_layers.`` with the
same shape: this file has every key, so it loads into the network of those plans only. nnU-Net draws the
``.seg_layers.`` itself: the ViT's 1x1x1 head, Primus's whole decoder.

``--format nnssl``: for a Primus checkpoint, nnssl's checkpoint format with its adaptation plan
(:func:`nnunetv2_hiendmae.nnssl.to_nnssl`), which nnU-Net master's ``nnUNetv2_preprocess_like_nnssl`` and
``PretrainedTrainer_Primusx`` read without this plugin. A plain-ViT checkpoint is refused: only this plugin fine-tunes
it.

Either checkpoint kind is accepted as input: ours (``nnUNetv2_hiendmae_pretrain``/``_import``) or an nnssl Primus
checkpoint. The file is written atomically; nothing is written on an error.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from nnunetv2_hiendmae.errors import ArgumentParser, UserError, cli_entry

FORMATS = ("pretrained_weights", "nnssl")
CONFIGURATION = "3d_fullres"


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of ``nnUNetv2_hiendmae_export``."""
    p = ArgumentParser(
        prog="nnUNetv2_hiendmae_export",
        description="Write a pretrained encoder in a file that nnU-Net's own loaders read: for nnUNetv2_train "
                    "-pretrained_weights (nnU-Net 2.8.1; our network of a given plans file, every key), or as an "
                    "nnssl checkpoint with its adaptation plan (Primus only; for nnU-Net master's "
                    "nnUNetv2_preprocess_like_nnssl and PretrainedTrainer_Primusx, without this plugin).",
        epilog="See docs/interop.md for which checkpoint goes where and what each route loses.")
    p.add_argument("-pt", "--pretrained", required=True, metavar="CHECKPOINT",
                   help="the pretraining checkpoint: ours (nnUNetv2_hiendmae_pretrain or nnUNetv2_hiendmae_import "
                        "output) or an nnssl Primus checkpoint")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="pretrained_weights: our fine-tuning network's whole state dict for the plans -d/-p/-c, for "
                        "nnUNetv2_train -pretrained_weights; nnssl: an nnssl-format Primus checkpoint (refused for "
                        "the plain ViT, which only this plugin fine-tunes)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="FILE",
                   help="the file to write (replaced atomically if it exists; its folder is created)")
    p.add_argument("-d", "--dataset",
                   help="with --format pretrained_weights: dataset id or DatasetXXX_Name in $nnUNet_preprocessed "
                        "whose plans give the network")
    p.add_argument("-p", "--plans",
                   help="with --format pretrained_weights: plans written by nnUNetv2_hiendmae_plan (their name, as "
                        "for nnUNetv2_train -p)")
    p.add_argument("-c", "--configuration", default=CONFIGURATION,
                   help=f"with --format pretrained_weights: the plans' configuration (default: {CONFIGURATION})")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the parts the checkpoint does not hold: the decoder (pretrained_weights) or "
                        "Primus's up_projection (nnssl); nnU-Net draws the segmentation head itself, for Primus the "
                        "whole decoder (default: %(default)s)")
    return p


def network_for_plans(dataset: str, plans_name: str, configuration: str, seed: int):
    """``(network, plans)``: our fine-tuning network of the plans (``$nnUNet_preprocessed/<dataset>/<plans>.json``),
    built as our trainers build it, initialised after ``torch.manual_seed(seed)`` (global random state untouched).
    UserError for missing plans, another configuration, or plans of another network."""
    import torch
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_hiendmae.nnunet_paths import dataset_name, nnunet_folder
    from nnunetv2_hiendmae.presets import NETWORK_CLASSES
    from nnunetv2_hiendmae.trainers import nnUNetTrainerHiEndMAE

    folder = nnunet_folder("nnUNet_preprocessed") / dataset_name(dataset)
    path = folder / f"{plans_name}.json"
    if not path.is_file():
        raise UserError(f"plans {path} not found: write them with nnUNetv2_hiendmae_plan -d {dataset} -pt CHECKPOINT "
                        f"-o {plans_name}")
    plans = json.loads(path.read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    manager = PlansManager(plans)
    if configuration not in manager.available_configurations:
        raise UserError(f"plans {path.name} have no configuration {configuration}")
    config = manager.get_configuration(configuration)
    if config.network_arch_class_name not in NETWORK_CLASSES:
        raise UserError(f"plans {path.name} describe {config.network_arch_class_name}, not one of our networks "
                        f"({', '.join(NETWORK_CLASSES)}): export for plans written by nnUNetv2_hiendmae_plan")
    channels = determine_num_input_channels(manager, config, dataset_json)
    heads = manager.get_label_manager(dataset_json).num_segmentation_heads
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = nnUNetTrainerHiEndMAE.build_network_architecture(manager, config, channels, heads, False)
    return network, plans


def export_pretrained_weights(ckpt: dict, args: argparse.Namespace) -> tuple[dict, list[str]]:
    """``(file contents, notes)`` for ``--format pretrained_weights``."""
    from nnunetv2_hiendmae.checkpoint import encoder_fingerprint
    from nnunetv2_hiendmae.weights import load_pretrained_encoder

    if not args.dataset or not args.plans:
        raise UserError("--format pretrained_weights needs -d DATASET and -p PLANS (the plans whose network the "
                        "file is for)")
    network, plans = network_for_plans(args.dataset, args.plans, args.configuration, args.seed)
    report = load_pretrained_encoder(network, ckpt)
    sha = encoder_fingerprint(ckpt)
    notes = [report.summary()]
    written_for = (plans.get("pretrain_info") or {}).get("encoder_sha256")
    if written_for and written_for != sha:
        notes.append(f"plans {args.plans} were written for another encoder ({written_for[:12]}...); the file holds "
                     f"this checkpoint's ({sha[:12]}...)")
    state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    return {"network_weights": state, "nnunetv2_hiendmae": {
        "checkpoint": str(Path(args.pretrained).expanduser().resolve()), "encoder_sha256": sha,
        "plans": args.plans, "configuration": args.configuration, "method": ckpt.get("method")}}, notes


def next_step(args: argparse.Namespace) -> str:
    """What to run with the file written."""
    from nnunetv2_hiendmae.ext import EXPORT_LINE

    out = args.output
    if args.format == "pretrained_weights":
        return (f"Next:\n  {EXPORT_LINE}\n  nnUNetv2_train {args.dataset} {args.configuration} FOLD -p {args.plans} "
                f"-tr nnUNetTrainerHiEndMAE_scratch -pretrained_weights {out}")
    return (f"Next, with nnU-Net master (no plugin needed):\n  nnUNetv2_preprocess_like_nnssl -d DATASET -n NAME -pc "
            f"{out} -am like_pretrained\n  nnUNetv2_train_pretrained DATASET 3d_fullres FOLD -p PLANS_WRITTEN_ABOVE "
            f"-tr PretrainedTrainer_Primusx")


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: read the checkpoint, build the file in memory, write it atomically."""
    args = build_parser().parse_args(argv)
    if args.output.is_dir():
        raise UserError(f"-o {args.output} is a folder: name the file to write")
    if args.format == "nnssl" and (args.dataset or args.plans):
        raise UserError("-d/-p are for --format pretrained_weights: an nnssl checkpoint is independent of any plans")
    from nnunetv2_hiendmae.checkpoint import load_checkpoint, save_atomic
    from nnunetv2_hiendmae.nnssl import to_nnssl

    ckpt = load_checkpoint(args.pretrained)
    if args.format == "pretrained_weights":
        contents, notes = export_pretrained_weights(ckpt, args)
        warnings = []
    else:
        contents, warnings = to_nnssl(ckpt, args.seed)
        notes = [f"{contents['nnssl_adaptation_plan']['architecture_plans']['arch_class_name']}, pretraining patch "
                 f"{contents['nnssl_adaptation_plan']['recommended_downstream_patchsize']}"]
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    args.output.parent.mkdir(parents=True, exist_ok=True)  # created, as nnU-Net creates its folders
    save_atomic(contents, args.output)
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {args.output} ({args.format})")
    print(next_step(args))


if __name__ == "__main__":
    main()
