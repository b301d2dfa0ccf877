"""How a pretraining run is put together, one step a function, in the order :class:`~pretrain.train.PretrainRun` calls
them: where it runs (:func:`build_placement`), what it reads (:func:`build_data`), what tells whether it is working
(:func:`build_signals`, rank 0 only) and what it trains (:func:`build_model`).

Each step checks its own input before the next one reads anything, so a user mistake (an unknown dataset, a probe
dataset with another channel count, a broken case) is one line before any weights exist.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.leakage import pretraining_fingerprints
from nnunetv2_hiendmae.optim import param_groups
from nnunetv2_hiendmae.precision import resolve_precision, transfer_dtype
from nnunetv2_hiendmae.preprocessed import PreprocessedData
from nnunetv2_hiendmae.presets import PRESETS, encoder_config, token_size_3d
from pretrain import methods
from pretrain.config import PretrainConfig
from pretrain.data import (
    LoaderMemory,
    PretrainCrops,
    check_cases,
    loader_memory,
    normalisation_differences,
    pretrain_metadata,
    recorded_unreadable,
    resolve_sources,
)
from pretrain.heldout import HeldOutLoss, held_out_cases, held_out_count, split_off
from pretrain.methods.contract import PretrainingModel


# ---- where the run executes -----------------------------------------------------------------------------------------
@dataclass
class Placement:
    """This process's place in the run: its rank of ``world_size``, its device and the precision it computes in."""

    rank: int
    world_size: int
    device: torch.device
    precision: str  # fp32 | bf16 | fp16 (``auto`` resolved for the device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) under torchrun, (0, 0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def share_cpu_with_workers(num_workers: int) -> None:
    """On CPU, leave the loader workers their cores: oversubscribed intra-op threads spin-wait (measured 30x slower)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - num_workers))


def build_placement(cfg: PretrainConfig, planned_ranks: int | None = None) -> Placement:
    """Rank and device from torchrun's environment (joining the process group: NCCL on CUDA, else gloo, with
    ``--dist-timeout-minutes`` for its collectives), or rank 0 of ``planned_ranks`` without starting them
    (``--estimate``). Raises :class:`UserError` for ``--device cuda``
    without a GPU."""
    rank, local_rank, world_size = dist_info() if planned_ranks is None else (0, 0, planned_ranks)
    name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible; use --device cpu")
    device = torch.device(name, local_rank) if name == "cuda" else torch.device(name)
    if world_size > 1 and planned_ranks is None and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=cfg.dist_timeout_minutes))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    else:
        share_cpu_with_workers(cfg.num_workers)
    return Placement(rank, world_size, device, resolve_precision(device, cfg.precision))


# ---- what the run reads ---------------------------------------------------------------------------------------------
@dataclass
class RunData:
    """The run's cases and how they are read: training sources (held-out cases removed), held-out sources, the notes
    for the log, the pretraining metadata of the checkpoint, the iterations per epoch and this rank's crops."""

    sources: list[PreprocessedData]
    val_sources: list[PreprocessedData]
    val_cases: list[str]  # "DatasetXXX_Name/case", never in a training batch
    notes: list[str]
    meta: dict  # pretrain_metadata: datasets, spacing, normalisation, in_channels, ...
    num_cases: int  # training cases
    iters: int  # iterations per epoch
    views: dict  # {name: (count, size)}
    crops: PretrainCrops  # this rank's items
    dtype: str  # the dtype crops travel in (precision.transfer_dtype)
    loader_memory: LoaderMemory  # the loader's batches in flight, bounded by --loader-memory-gib
    probe_split: object | None  # nnunetv2_hiendmae.probe.ProbeSplit of --probe-dataset, checked


def probe_split(cfg: PretrainConfig, channels: int):
    """The probe dataset's fold, checked before anything is read: an unknown dataset, a fold it does not have, no
    labels or another channel count than the pretraining data's ``channels`` is one line (nothing written)."""
    from nnunetv2_hiendmae.probe import probe_split as split_of

    split = split_of(cfg.probe_dataset, cfg.probe_fold)
    if split.channels != channels:
        raise UserError(f"--probe-dataset {cfg.probe_dataset}: {split.dataset_name} has {split.channels} "
                        f"channel(s), the pretraining data {channels}")
    return split


def data_changes(before: list[dict], now: list[dict]) -> list[str]:
    """What differs between the training cases of each dataset when a resumed run last saved (its checkpoint's
    ``datasets`` record) and now, e.g. scans added to the pool."""
    old, new = ({d["name"]: d["num_cases"] for d in record} for record in (before, now))
    return [f"the data changed since the checkpoint: {name} has {new.get(name, 0)} training cases, "
            f"{old.get(name, 0)} when it was written; the run continues on the cases there are now"
            for name in sorted(old.keys() | new.keys()) if old.get(name) != new.get(name)]


