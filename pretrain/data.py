"""Pretraining data: random crops ("views") from the nnU-Net-preprocessed cases of one or several datasets.

Cases are read from ``$nnUNet_preprocessed/<Dataset>/<data_identifier>/`` through nnU-Net's own dataset class
(``infer_dataset_class`` + ``load_case``; blosc2 memory-mapped), read-only: nothing is ever written there, and a
``fold`` reproduces nnU-Net's split in memory when ``splits_final.json`` is absent. Only the crop region is
decompressed. Crops are in the preprocessed (``transpose_forward``) axis order, like nnU-Net's ``patch_size``.

Crop centres follow the reference's ``RandCropByPosNegLabeld(pos=6, neg=2)``: with probability ``body_prob`` (0.75)
the centre is a *body* voxel, otherwise a uniform voxel (the reference draws "neg" centres from the background; a
uniform centre wastes fewer crops on air). The reference's "voxel > 0" rule assumed CT scaled from [-175, 250] HU to
[0, 1]; it does not hold for nnU-Net's z-scored intensities, so a voxel is **body** when any channel says so:

* ``CTNormalization`` channel: value > norm(max(-500 HU, percentile_00_5)) + 1e-3, where ``norm`` is the plans'
  ``(hu - mean) / std``. Air, and anything clipped to nnU-Net's lower percentile, is not body.
* channel normalised with ``use_mask_for_norm`` (other schemes): nnU-Net's nonzero mask, ``seg >= 0``; nnU-Net already
  treated it as the foreground when normalising and set everything outside it to 0.
* any other scheme (per-image z-score, MRI, ...): value > q05 + 0.2 * (q95 - q05) of 64 random voxels of the case
  (estimated once per case and worker), i.e. clearly above the case's background level.

A case that carries body locations in its properties (``body_locations``, written by
``nnUNetv2_hiendmae_preprocess_unlabeled``) gets its body centres drawn from them, at no read cost. Otherwise centres
are drawn by rejection sampling: up to ``max_tries`` uniform candidates, each judged from one voxel, then the last
candidate is kept. A crop that would leave the volume is shifted inside it; an axis shorter than the crop is padded,
with the channel's background value (the CT clip floor, 0 outside the nonzero mask, else the crop's minimum).

What a method needs from a case are its *views* (``{name: (count, size)}``, e.g. 8 crops of the patch size, or 2
global + 6 local views): each view gets its own centre. The loader workers only read; augmentation runs batch-wise
on the training device (:mod:`pretrain.augment`).

Determinism and DDP: item ``i`` of epoch ``e`` on rank ``r`` uses only ``np.random.default_rng([seed, e, r, i])``,
so the data do not depend on worker count or assignment and a resumed run reproduces them. Items are addressed by
``e * items_per_epoch + i`` (:class:`RunSampler`), so one loader streams the whole run: its workers never stop at an
epoch's end, and the first batches of an epoch are as ready as any other. Each DDP rank builds its own
:class:`PretrainCrops` with its ``rank``; ranks therefore draw different items.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.crossval_split import generate_crossval_split
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch.utils.data import DataLoader, Dataset, Sampler

from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.nnunet_paths import dataset_id as nnunet_dataset_id
from nnunetv2_hiendmae.nnunet_paths import dataset_name, nnunet_folder

CT_BODY_MIN_HU = -500.0
BODY_EPS = 1e-3
N_BACKGROUND_SAMPLES = 64


@dataclass
class PretrainSource:
    """One preprocessed dataset to pretrain on: where its cases are and how they were preprocessed."""

    dataset_name: str
    folder: str  # the configuration's data_identifier folder
    identifiers: list[str]
    plans: dict  # plans_name, transpose_forward, foreground_intensity_properties_per_channel
    configuration: dict  # the resolved configuration (inheritance applied)
    channel_names: dict
    fold: int | None


def fold_split(base: str, identifiers: list[str], fold: int) -> tuple[list[str], list[str]]:
    """Training and validation cases of nnU-Net fold ``fold`` of the dataset in ``base``, each sorted: from its
    splits_final.json, else nnU-Net's default 5-fold split (``generate_crossval_split``, seed 12345) made in memory and
    never written. ``identifiers`` are the preprocessed cases; a split naming others is a :class:`UserError`."""
    splits_file = join(base, "splits_final.json")
    if isfile(splits_file):
        splits, origin = load_json(splits_file), splits_file
    elif len(identifiers) < 5:
        raise UserError(f"nnU-Net's default 5-fold split needs at least 5 cases, {base} has {len(identifiers)}: "
                        f"write a splits_final.json there")
    else:
        splits, origin = generate_crossval_split(sorted(identifiers), seed=12345, n_splits=5), "nnU-Net's default split"
    if not 0 <= fold < len(splits):
        raise UserError(f"fold {fold} is out of range: {origin} has folds 0-{len(splits) - 1}")
    train, val = (sorted(str(k) for k in splits[fold][part]) for part in ("train", "val"))
    missing = sorted(set(train + val) - set(identifiers))
    if missing:
        raise UserError(f"{splits_file} fold {fold} lists cases that are not preprocessed: {', '.join(missing[:5])}")
    return train, val


def _resolve_one(root: str, dataset: str, plans: str, configuration: str, fold: int | None) -> PretrainSource:
    """Find and check one dataset's plans, configuration and data folder."""
    name = dataset_name(dataset)
    dataset_id = nnunet_dataset_id(name)
    base = join(root, name)
    if not os.path.isdir(base):
        raise UserError(f"{base} not found; `nnUNetv2_plan_and_preprocess -d {dataset_id}` creates it")
    plans_file = join(base, f"{plans}.json")
    if not isfile(plans_file):
        raise UserError(f"plans file {plans_file} not found; `nnUNetv2_plan_and_preprocess -d {dataset_id}` creates "
                        f"nnUNetPlans (other plans names come from their own planner)")
    if not isfile(join(base, "dataset.json")):
        raise UserError(f"{join(base, 'dataset.json')} not found; `nnUNetv2_plan_and_preprocess -d {dataset_id}` "
                        f"creates it")
    manager = PlansManager(plans_file)
    if configuration not in manager.available_configurations:
        raise UserError(f"configuration {configuration!r} is not in {plans_file}; available: "
                        f"{', '.join(manager.available_configurations)}")
    config = manager.get_configuration(configuration).configuration
    folder = join(base, config["data_identifier"])
    create = f"`nnUNetv2_preprocess -d {dataset_id} -plans_name {plans} -c {configuration}` creates it"
    if not os.path.isdir(folder):
        raise UserError(f"preprocessed data folder {folder} not found; {create}")
    try:
        dataset_class = infer_dataset_class(folder)
    except (AssertionError, KeyError):
        raise UserError(f"preprocessed data folder {folder} is empty or holds mixed file types; {create}") from None
    identifiers = sorted(dataset_class.get_identifiers(folder))
    if not identifiers:
        raise UserError(f"preprocessed data folder {folder} has no cases; {create}")
    if fold is not None:
        identifiers = fold_split(base, identifiers, fold)[0]
    return PretrainSource(
        dataset_name=name, folder=folder, identifiers=identifiers,
        plans={"plans_name": plans, "transpose_forward": manager.transpose_forward,
               "foreground_intensity_properties_per_channel": manager.foreground_intensity_properties_per_channel},
        configuration=config, channel_names=load_json(join(base, "dataset.json"))["channel_names"], fold=fold)


