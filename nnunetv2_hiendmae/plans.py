"""``nnUNetv2_hiendmae_plan``: nnU-Net plans for fine-tuning a pretrained Hi-End-MAE ViT, or a from-scratch ViT.

nnU-Net 2.8 has no hook for plugin planners, so the plans are derived from the dataset's own
plans (``-pl_base``, default ``nnUNetPlans``): their ``3d_fullres`` configuration gets the ViT network, a patch that
is a multiple of the token size, batch size 2 and, by default, the spacing and intensity normalisation the encoder
was pretrained with (read from the checkpoint), plus a top-level ``pretrain_info`` block that the trainers read.

Preprocessed data is shared with the base plans when spacing and normalisation are unchanged; otherwise it goes to
``<plans name>_3d_fullres`` and nnU-Net's own preprocessing is run for it, never into a folder that another plans
file uses (nnU-Net's preprocessor deletes its output folder first).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnunetv2_hiendmae.errors import ArgumentParser, UserError, cli_entry
from nnunetv2_hiendmae.ext import EXPORT_LINE
from nnunetv2_hiendmae.fileio import atomic_write_json
from nnunetv2_hiendmae.nnunet_paths import dataset_id as nnunet_dataset_id
from nnunetv2_hiendmae.nnunet_paths import dataset_name, nnunet_folder, plan_and_preprocess_command
from nnunetv2_hiendmae.presets import ENCODERS, PRESETS, encoder_config, encoder_kind, token_size_3d

CONFIGURATION = "3d_fullres"
DEFAULT_NAME = "nnUNetPlans_HiEndMAE"
SCRATCH_PATCH = (96, 96, 96)  # the reference's fine-tuning crop, limit for from-scratch plans
BATCH_SIZE = 2
NUM_PROCESSES = 4  # nnUNetv2_preprocess's default for 3d_fullres
CT = "CTNormalization"
# Everything nnU-Net's preprocessing depends on: equal values mean the same preprocessed data.
DATA_KEYS = ("preprocessor_name", "spacing", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
             "resampling_fn_data_kwargs", "resampling_fn_seg", "resampling_fn_seg_kwargs")


@dataclass
class Dataset:
    """A dataset's preprocessed folder and what nnU-Net's planning left there."""

    id: int
    folder: Path
    base: dict  # the base plans
    base_cfg: dict  # its 3d_fullres configuration, inheritance resolved
    fingerprint: dict
    dataset_json: dict

    @property
    def num_channels(self) -> int:
        return len(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {})))

    @property
    def num_cases(self) -> int:
        return len(self.fingerprint["spacings"])


@dataclass
class Plan:
    """The plans to write and how their data comes about (``reuse``, ``present`` or ``preprocess``)."""

    dataset: Dataset
    name: str
    plans: dict
    data: str
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the leakage guard's


@dataclass
class Source:
    """Where the encoder comes from: a checkpoint (its config and ``pretrain`` block) or a preset (scratch)."""

    encoder: dict
    info: dict  # the plans' pretrain_info block
    pretrain: dict = field(default_factory=dict)
    checkpoint: Path | None = None
    transpose_forward: list[int] | None = None  # of the pretraining plans: axis order of spacing and patch size
    # the pretraining patch size (None: the checkpoint does not record it)
    patch_size: list[int] | None = field(default_factory=lambda: list(SCRATCH_PATCH))


def find_dataset(dataset: str, base_name: str) -> Dataset:
    pre = nnunet_folder("nnUNet_preprocessed")
    name = dataset_name(dataset)
    dataset_id = nnunet_dataset_id(name)
    create = plan_and_preprocess_command(name, CONFIGURATION)
    folder = pre / name
    if not folder.is_dir():
        raise UserError(f"{name} is not in nnUNet_preprocessed ({pre}): run '{create}' first")
    files = {"base plans": folder / f"{base_name}.json", "dataset fingerprint": folder / "dataset_fingerprint.json",
             "dataset.json": folder / "dataset.json"}
    for what, path in files.items():
        if not path.is_file():
            raise UserError(f"{what} {path} not found: run '{create}'"
                            + (f" (or the planner that writes {base_name})" if what == "base plans" else "") + " first")
    base = json.loads(files["base plans"].read_text())
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(base)
    if CONFIGURATION not in manager.available_configurations:
        raise UserError(f"base plans {files['base plans']} have no {CONFIGURATION} configuration (a 2D dataset?)")
    return Dataset(dataset_id, folder, base, dict(manager.get_configuration(CONFIGURATION).configuration),
                   json.loads(files["dataset fingerprint"].read_text()), json.loads(files["dataset.json"].read_text()))


def to_dataset_axes(values: Sequence, transpose_from: Sequence[int], transpose_to: Sequence[int]) -> list:
    """Per-axis values in one plans' transposed order, re-ordered for another's (both relative to the reader's axes)."""
    original = [None] * len(values)
    for i, axis in enumerate(transpose_from):
        original[axis] = values[i]
    return [original[axis] for axis in transpose_to]


def median_shape(fingerprint: dict, spacing: Sequence[float], transpose_forward: Sequence[int]) -> list[float]:
    """``median_image_size_in_voxels`` at a target spacing (transposed order), computed as nnU-Net's planner does."""
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    target = to_dataset_axes(spacing, transpose_forward, range(len(spacing)))  # back to the reader's axes
    shapes = [compute_new_shape(shape, sp, target)
              for sp, shape in zip(fingerprint["spacings"], fingerprint["shapes_after_crop"])]
    median = np.median(shapes, 0)
    return [float(median[axis]) for axis in transpose_forward]


def default_patch(median: Sequence[float], token: Sequence[int], limit: Sequence[int]) -> list[int]:
    """Per axis: the median image rounded up to whole tokens (at least one), but never above ``limit``."""
    return [min(max(t, lim // t * t), max(t, math.ceil(m / t) * t)) for m, t, lim in zip(median, token, limit)]


def check_patch(patch: Sequence[int], token: Sequence[int]) -> list[int]:
    if len(patch) != 3 or any(p <= 0 or p % t for p, t in zip(patch, token)):
        raise UserError(f"--patch-size {' '.join(map(str, patch))} is not a multiple of the token size "
                        f"{list(token)} on every axis")
    return list(patch)


# the flag that makes nnUNetv2_hiendmae_plan do without a value the checkpoint's pretrain block lacks
INSTEAD_OF_PRETRAIN_VALUE = {"spacing": "--spacing dataset", "patch_size": "--patch-size X Y Z",
                             "normalization_schemes": "--normalization dataset",
                             "use_mask_for_norm": "--normalization dataset",
                             "foreground_intensity_properties_per_channel": "--normalization dataset"}


def missing_pretrain_value(ckpt_path: Path, key: str) -> UserError:
    """The refusal of a checkpoint without ``pretrain.<key>``, naming the flag that does without it."""
    return UserError(f"checkpoint {ckpt_path} does not record pretrain.{key}: pass {INSTEAD_OF_PRETRAIN_VALUE[key]}, "
                     f"or use a checkpoint written by nnUNetv2_hiendmae_pretrain")


def pretrain_value(ckpt_path: Path, pretrain: dict, key: str):
    if pretrain.get(key) is None:
        raise missing_pretrain_value(ckpt_path, key)
    return pretrain[key]


def normalisation(ds: Dataset, pretrain: dict, ckpt_path: Path, notes: list[str]) -> tuple[list, list, dict]:
    """``(schemes, use_mask_for_norm, intensity properties)`` with the pretraining's normalisation where sensible.

    Dataset channel c is compared with pretraining channel c (or 0 for a 1-channel checkpoint): when both use the
    same nnU-Net scheme, the pretraining's mask rule and (CT) intensity properties are taken; a different scheme
    means another modality, whose intensities the pretraining statistics do not describe, so the dataset's stays.
    A checkpoint read from nnssl, whose pretraining Z-scores every modality, gives its schemes to every channel.
    """
    schemes = list(ds.base_cfg["normalization_schemes"])
    masks = list(ds.base_cfg["use_mask_for_norm"])
    props = json.loads(json.dumps(ds.base["foreground_intensity_properties_per_channel"]))
    pre_schemes = pretrain_value(ckpt_path, pretrain, "normalization_schemes")
    pre_masks = pretrain_value(ckpt_path, pretrain, "use_mask_for_norm")
    pre_props = pretrain_value(ckpt_path, pretrain, "foreground_intensity_properties_per_channel")
    if pretrain.get("source") == "nnssl":  # nnssl normalises every channel of every modality alike (Z-score)
        schemes = [pre_schemes[c if len(pre_schemes) == ds.num_channels else 0] for c in range(ds.num_channels)]
        masks = [bool(pre_masks[c if len(pre_masks) == ds.num_channels else 0]) for c in range(ds.num_channels)]
        notes.append(f"normalisation {', '.join(sorted(set(schemes)))} on every channel, as the nnssl pretraining "
                     "(and nnU-Net master's nnUNetv2_preprocess_like_nnssl) normalise")
        return schemes, masks, props
    for c in range(ds.num_channels):
        p = c if len(pre_schemes) == ds.num_channels else 0
        if schemes[c] != pre_schemes[p]:
            notes.append(f"channel {c}: the dataset uses {schemes[c]}, the pretraining {pre_schemes[p]} "
                         f"(another modality): kept the dataset's normalisation for it")
            continue
        masks[c] = bool(pre_masks[p])
        if schemes[c] == CT:
            props[str(c)] = dict(pre_props[str(p)])
    return schemes, masks, props


def data_key(plans: dict, cfg: dict) -> dict:
    """What the preprocessed data depends on (intensity properties only matter for CT normalisation)."""
    ct = [str(c) for c, s in enumerate(cfg["normalization_schemes"]) if s == CT]
    return {"transpose_forward": list(plans["transpose_forward"]), "reader": plans["image_reader_writer"],
            "intensity": {c: plans["foreground_intensity_properties_per_channel"][c] for c in ct},
            **{k: cfg.get(k) for k in DATA_KEYS}}


def same(a, b) -> bool:
    """Equal as JSON data, floats up to rounding."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def holds_all_cases(folder: Path, num_cases: int) -> bool:
    """nnU-Net writes a case's ``.pkl`` last, so one per case means the folder was completed."""
    return folder.is_dir() and len(list(folder.glob("*.pkl"))) == num_cases


def other_plans_using(folder: Path, name: str) -> dict[str, str]:
    """``data_identifier -> plans file`` for every plans file in the dataset folder except ``name``."""
    used = {}
    for path in sorted(folder.glob("*.json")):
        if path.stem == name or path.name.startswith("."):
            continue
        try:
            plans = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(plans, dict) and isinstance(plans.get("configurations"), dict):
            for cfg in plans["configurations"].values():
                if isinstance(cfg, dict) and "data_identifier" in cfg:
                    used.setdefault(cfg["data_identifier"], path.name)
    return used


def existing_own_plans(ds: Dataset, name: str, base_name: str) -> dict | None:
    """The plans file this run replaces, refusing to replace one that another tool wrote."""
    path = ds.folder / f"{name}.json"
    if name == base_name:
        raise UserError(f"-o {name} would overwrite the base plans: choose another name")
    if not path.is_file():
        return None
    try:
        plans = json.loads(path.read_text())
    except (OSError, ValueError):
        plans = {}
    if not isinstance(plans, dict) or "pretrain_info" not in plans:
        raise UserError(f"{path} exists and was not written by nnUNetv2_hiendmae_plan: choose another -o")
    return plans


def pretrained_source(path_arg: str, arch: str | None, ds: Dataset, notes: list[str]) -> Source:
    from nnunetv2_hiendmae.weights import verify_checkpoint

    path = Path(path_arg).expanduser().resolve()
    ckpt = verify_checkpoint(path, None)
    ckpt_arch = ckpt["encoder"].get("arch")
    if arch and arch != ckpt_arch:
        raise UserError(f"--arch {arch} but checkpoint {path} holds a {ckpt_arch} encoder: drop --arch")
    channels = int(ckpt["encoder"]["in_channels"])
    if channels not in (1, ds.num_channels):
        raise UserError(f"checkpoint {path} was pretrained on {channels} channels, the dataset has "
                        f"{ds.num_channels}: only equal counts or a 1-channel checkpoint can be adapted")
    if channels != ds.num_channels:
        notes.append(f"1-channel encoder stem repeated over the dataset's {ds.num_channels} channels")
    pretrain = ckpt["pretrain"]
    from nnunetv2_hiendmae.nnssl import preprocessing_note

    read_from_nnssl = preprocessing_note(pretrain)
    if read_from_nnssl:
        notes.append(read_from_nnssl)
    pre_tf = [int(a) for a in pretrain.get("transpose_forward") or range(3)]
    recorded = pretrain.get("patch_size")  # needed only without --patch-size (build_plan)
    patch = to_dataset_axes(recorded, pre_tf, ds.base["transpose_forward"]) if recorded is not None else None
    from nnunetv2_hiendmae.checkpoint import encoder_fingerprint

    info = {"checkpoint": str(path), "encoder_sha256": encoder_fingerprint(ckpt), "arch": ckpt_arch,
            "method": ckpt.get("method")}
    return Source(plans_encoder_config(ckpt["encoder"]), info, pretrain, path, pre_tf,
                  [int(c) for c in patch] if patch is not None else None)


def plans_encoder_config(encoder: dict) -> dict:
    """The encoder configuration the plans store: the checkpoint's or the preset's, without ``in_channels``, which the
    network takes from nnU-Net (its ``input_channels``: the dataset's channel count)."""
    return {k: v for k, v in encoder.items() if k != "in_channels"}


def network_architecture(encoder: dict) -> dict:
    """The plans' ``architecture`` entry: the fine-tuning network of the encoder's kind (the ViT's UNETR, or
    dynamic-network-architectures' Primus) and its arguments."""
    network = ENCODERS[encoder_kind(encoder)]
    return {"network_class_name": network["network"], "arch_kwargs": {"encoder": encoder, **network["network_kwargs"]},
            "_kw_requires_import": []}


def scratch_source(arch: str, ds: Dataset) -> Source:
    encoder = plans_encoder_config(encoder_config(arch))
    return Source(encoder, {"checkpoint": None, "encoder_sha256": None, "arch": arch, "method": "scratch"})


def data_source(ds: Dataset, name: str, plans: dict, previous: dict | None) -> str:
    """Set the plans' data_identifier; say whether its data is shared, already there, or must be preprocessed."""
    cfg = plans["configurations"][CONFIGURATION]
    key = data_key(plans, cfg)
    base_id = ds.base_cfg["data_identifier"]
    if same(key, data_key(ds.base, ds.base_cfg)) and holds_all_cases(ds.folder / base_id, ds.num_cases):
        cfg["data_identifier"] = base_id
        return "reuse"
    cfg["data_identifier"] = identifier = f"{name}_{CONFIGURATION}"
    users = other_plans_using(ds.folder, name)
    if identifier in users:
        raise UserError(f"data folder {identifier} belongs to {users[identifier]}: choose another -o")
    prev_cfg = (previous or {}).get("configurations", {}).get(CONFIGURATION, {})
    if (prev_cfg.get("data_identifier") == identifier and same(data_key(previous, prev_cfg), key)
            and holds_all_cases(ds.folder / identifier, ds.num_cases)):
        return "present"
    raw = os.environ.get("nnUNet_raw")
    if not raw or not (Path(raw) / ds.folder.name).is_dir():
        raise UserError(f"the new spacing/normalisation needs preprocessing from the raw images, but "
                        f"{ds.folder.name} is not in nnUNet_raw ({raw or 'unset'})")
    return "preprocess"


def build_plan(args: argparse.Namespace) -> Plan:
    """Validate everything and compute the plans; writes nothing."""
    if not args.pretrained and not args.arch:
        raise UserError("give -pt CHECKPOINT (fine-tune a pretrained encoder) or --arch ARCH (from-scratch ViT)")
    if not args.pretrained and "pretrain" in (args.spacing, args.normalization):
        raise UserError("--spacing/--normalization pretrain need a pretrained checkpoint (-pt)")
    if args.num_processes < 1:
        raise UserError(f"-np must be at least 1, got {args.num_processes}")
    ds = find_dataset(args.dataset, args.base)
    name = args.output or (DEFAULT_NAME if args.pretrained else f"{DEFAULT_NAME}_scratch_{args.arch}")
    if not name or os.sep in name or name.endswith(".json") or name.startswith("."):
        raise UserError(f"-o must be a plans name (the file stem, as for -p), got {name!r}")
    previous = existing_own_plans(ds, name, args.base)
    notes: list[str] = []
    src = pretrained_source(args.pretrained, args.arch, ds, notes) if args.pretrained else scratch_source(args.arch, ds)
    spacing_mode = args.spacing or ("pretrain" if args.pretrained else "dataset")
    norm_mode = args.normalization or ("pretrain" if args.pretrained else "dataset")
    tf = list(ds.base["transpose_forward"])

    if spacing_mode == "pretrain":
        spacing = to_dataset_axes(pretrain_value(src.checkpoint, src.pretrain, "spacing"), src.transpose_forward, tf)
        spacing = [float(s) for s in spacing]
        median = median_shape(ds.fingerprint, spacing, tf)
    else:
        spacing, median = list(ds.base_cfg["spacing"]), list(ds.base_cfg["median_image_size_in_voxels"])
    if norm_mode == "pretrain":
        schemes, masks, props = normalisation(ds, src.pretrain, src.checkpoint, notes)
    else:
        schemes, masks = ds.base_cfg["normalization_schemes"], ds.base_cfg["use_mask_for_norm"]
        props = ds.base["foreground_intensity_properties_per_channel"]

    token = list(token_size_3d(src.encoder["token_size"]))  # applied to this dataset's (transposed) axes as it is
    if args.patch_size:
        patch = check_patch(args.patch_size, token)
    elif src.patch_size is None:
        raise missing_pretrain_value(src.checkpoint, "patch_size")
    else:
        patch = default_patch(median, token, src.patch_size)
    if src.encoder.get("pos_embed") == "learned" and src.patch_size and patch != src.patch_size:
        notes.append(f"patch size {patch} differs from the pretraining patch size {src.patch_size}: the learned "
                     f"position embedding is interpolated onto the patch's token grid")

    cfg = {k: v for k, v in ds.base_cfg.items() if k not in ("inherits_from", "previous_stage", "next_stage")}
    cfg.update(batch_size=BATCH_SIZE, patch_size=patch, median_image_size_in_voxels=median, spacing=spacing,
               normalization_schemes=list(schemes), use_mask_for_norm=list(masks),
               architecture=network_architecture(src.encoder))
    info = {**src.info, "spacing": spacing_mode, "normalization": norm_mode, "notes": notes}
    plans = {**ds.base, "plans_name": name, "experiment_planner_used": f"nnUNetv2_hiendmae_plan (from {args.base})",
             "foreground_intensity_properties_per_channel": props, "configurations": {CONFIGURATION: cfg},
             "pretrain_info": info}
    plans = json.loads(json.dumps(plans))  # plain JSON values, compared as they will be read back
    data = data_source(ds, name, plans, previous)
    warnings = []
    if args.pretrained:  # last: it may read the dataset's raw images (docs/finetuning.md, leakage guard)
        from nnunetv2_hiendmae.leakage import check_checkpoint

        warnings, leak_notes = check_checkpoint(src.pretrain, ds.folder.name, args.strict, args.num_processes)
        notes += leak_notes
    return Plan(ds, name, plans, data, notes, warnings)


def preprocess(plan: Plan, num_processes: int) -> None:
    """Run nnU-Net's preprocessing from a hidden copy of the plans, so that no plans file points at the data
    while it is being written (the final file is written only afterwards)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    folder = plan.dataset.folder
    (folder / f"{plan.name}.json").unlink(missing_ok=True)  # stale: its data folder is about to be rewritten
    staging = f".{plan.name}.preprocessing"
    path = folder / f"{staging}.json"
    atomic_write_json(path, plan.plans)
    try:
        preprocess_dataset(plan.dataset.id, plans_identifier=staging, configurations=(CONFIGURATION,),
                           num_processes=(num_processes,))
    finally:
        path.unlink(missing_ok=True)


def next_steps(plan: Plan) -> str:
    dataset_id = plan.dataset.id
    pretrained = plan.plans["pretrain_info"]["checkpoint"] is not None
    trainer = "nnUNetTrainerHiEndMAE" if pretrained else "nnUNetTrainerHiEndMAE_scratch"
    lines = ["Next:", f"  {EXPORT_LINE}",
             f"  nnUNetv2_train {dataset_id} {CONFIGURATION} FOLD -tr {trainer} -p {plan.name}",
             f"  nnUNetv2_predict -i INPUT_FOLDER -o OUTPUT_FOLDER -d {dataset_id} -c {CONFIGURATION} "
             f"-tr {trainer} -p {plan.name} -f 0"]
    if pretrained:
        lines.append(f"  (same plans, random init for comparison: -tr nnUNetTrainerHiEndMAE_scratch -p {plan.name})")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="nnUNetv2_hiendmae_plan",
        description="Write nnU-Net plans ($nnUNet_preprocessed/DatasetXXX/<name>.json) that fine-tune a pretrained "
                    "Hi-End-MAE ViT encoder (-pt) or train the same ViT from scratch (--arch), derived from the "
                    "dataset's own plans. Preprocesses the data again only when spacing or normalisation change.")
    p.add_argument("-d", dest="dataset", required=True, help="dataset ID or DatasetXXX_Name (must be planned and "
                   "preprocessed by nnUNetv2_plan_and_preprocess)")
    p.add_argument("-pt", dest="pretrained", metavar="CHECKPOINT",
                   help="pretraining checkpoint (nnUNetv2_hiendmae_pretrain or nnUNetv2_hiendmae_import output, or an "
                        "nnssl Primus checkpoint)")
    p.add_argument("--arch", choices=sorted(PRESETS), help="without -pt: the ViT preset of a from-scratch baseline "
                   "(sin-cos position embedding); with -pt: must match the checkpoint's encoder")
    p.add_argument("-pl_base", dest="base", default="nnUNetPlans", help="plans to derive from (default: %(default)s)")
    p.add_argument("-o", dest="output", help=f"name of the new plans, used as -p later (default: {DEFAULT_NAME}, or "
                   f"{DEFAULT_NAME}_scratch_ARCH without -pt)")
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="patch size in nnU-Net's (transposed) axis order, a multiple of the token size on every "
                        "axis (default: the pretraining crop, or 96^3 from scratch, shrunk per axis to the "
                        "dataset's median image size rounded up to whole tokens)")
    p.add_argument("--spacing", choices=("pretrain", "dataset"),
                   help="target spacing: the checkpoint's pretraining spacing (default with -pt) or the base "
                        "plans' (default without -pt)")
    p.add_argument("--normalization", choices=("pretrain", "dataset"),
                   help="intensity normalisation: the pretraining's schemes, masks and CT intensity statistics "
                        "(default with -pt; per channel, only where the dataset uses the same scheme) or the "
                        "base plans' (default without -pt)")
    p.add_argument("-np", dest="num_processes", type=int, default=NUM_PROCESSES,
                   help="processes for preprocessing, if it is needed, and for reading the dataset's raw images for "
                        "the leakage guard (default: %(default)s)")
    p.add_argument("--strict", action="store_true",
                   help="leakage guard: fail, writing nothing, if the pretraining saw validation cases of a fold (or "
                        "imagesTs cases) of the dataset, compared by content with the checkpoint's case "
                        "fingerprints (default: a warning that names them)")
    return p


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    plan = build_plan(args)
    cfg = plan.plans["configurations"][CONFIGURATION]
    for note in plan.notes:
        print(f"note: {note}")
    for line in plan.warnings:
        print(f"warning: {line}", file=sys.stderr)
    if plan.data == "preprocess":
        print(f"Preprocessing {plan.plans['dataset_name']} into {cfg['data_identifier']} (spacing {cfg['spacing']})")
        preprocess(plan, args.num_processes)
    path = plan.dataset.folder / f"{plan.name}.json"
    atomic_write_json(path, plan.plans)
    data = {"reuse": "shared with the base plans", "present": "already preprocessed",
            "preprocess": "preprocessed now"}[plan.data]
    print(f"Wrote {path}\n  {CONFIGURATION}: patch {cfg['patch_size']}, batch {cfg['batch_size']}, spacing "
          f"{[round(s, 4) for s in cfg['spacing']]}, normalisation {cfg['normalization_schemes']}, data "
          f"'{cfg['data_identifier']}' ({data})")
    print(next_steps(plan))