def build_data(cfg: PretrainConfig, place: Placement, stored: dict) -> RunData:
    """Find the datasets, hold out ``--val-cases`` (those ``stored`` by the run a resume continues, else drawn with
    the run's seed), check every case (:func:`~pretrain.data.check_cases`) and lay out this rank's crops: an epoch
    is ``--iters-per-epoch`` or enough iterations for every training case once over all ranks. The notes say what
    was dropped, what was preprocessed differently and, on a resume, how the data changed since."""
    sources = resolve_sources(cfg.datasets, cfg.plans, cfg.configuration, cfg.fold)
    split = probe_split(cfg, len(sources[0].channel_names)) if cfg.probe_dataset is not None else None
    val_cases = stored["val_cases"] if "val_cases" in stored else held_out_cases(
        sources, held_out_count(cfg.val_cases, sum(len(s.identifiers) for s in sources)), cfg.seed)
    val_sources = split_off(sources, val_cases)
    progress = place.is_main and cfg.progress_bar
    broke = recorded_unreadable(cfg.output_dir)
    notes = check_cases(sources, cfg.skip_bad_cases, progress, broke=broke)
    notes += check_cases(val_sources, cfg.skip_bad_cases, progress, held_out=True, broke=broke)
    val_sources = [s for s in val_sources if s.identifiers]
    readable = {f"{s.dataset_name}/{case}" for s in val_sources for case in s.identifiers}
    val_cases = [case for case in val_cases if case in readable]
    notes += normalisation_differences(sources)
    meta = pretrain_metadata(sources, cfg.plans, cfg.configuration)
    notes += data_changes(stored["datasets"], meta["datasets"]) if "datasets" in stored else []
    num_cases = sum(len(s.identifiers) for s in sources)
    iters = cfg.iters_per_epoch or max(1, math.ceil(num_cases / (cfg.batch_size * place.world_size)))
    views = cfg.views()
    dtype = transfer_dtype(place.device, place.precision,
                           [scheme for s in sources for scheme in s.configuration["normalization_schemes"]])
    crops = PretrainCrops(sources, views, iters * cfg.batch_size, seed=cfg.seed, rank=place.rank,
                          world_size=place.world_size, dtype=dtype)
    memory = loader_memory(crops.batch_bytes(cfg.batch_size), cfg.num_workers, cfg.loader_memory_gib,
                           place.device.type == "cuda")
    return RunData(sources, val_sources, list(val_cases), notes, meta, num_cases, iters, views, crops, dtype, memory,
                   split)


# ---- what tells whether it is working -------------------------------------------------------------------------------
@dataclass
class Signals:
    """The measures beside the training loss: the content fingerprints of every case read (for the leakage guard),
    and on rank 0 the held-out loss and the probe's data (None where not asked for, and on every other rank)."""

    held_out: HeldOutLoss | None = None
    probe: object | None = None  # nnunetv2_hiendmae.probe.ProbeData
    fingerprints: dict[str, str] | None = None
    probe_leakage: list[str] = field(default_factory=list)  # the guard's warnings on the probe's validation cases


def case_fingerprints(sources: list[PreprocessedData], processes: int, progress: bool = True,
                      known: dict[str, str] | None = None, rank: int = 0, world_size: int = 1) -> dict[str, str]:
    """``{"DatasetXXX_Name/case": content fingerprint}`` of every case the run reads (training and held out), for the
    leakage guard of ``nnUNetv2_hiendmae_plan`` (:mod:`nnunetv2_hiendmae.leakage`): those stored by the unlabelled
    preprocessing, else read from the dataset's images in ``$nnUNet_raw``; a dataset that has neither is left out.
    ``known``: the fingerprints a resumed run recorded; they are kept (the run trained on those cases) and only the
    cases they lack, such as scans added to the pool since, are looked up. With ``world_size`` ranks each looks up
    every ``world_size``-th of those from ``rank`` on and the process group gathers them (all ranks call it): reading
    1,000 raw scans on rank 0 alone outlasts a collective's timeout."""
    found = dict(known or {})
    for s in sources:
        missing = [case for case in s.identifiers if f"{s.dataset_name}/{case}" not in found][rank::world_size]
        own = (pretraining_fingerprints(s.dataset_name, missing, processes, progress) or {}) if missing else {}
        found.update({f"{s.dataset_name}/{case}": fp for case, fp in own.items()})
    if world_size == 1:
        return found
    shards: list = [None] * world_size
    dist.all_gather_object(shards, found)
    return {case: fp for shard in shards for case, fp in shard.items()}