def resolve_sources(datasets: list[str], plans: str = "nnUNetPlans", configuration: str = "3d_fullres",
                    fold: int | None = None) -> list[PretrainSource]:
    """Check every dataset up front so that a typo fails in one clear line before any training starts."""
    if not datasets:
        raise UserError("no dataset given")
    root = str(nnunet_folder("nnUNet_preprocessed"))
    sources = [_resolve_one(root, str(d), plans, configuration, fold) for d in datasets]
    counts = {s.dataset_name: len(s.channel_names) for s in sources}
    if len(set(counts.values())) > 1:
        raise UserError("datasets have different channel counts: "
                        + ", ".join(f"{n} has {c}" for n, c in counts.items()))
    return sources


def _dataset_metadata(s: PretrainSource, plans: str, configuration: str) -> dict:
    cfg = s.configuration
    return {
        "name": s.dataset_name, "plans": plans, "configuration": configuration,
        "data_identifier": cfg["data_identifier"], "num_cases": len(s.identifiers),
        "spacing": [float(x) for x in cfg["spacing"]],
        "normalization_schemes": list(cfg["normalization_schemes"]),
        "use_mask_for_norm": [bool(x) for x in cfg["use_mask_for_norm"]],
        "foreground_intensity_properties_per_channel": s.plans["foreground_intensity_properties_per_channel"],
        "channel_names": s.channel_names,
        "transpose_forward": [int(x) for x in s.plans["transpose_forward"]],
    }


def pretrain_metadata(sources: list[PretrainSource], plans: str, configuration: str) -> dict:
    """What the checkpoint records about the data, so fine-tuning can check it preprocesses the same way.

    Top-level values are the first dataset's; everything is plain JSON (survives ``torch.load(weights_only=True)``).
    """
    per_dataset = [_dataset_metadata(s, plans, configuration) for s in sources]
    first = per_dataset[0]
    meta = {
        "datasets": per_dataset, "plans": plans, "configuration": configuration,
        **{k: first[k] for k in ("spacing", "transpose_forward", "normalization_schemes", "use_mask_for_norm",
                                 "foreground_intensity_properties_per_channel", "channel_names")},
        "in_channels": len(first["channel_names"]), "fold": sources[0].fold,
    }
    return json.loads(json.dumps(meta))  # plain lists/dicts/floats/str only


def ct_body_threshold(props: dict) -> float:
    """Normalised value above which a ``CTNormalization`` voxel is body: max(-500 HU, the clip floor), plus eps."""
    return (max(CT_BODY_MIN_HU, props["percentile_00_5"]) - props["mean"]) / max(float(props["std"]), 1e-8) + BODY_EPS


def sampled_body_threshold(values: np.ndarray) -> np.ndarray:
    """Body threshold of a per-image normalised channel from sampled voxel values ``[N, C]``: clearly above the
    background level, ``q05 + 0.2 * (q95 - q05)`` per channel."""
    q05, q95 = np.percentile(values, [5, 95], axis=0)
    return q05 + 0.2 * (q95 - q05)


def _channel_rules(s: PretrainSource) -> tuple[list[str], list[float], list[float]]:
    """Per channel: how body is judged ('ct', 'mask', 'sample'), the CT body threshold and the CT clip floor."""
    kinds, thresholds, floors = [], [], []
    props = s.plans["foreground_intensity_properties_per_channel"]
    for c, scheme in enumerate(s.configuration["normalization_schemes"]):
        if scheme == "CTNormalization":
            p = props[str(c)]
            kinds.append("ct")
            thresholds.append(ct_body_threshold(p))
            floors.append((p["percentile_00_5"] - p["mean"]) / max(float(p["std"]), 1e-8))
        else:
            kinds.append("mask" if s.configuration["use_mask_for_norm"][c] else "sample")
            thresholds.append(math.nan)
            floors.append(math.nan)
    return kinds, thresholds, floors