def probe_leakage(cfg: PretrainConfig, split, fingerprints: dict[str, str] | None, meta: dict) -> list[str]:
    """The leakage guard on the probe's validation cases (:func:`~nnunetv2_hiendmae.leakage.check_checkpoint`, as
    for a checkpoint of this run): warning lines, kept for the log and ``checkpoint_best.pth``; with
    ``--probe-strict``, a :class:`UserError` before anything is written."""
    from nnunetv2_hiendmae.leakage import check_checkpoint

    record = {"case_fingerprints": fingerprints, "datasets": meta["datasets"], "fold": cfg.fold}
    try:
        warnings, _ = check_checkpoint(record, split.dataset_name, cfg.probe_strict, max(1, cfg.num_workers),
                                       scored_folds=[split.fold], progress=cfg.progress_bar)
    except UserError as e:
        raise UserError(f"--probe-dataset {cfg.probe_dataset}: {e}") from None
    return warnings


def build_signals(cfg: PretrainConfig, place: Placement, data: RunData, stored: dict) -> Signals:
    """The fingerprints, on every rank (those ``stored`` by the run a resume continues kept, the others looked up,
    shared by the ranks); on rank 0 the held-out views (cut once), the probe's fixed crops at the run's patch size in
    the probe dataset's axis order and the leakage guard's warnings on the probe's validation cases."""
    shared = dist.is_initialized()
    # the slowest step, first; a resumed run reads only the cases its checkpoint lacks (scans added since)
    fingerprints = case_fingerprints([*data.sources, *data.val_sources], max(1, cfg.num_workers),
                                     place.is_main and cfg.progress_bar, stored.get("case_fingerprints"),
                                     place.rank if shared else 0, place.world_size if shared else 1)
    if not place.is_main:
        return Signals(fingerprints=fingerprints)
    held_out = HeldOutLoss(data.val_sources, data.views, cfg.seed, data.dtype) if data.val_cases else None
    probe, split = None, data.probe_split
    if split is not None:
        from nnunetv2_hiendmae.plans import to_dataset_axes
        from nnunetv2_hiendmae.probe import load_probe_data

        patch = to_dataset_axes(cfg.patch_size, data.sources[0].plans["transpose_forward"], split.transpose_forward)
        probe = load_probe_data(split.dataset_name, split.fold, patch, seed=cfg.seed)
    leakage = probe_leakage(cfg, split, fingerprints, data.meta) if probe is not None else []
    return Signals(held_out, probe, fingerprints, leakage)


# ---- what it trains -------------------------------------------------------------------------------------------------
class Model(NamedTuple):
    """The method's model (same initial weights on every rank), its DDP wrapper and compiled form, AdamW over the
    groups the model declares, and the loss scaler of fp16."""

    encoder_cfg: dict
    model: PretrainingModel
    ddp: torch.nn.Module  # DistributedDataParallel(model) when ranks run together, else model
    compiled: torch.nn.Module  # torch.compile(ddp) with --compile (default on CUDA), else ddp
    optimizer: torch.optim.AdamW
    scaler: torch.amp.GradScaler | None


def build_model(cfg: PretrainConfig, place: Placement, in_channels: int) -> Model:
    """The model from ``--seed`` (so every rank starts from the same weights), then torch's generator reseeded per
    rank (so every rank draws its own masks)."""
    token = token_size_3d(PRESETS[cfg.arch]["token_size"])
    grid = [s // t for s, t in zip(cfg.patch_size, token)] if cfg.pos_embed == "learned" else None
    encoder_cfg = encoder_config(cfg.arch, in_channels, cfg.pos_embed, grid)
    torch.manual_seed(cfg.seed)
    model = methods.model_class(cfg.method)(encoder_cfg, cfg.method_settings).to(place.device)
    ddp = (DistributedDataParallel(model, device_ids=[place.device] if place.device.type == "cuda" else None)
           if dist.is_initialized() else model)
    compile_ = cfg.compile if cfg.compile is not None else place.device.type == "cuda"
    compiled = torch.compile(ddp) if compile_ else ddp
    torch.manual_seed(cfg.seed + place.rank)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.recipe().betas,
                                  fused=place.device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda") if place.precision == "fp16" else None
    return Model(encoder_cfg, model, ddp, compiled, optimizer, scaler)