class PretrainCrops(Dataset):
    """Item ``e * items_per_epoch + i``: the views of one random case, ``{name: [count, C, *size]}`` in ``dtype``.

    Only paths and lists are kept until first use, so the object pickles for spawn workers.
    """

    def __init__(self, sources: list[PretrainSource], views: dict[str, tuple[int, Sequence[int]]],
                 items_per_epoch: int = 250, seed: int = 0, rank: int = 0, world_size: int = 1,
                 body_prob: float = 0.75, max_tries: int = 32, dtype: str = "float32"):
        self.views = {name: (int(n), tuple(int(x) for x in size)) for name, (n, size) in views.items()}
        for name, (n, size) in self.views.items():
            if n < 1 or len(size) != 3 or min(size) <= 0:
                raise UserError(f"view {name!r}: need at least one view of 3 positive sizes, got {n} x {list(size)}")
        if min(items_per_epoch, max_tries) < 1:
            raise UserError("items per epoch and max tries must be at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.sources = sources
        self.items_per_epoch = items_per_epoch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.body_prob, self.max_tries, self.dtype = body_prob, max_tries, getattr(torch, dtype)
        self.cases = [(s, j) for s, src in enumerate(sources) for j in range(len(src.identifiers))]
        self.rules = [_channel_rules(src) for src in sources]
        self._datasets = None  # nnU-Net dataset objects, created lazily in each worker
        self._case_thresholds: dict = {}  # (source, case) -> per-channel body threshold for 'sample' channels

    def __getstate__(self):
        return {**self.__dict__, "_datasets": None, "_case_thresholds": {}}

    def __len__(self) -> int:
        return self.items_per_epoch

    def _nnunet_dataset(self, s: int):
        if self._datasets is None:
            self._datasets = [infer_dataset_class(src.folder)(src.folder, list(src.identifiers))
                              for src in self.sources]
        return self._datasets[s]

    def _pick(self, index: int) -> tuple[np.random.Generator, int, int]:
        """Item ``index``'s random stream, already advanced past the draw of its case ``(source, case index)``."""
        epoch, i = divmod(int(index), self.items_per_epoch)
        rng = np.random.default_rng([self.seed, epoch, self.rank, i])
        s, j = self.cases[rng.integers(len(self.cases))]
        return rng, s, j

    def case_name(self, index: int) -> str:
        """``DatasetXXX_Name/case`` that item ``index`` crops."""
        _, s, j = self._pick(index)
        return f"{self.sources[s].dataset_name}/{self.sources[s].identifiers[j]}"

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng, s, j = self._pick(index)
        data, seg, _, props = self._nnunet_dataset(s).load_case(self.sources[s].identifiers[j])
        thresholds = self._thresholds(s, j, data)
        body = props.get("body_locations")
        out = {}
        for name, (count, size) in self.views.items():
            crops = [self._crop(s, data, self._centre(rng, s, data, seg, thresholds, body), size) for _ in range(count)]
            out[name] = torch.from_numpy(np.stack(crops)).to(self.dtype)  # torch converts 2x faster than numpy
        return out

    def _thresholds(self, s: int, j: int, data) -> np.ndarray:
        """Per-channel body thresholds for this case ('sample' channels estimated once per case and worker)."""
        kinds, fixed, _ = self.rules[s]
        if "sample" not in kinds:
            return np.asarray(fixed)
        if (s, j) not in self._case_thresholds:
            rng = np.random.default_rng([s, j])  # a property of the case, not of the item
            points = rng.integers(0, data.shape[1:], size=(N_BACKGROUND_SAMPLES, 3))
            values = np.stack([data[:, int(x), int(y), int(z)] for x, y, z in points])  # [N, C]
            self._case_thresholds[s, j] = np.where([k == "sample" for k in kinds], sampled_body_threshold(values),
                                                   fixed)
        return self._case_thresholds[s, j]

    def _is_body(self, s: int, data, seg, thresholds: np.ndarray, point: tuple[int, int, int]) -> bool:
        kinds = self.rules[s][0]
        x, y, z = point
        if "mask" in kinds and seg[0, x, y, z] >= 0:
            return True
        judged = [k != "mask" for k in kinds]
        return any(judged) and bool(np.any(data[:, x, y, z][judged] > thresholds[judged]))

    def _centre(self, rng: np.random.Generator, s: int, data, seg, thresholds: np.ndarray,
                body: np.ndarray | None) -> tuple[int, int, int]:
        """A body voxel with probability ``body_prob`` (from the case's body locations if it has them, else by
        bounded rejection sampling), else a uniform voxel."""
        want_body = rng.random() < self.body_prob
        if want_body and body is not None and len(body):
            return tuple(int(v) for v in body[rng.integers(len(body))])
        for _ in range(self.max_tries if want_body else 1):
            point = tuple(int(v) for v in rng.integers(0, data.shape[1:]))
            if not want_body or self._is_body(s, data, seg, thresholds, point):
                break
        return point

    def _crop(self, s: int, data, centre: tuple[int, int, int], size: tuple[int, int, int]) -> np.ndarray:
        """Read only the region of ``size`` around ``centre`` (shifted inside the volume), padding short axes."""
        shape = data.shape[1:]
        starts = [int(np.clip(c - k // 2, min(0, n - k), max(0, n - k)))  # inside, or covering a short axis
                  for c, k, n in zip(centre, size, shape)]
        read = tuple(slice(max(a, 0), min(a + k, n)) for a, k, n in zip(starts, size, shape))
        region = np.asarray(data[(slice(None), *read)], dtype=np.float32)
        if region.shape[1:] == size:
            return region
        kinds, _, floors = self.rules[s]
        fill = [floors[c] if kinds[c] == "ct" else 0.0 if kinds[c] == "mask" else float(region[c].min())
                for c in range(region.shape[0])]
        out = np.empty((region.shape[0], *size), dtype=np.float32)
        out[:] = np.asarray(fill, dtype=np.float32)[:, None, None, None]
        out[(slice(None), *(slice(r.start - a, r.stop - a) for r, a in zip(read, starts)))] = region
        return out


def transfer_dtype(device: torch.device, precision: str) -> str:
    """The dtype crops travel in from the loader workers to the device: float16 for a GPU in mixed precision (half
    the bytes to read, pin and copy; nnU-Net's normalised intensities keep three significant digits), else float32."""
    return "float16" if device.type == "cuda" and precision != "fp32" else "float32"


class RunSampler(Sampler):
    """Item indices from epoch ``start_epoch`` on, ``e * n + i``, without end: the run takes ``n / batch`` batches
    per epoch from one loader iterator."""

    def __init__(self, items_per_epoch: int, start_epoch: int = 0):
        self.items_per_epoch, self.start_epoch = items_per_epoch, start_epoch

    def __iter__(self):
        return itertools.count(self.start_epoch * self.items_per_epoch)


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random in a loader worker from torch's per-worker seed (the crops use their own RNG)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: PretrainCrops, batch_size: int, num_workers: int, device_type: str,
                start_epoch: int = 0) -> DataLoader:
    """Batches ``{name: [B, count, C, *size]}`` in item order (items are already random), from epoch ``start_epoch``
    on, without end; ``batch_size`` must divide the items per epoch, so that no batch spans two epochs. Batches are
    pinned for the copy to a GPU (:func:`device_batches`). The loader seeds its workers from a generator of its own,
    not from torch's global one, which drives the masks: a resumed run's masks continue the stream of the run it
    resumes."""
    if len(dataset) % batch_size:
        raise ValueError(f"batch size {batch_size} does not divide the {len(dataset)} items of an epoch")
    return DataLoader(dataset, batch_size=batch_size, sampler=RunSampler(len(dataset), start_epoch),
                      num_workers=num_workers, pin_memory=device_type == "cuda", drop_last=False,
                      prefetch_factor=4 if num_workers > 0 else None,
                      worker_init_fn=seed_worker if num_workers > 0 else None,
                      generator=torch.Generator().manual_seed(dataset.seed))


def device_batches(batches: Iterable[dict[str, torch.Tensor]],
                   device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's batches on ``device``, one batch ahead. On CUDA the copy of the next batch runs on a side stream
    while the current one is computed: a step's 24 x 8 crops of 96^3 in float16 are 340 MB, about 7 ms of PCIe 5,
    which on the compute stream would stall every step. Elsewhere a plain move."""
    if device.type != "cuda":
        yield from ({k: v.to(device) for k, v in b.items()} for b in batches)
        return
    copier = torch.cuda.Stream(device)

    def copy(batch: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        if batch is None:
            return None
        with torch.cuda.stream(copier):
            return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    source = iter(batches)
    ahead = copy(next(source, None))
    while ahead is not None:
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(copier)  # the step reads the batch only once it has arrived
        for v in ahead.values():
            v.record_stream(compute)  # and its memory is not reused before the step is done with it
        current, ahead = ahead, copy(next(source, None))
        yield current
