"""The linear segmentation probe: how well a frozen encoder's token features separate a labelled dataset's classes.

The probe of the SSL literature for segmentation (e.g. DINOv2, Oquab et al. 2023, "linear" evaluation): one linear
layer on the frozen encoder's patch tokens, its logits upsampled to the voxels; here in 3D, on an nnU-Net-preprocessed
dataset, with nnU-Net's split and Dice convention:

* **Data** (:func:`load_probe_data`, once): fold F's split (``splits_final.json``, else nnU-Net's default split made
  in memory, :func:`nnunetv2_hiendmae.preprocessed.fold_split`). From at most ``max_cases`` of its training cases,
  ``crops_per_case`` fixed, seeded crops of the patch size (every other one centred on a foreground voxel of a class
  drawn uniformly from nnU-Net's ``class_locations``, so that small structures are in the fit; the others anywhere),
  and from them at most ``points_per_class`` voxels per class, drawn class by class. At most ``max_cases`` of its
  validation cases, whole, with the tiles of nnU-Net's sliding window at step 1 (the fewest tiles of the patch size
  that cover a case; a case smaller than the patch is padded with 0, as nnU-Net's predictor does). Everything is
  read through nnU-Net's own dataset class and kept in memory (as float32).
* **Fit** (:func:`probe_score`): the encoder's final normed tokens (CLS dropped) on every fit crop, trilinearly
  interpolated at the drawn voxels (exactly the values that upsampling the token grid gives there), standardised
  over the fit set; a softmax regression (bias, weight decay ``1e-3`` on the standardised features) fitted with a
  fixed budget of full-batch L-BFGS iterations (strong Wolfe line search) to the voxels' classes, every class
  weighted equally (each class's voxels share a weight of ``1 / classes``).
* **Score**: the validation tiles through the encoder and the fitted layer, logits upsampled trilinearly to the patch,
  argmax (where tiles overlap, the later tile's prediction is kept), Dice per foreground class per case in the
  preprocessed voxel space (nnU-Net's convention: NaN when reference and prediction are both empty; NaN is left out
  of every mean), averaged over cases per class; the score is the mean over classes (nnU-Net's mean foreground Dice).

Why these choices. The loss is on voxels, as the score is, not on the tokens' class fractions: the layer is fitted to
what is evaluated (its upsampled logits), and upsampling being linear, a voxel's logits are the layer applied to the
interpolated features. Classes are weighted equally because the score weights them equally: fitted to the voxels'
natural frequencies, the layer predicts background wherever a class is rarer than background in a token's
neighbourhood, which on organs about one token wide (this package's synthetic test data) is everywhere, and every
encoder then scores 0. L-BFGS with a fixed iteration budget is deterministic and needs no learning rate, batch order
or seed; on a GPU the fit (about 60 k voxels x 768 features for ViT-B) takes a fraction of a second. No global random
state is read or changed (crops and voxels are drawn with numpy generators of their own when the data are loaded; the
probe runs inside ``torch.random.fork_rng``), and the encoder's train/eval flags are restored, so a pretraining run
that calls :func:`probe_score` every N epochs stays bit-exact when resumed. It does no collective: under DDP call it
on one rank.

A linear probe scores what the frozen features expose linearly at token resolution: it ranks encoders and checkpoints
(a checkpoint must beat ``random:ARCH``, the same encoder at its initial weights), it is not the Dice of a fine-tuned
network. See docs/probe.md.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np
import torch
import torch.nn.functional as F
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from torch import nn
from tqdm import tqdm

from nnunetv2_hiendmae.checkpoint import encoder_state_dict, load_checkpoint
from nnunetv2_hiendmae.compare import mean_std
from nnunetv2_hiendmae.encoders import Encoder, build_encoder
from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.nnunet_paths import crossval_folds, nnunet_folder
from nnunetv2_hiendmae.plans import check_patch, default_patch, to_dataset_axes
from nnunetv2_hiendmae.precision import autocast
from nnunetv2_hiendmae.preprocessed import find_preprocessed, fold_split
from nnunetv2_hiendmae.presets import (
    PRESETS,
    PROBE_CROPS_PER_CASE,
    PROBE_MAX_CASES,
    PROBE_SEED,
    REFERENCE_PATCH,
    encoder_config_for_patch,
)
from nnunetv2_hiendmae.resenc import RANDOM_CNNS, initialize, resenc_config
from nnunetv2_hiendmae.vit import tokens_to_volume

RANDOM_PREFIX = "random:"
RANDOM_ARCHS = [*PRESETS, *RANDOM_CNNS]  # random:ARCH: a ViT preset, or nnssl's ResEnc-L (resenc_l)
POINTS_PER_CLASS = 4096
LBFGS_STEPS = 100
WEIGHT_DECAY = 1e-3
NOT_SCORED = -1  # class index of voxels that are neither fitted nor scored: padding and nnU-Net's ignore label

Grid = tuple[int, int, int]


# ------------------------------------------------------------------------------------------------------------- data


@dataclass
class ProbeSplit:
    """A labelled preprocessed dataset and fold F's split, checked; what the probe needs before reading any case."""

    dataset_name: str
    fold: int
    plans: str
    configuration: str
    folder: str  # the configuration's preprocessed data folder
    train_cases: list[str]  # fold F's training cases (the fit draws from these only)
    val_cases: list[str]  # fold F's validation cases
    labels: dict[int, str]  # foreground label value -> name (dataset.json), in class order 1..K
    ignore_label: int | None
    channels: int
    transpose_forward: list[int]
    median_shape: list[float]  # the configuration's median image size in voxels (transposed axis order)
    split_source: str  # the splits_final.json the fold comes from, or nnU-Net's default split


@dataclass
class ValCase:
    """One validation case ready for the sliding window."""

    identifier: str
    image: torch.Tensor  # [C, *padded] float32, at least the patch size on every axis
    classes: torch.Tensor  # [*shape] int16 class index (0 background, 1..K the labels, NOT_SCORED ignored)
    region: tuple[slice, ...]  # the case inside ``image``'s spatial axes
    tiles: list[Grid]  # start of every tile of the patch size in ``image``


@dataclass
class ProbeData:
    """Everything :func:`probe_score` reads, fixed once (:func:`load_probe_data`); crops and voxels are in the
    preprocessed (``transpose_forward``) axis order, like nnU-Net's patch size."""

    split: ProbeSplit
    patch_size: Grid
    seed: int
    fit_crops: list[tuple[str, Grid]]  # (case, start of the crop in the case's voxels; negative where padded)
    fit_images: torch.Tensor  # [N, C, *patch_size] float32
    points: torch.Tensor  # [S, 4] int64: fit crop index, then the voxel inside it; sorted by crop
    point_classes: torch.Tensor  # [S] int64 class index
    point_weights: torch.Tensor  # [S] float32: each class present sums to 1 / (classes present)
    val: list[ValCase]

    @property
    def fit_cases(self) -> list[str]:
        """The training cases the fit crops come from, sorted."""
        return sorted({case for case, _ in self.fit_crops})

    @property
    def val_cases(self) -> list[str]:
        """The validation cases that are scored."""
        return [c.identifier for c in self.val]

    @property
    def num_windows(self) -> int:
        """Encoder inputs of the patch size one probe runs: fit crops plus validation tiles."""
        return len(self.fit_crops) + sum(len(c.tiles) for c in self.val)


def probe_split(dataset: str | int, fold: int, plans: str = "nnUNetPlans",
                configuration: str = "3d_fullres") -> ProbeSplit:
    """Resolve a labelled nnU-Net-preprocessed dataset and fold ``fold``'s split (reads only JSON files).

    Raises :class:`UserError` for an unknown dataset, plans or configuration, a fold out of range, a split naming
    cases that are not preprocessed, or a dataset without foreground labels.
    """
    source = find_preprocessed(dataset, plans, configuration)
    base = join(str(nnunet_folder("nnUNet_preprocessed")), source.dataset_name)
    dataset_json, manager = source.dataset_json, source.plans_manager
    label_manager = manager.get_label_manager(dataset_json)
    ignore = label_manager.ignore_label
    foreground = [int(v) for v in label_manager.foreground_labels if v != ignore]
    if not foreground:
        raise UserError(f"{source.dataset_name} has no foreground labels in its dataset.json: the probe needs a "
                        f"labelled dataset")
    train, val = fold_split(base, source.identifiers, int(fold))
    names = {int(v): str(k) for k, v in dataset_json["labels"].items() if isinstance(v, int)}
    return ProbeSplit(
        dataset_name=source.dataset_name, fold=int(fold), plans=plans, configuration=configuration,
        folder=source.folder, train_cases=train, val_cases=val,
        labels={v: names.get(v, f"label {v}") for v in foreground}, ignore_label=ignore,
        channels=len(source.channel_names), transpose_forward=[int(a) for a in manager.transpose_forward],
        median_shape=[float(m) for m in source.configuration["median_image_size_in_voxels"]],
        split_source=crossval_folds(base)[1])


def _class_map(split: ProbeSplit, seg: np.ndarray) -> np.ndarray:
    """Label map ``[*shape]`` -> class index int16: 0 background (nnU-Net's -1 outside the nonzero mask too), 1..K the
    foreground labels, NOT_SCORED the ignore label."""
    out = np.zeros(seg.shape, dtype=np.int16)
    for k, value in enumerate(split.labels, start=1):
        out[seg == value] = k
    if split.ignore_label is not None:
        out[seg == split.ignore_label] = NOT_SCORED
    return out


def _padded(split: ProbeSplit, data, seg, patch: Grid) -> tuple[np.ndarray, np.ndarray, tuple[slice, ...]]:
    """A case's image ``[C, *padded]`` and class map ``[*padded]`` padded to at least ``patch`` (image with 0 as
    nnU-Net's predictor pads, classes with NOT_SCORED), and where the case lies in them."""
    image, slicer = pad_nd_image(np.asarray(data, dtype=np.float32), patch, "constant", {"constant_values": 0}, True)
    classes = pad_nd_image(_class_map(split, np.asarray(seg)[0]), patch, "constant",
                           {"constant_values": NOT_SCORED})
    return image, classes, tuple(slicer[1:])


def _subset(cases: list[str], max_cases: int, rng: np.random.Generator) -> list[str]:
    return cases if len(cases) <= max_cases else sorted(rng.choice(cases, max_cases, replace=False).tolist())


def _crop_start(rng: np.random.Generator, foreground: bool, locations: list[np.ndarray], offset: Sequence[int],
                shape: Sequence[int], patch: Grid) -> Grid:
    """Start of a crop inside a padded case: centred on a foreground voxel (of a class drawn uniformly) or anywhere."""
    if foreground and locations:
        voxels = locations[rng.integers(len(locations))]
        centre = voxels[rng.integers(len(voxels))][1:] + np.asarray(offset)
    else:
        centre = rng.integers(0, shape)
    return tuple(int(np.clip(c - p // 2, 0, n - p)) for c, p, n in zip(centre, patch, shape))  # type: ignore


def _sample_points(classes: np.ndarray, num_classes: int, per_class: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Up to ``per_class`` voxels of every class from the fit crops' class maps ``[N, *patch]``: ``(points [S, 4]
    sorted by crop, classes [S], weights [S])``, each class present weighing ``1 / classes present`` in all."""
    flat = classes.reshape(-1)
    chosen = [np.flatnonzero(flat == k) for k in range(num_classes + 1)]
    chosen = [np.sort(rng.choice(idx, min(per_class, len(idx)), replace=False)) for idx in chosen if len(idx)]
    index = np.concatenate(chosen)
    weights = np.concatenate([np.full(len(c), 1.0 / (len(c) * len(chosen))) for c in chosen])
    order = np.argsort(index, kind="stable")  # crop-major, so that each crop's voxels are contiguous
    index, weights = index[order], weights[order]
    points = np.stack(np.unravel_index(index, classes.shape), axis=1)
    return points, flat[index].astype(np.int64), weights.astype(np.float32)


def load_probe_data(dataset: str | int, fold: int, patch_size: Sequence[int], plans: str = "nnUNetPlans",
                    configuration: str = "3d_fullres", seed: int = PROBE_SEED,
                    crops_per_case: int = PROBE_CROPS_PER_CASE, max_cases: int = PROBE_MAX_CASES,
                    points_per_class: int = POINTS_PER_CLASS) -> ProbeData:
    """Read the probe's fixed fit crops and validation cases of fold ``fold`` (see the module docstring).

    ``patch_size``: 3 voxel counts in the preprocessed (transposed) axis order, a multiple of the encoder's token size.
    The same arguments give the same data. Memory: ``max_cases`` x ``crops_per_case`` crops plus ``max_cases``
    whole validation cases, float32. Raises :class:`UserError` as :func:`probe_split` does, or for a bad size/count.
    """
    patch: Grid = tuple(int(p) for p in patch_size)  # type: ignore[assignment]
    if len(patch) != 3 or min(patch) < 1 or min(crops_per_case, max_cases, points_per_class) < 1:
        raise UserError(f"the probe needs a patch of 3 positive sizes (got {list(patch_size)}) and at least one crop "
                        f"per case, case and point per class")
    split = probe_split(dataset, fold, plans, configuration)
    nnunet_dataset = infer_dataset_class(split.folder)(split.folder, split.train_cases + split.val_cases)
    pick = np.random.default_rng([seed, 0])

    fit_crops, images, classes = [], [], []
    for j, case in enumerate(_subset(split.train_cases, max_cases, pick)):
        data, seg, _, props = nnunet_dataset.load_case(case)
        image, class_map, region = _padded(split, data, seg, patch)
        offset = [r.start for r in region]
        locations = [v for v in (props.get("class_locations") or {}).values() if v is not None and len(v)]
        rng = np.random.default_rng([seed, 1, j])
        for i in range(crops_per_case):
            start = _crop_start(rng, i % 2 == 0, locations, offset, class_map.shape, patch)
            window = _window(start, patch)
            fit_crops.append((case, tuple(s - o for s, o in zip(start, offset))))
            images.append(image[(slice(None), *window)])
            classes.append(class_map[window])
    points, point_classes, weights = _sample_points(np.stack(classes), len(split.labels), points_per_class,
                                                    np.random.default_rng([seed, 2]))

    val = []
    for case in _subset(split.val_cases, max_cases, pick):
        data, seg, _, _ = nnunet_dataset.load_case(case)
        image, class_map, region = _padded(split, data, seg, patch)
        steps = compute_steps_for_sliding_window(image.shape[1:], patch, 1.0)
        val.append(ValCase(case, torch.from_numpy(image), torch.from_numpy(np.ascontiguousarray(class_map[region])),
                           region, [tuple(int(s) for s in t) for t in product(*steps)]))
    return ProbeData(split, patch, seed, fit_crops, torch.from_numpy(np.stack(images)), torch.from_numpy(points),
                     torch.from_numpy(point_classes), torch.from_numpy(weights), val)


# -------------------------------------------------------------------------------------------------------------- fit


@dataclass
class ProbeResult:
    """A probe's outcome: mean foreground Dice, Dice per foreground label (mean over the validation cases; NaN where
    a label is in no case's reference nor prediction), and the seconds it took."""

    score: float
    class_dice: dict[int, float]
    seconds: float


def token_grid(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The encoder's final normed tokens without CLS (Primus has none; a ResEnc's tokens are its feature map) as a
    feature volume: ``[B, C, *patch]`` -> ``[B, E, *grid]`` float32."""
    normed, _ = encoder(x)
    return tokens_to_volume(normed.float(), encoder.grid(x.shape[2:]))


def features_at(grid: torch.Tensor, voxels: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """Features ``[M, E]`` at ``voxels`` ``[M, 3]`` of a patch from its token grid ``[E, *grid]``: the values of
    ``F.interpolate(grid[None], size=patch, mode="trilinear", align_corners=False)`` there, without building it."""
    size = torch.tensor(list(patch), dtype=torch.float32, device=grid.device)
    normalised = (2 * voxels.float() + 1) / size - 1  # voxel centres in [-1, 1], align_corners=False
    coords = normalised.flip(-1).view(1, 1, 1, -1, 3)  # grid_sample reads (x, y, z) = (last axis, ..., first)
    return F.grid_sample(grid[None], coords, mode="bilinear", padding_mode="border",
                         align_corners=False).view(grid.shape[0], -1).T


def fit_linear(features: torch.Tensor, classes: torch.Tensor, weights: torch.Tensor, num_classes: int,
               steps: int = LBFGS_STEPS, weight_decay: float = WEIGHT_DECAY) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted softmax regression of ``classes`` ``[S]`` on standardised ``features`` ``[S, E]``, fitted with
    ``steps`` full-batch L-BFGS iterations; returns the layer on the raw features, ``(W [E, K], b [K])``."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    z = (features - mean) / std
    weight = torch.zeros(z.shape[1], num_classes, device=z.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=z.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight + bias, classes, reduction="none") @ weights
        loss = loss + weight_decay / 2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    w = weight.detach() / std[:, None]
    return w, bias.detach() - mean @ w


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _window(start: Sequence[int], patch: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(s, s + p) for s, p in zip(start, patch))


def probe_score(encoder: nn.Module, data: ProbeData, device: torch.device | str | None = None, *,
                batch_size: int = 8, precision: str = "auto", steps: int = LBFGS_STEPS,
                weight_decay: float = WEIGHT_DECAY, progress: bool = False) -> ProbeResult:
    """The linear probe's score of a frozen ``encoder`` on ``data`` (see the module docstring).

    ``encoder``: a :class:`~nnunetv2_hiendmae.vit.ViTEncoder3D` (or a module with its ``forward``/``grid``
    contract) with ``data``'s channel count, on ``device`` (default: where its parameters are; it is not moved).
    Its forward runs in eval mode under ``torch.no_grad`` and ``precision``'s autocast (bf16 on CUDA by default);
    its train/eval flags and every global random state are as before afterwards. Deterministic for a given device.
    """
    start = time.perf_counter()
    parameter = next(encoder.parameters(), None)
    here = parameter.device if parameter is not None else torch.device("cpu")
    device = torch.device(device) if device is not None else here
    if device != here:
        raise ValueError(f"the encoder is on {here}, not on {device}: move it first")
    channels = getattr(encoder, "in_channels", data.split.channels)
    if channels != data.split.channels:
        raise ValueError(f"the encoder takes {channels} channels, {data.split.dataset_name} has {data.split.channels}")
    modes = {m: m.training for m in encoder.modules()}
    encoder.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            return _probe(encoder, data, device, batch_size, precision, steps, weight_decay, progress, start)
    finally:
        for module, mode in modes.items():
            module.training = mode


def _probe(encoder: nn.Module, data: ProbeData, device: torch.device, batch_size: int, precision: str, steps: int,
           weight_decay: float, progress: bool, start: float) -> ProbeResult:
    patch, num_classes = data.patch_size, len(data.split.labels) + 1
    bar = tqdm(total=data.num_windows, desc="probe", unit="window", disable=not progress, leave=False)
    points = data.points.to(device)
    offsets = np.searchsorted(data.points[:, 0].numpy(), np.arange(len(data.fit_crops) + 1))
    features = []
    for first in range(0, len(data.fit_crops), batch_size):
        x = data.fit_images[first:first + batch_size].to(device)
        with autocast(device, precision):
            grids = token_grid(encoder, x)
        for i, grid in enumerate(grids, start=first):
            features.append(features_at(grid, points[offsets[i]:offsets[i + 1], 1:], patch))
        bar.update(len(x))
    weight, bias = fit_linear(torch.cat(features), data.point_classes.to(device), data.point_weights.to(device),
                              num_classes, steps, weight_decay)

    confusion = []  # per validation case: [K+1, K+1] voxel counts, reference class x predicted class
    for case in data.val:
        image = case.image.to(device)
        predicted = torch.empty(image.shape[1:], dtype=torch.int16, device=device)
        for tiles in _batches(case.tiles, batch_size):
            x = torch.stack([image[(slice(None), *_window(t, patch))] for t in tiles])
            with autocast(device, precision):
                grids = token_grid(encoder, x)
            logits = torch.einsum("be...,ek->bk...", grids, weight) + bias.view(1, -1, 1, 1, 1)
            labels = F.interpolate(logits, size=patch, mode="trilinear", align_corners=False).argmax(1)
            for t, label in zip(tiles, labels):
                predicted[_window(t, patch)] = label.to(torch.int16)
            bar.update(len(tiles))
        reference = case.classes.to(device).long()
        scored = reference != NOT_SCORED
        pairs = reference[scored] * num_classes + predicted[case.region][scored].long()
        confusion.append(torch.bincount(pairs, minlength=num_classes ** 2).view(num_classes, num_classes).cpu())
    bar.close()

    dice = []  # per case, per foreground class
    for counts in confusion:
        counts = counts.double()
        tp = counts.diagonal()
        denominator = counts.sum(0) + counts.sum(1)  # 2 tp + fp + fn
        dice.append([2 * tp[k].item() / denominator[k].item() if denominator[k] > 0 else math.nan
                     for k in range(1, num_classes)])
    per_class = {label: mean_std([d[k] for d in dice])[0] for k, label in enumerate(data.split.labels)}
    return ProbeResult(mean_std(per_class.values())[0], per_class, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------- encoders


@dataclass
class ProbeEncoder:
    """An encoder to probe, from a checkpoint or ``random:ARCH``, with what the probe's report says about it."""

    name: str  # the -pt value
    encoder: Encoder  # on the CPU, in eval mode
    patch_size: list[int] | None  # the pretraining patch in the probe dataset's axis order; None for random:ARCH
    method: str  # the pretraining method, or "random init"
    epochs: int | None  # pretraining epochs done
    pretrain: dict | None  # the checkpoint's pretraining record (its case fingerprints: the leakage guard)


def load_probe_encoder(spec: str, split: ProbeSplit, seed: int = PROBE_SEED) -> ProbeEncoder:
    """``spec``: a pretraining checkpoint (:mod:`nnunetv2_hiendmae.checkpoint`) or ``random:ARCH``, ARCH one of
    :data:`RANDOM_ARCHS`, initialised after ``torch.manual_seed(seed)`` without touching the global random state: a
    preset's encoder with its default positions, as a pretraining run with that seed initialises it, or ``resenc_l``,
    nnssl's ResEnc-L encoder as nnU-Net initialises a new ResEnc U-Net (:func:`~nnunetv2_hiendmae.resenc.initialize`),
    on ``split``'s channels. Raises
    :class:`UserError` for an unknown architecture, an unreadable or foreign checkpoint, weights that do not fit their
    configuration, or a channel count other than ``split``'s."""
    if spec.startswith(RANDOM_PREFIX):
        arch = spec[len(RANDOM_PREFIX):]
        if arch not in RANDOM_ARCHS:
            raise UserError(f"-pt {spec}: unknown architecture {arch!r}; choose from {', '.join(RANDOM_ARCHS)}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if arch in RANDOM_CNNS:  # as nnU-Net initialises a new ResEnc U-Net
                encoder = initialize(build_encoder(resenc_config(arch, RANDOM_CNNS[arch], split.channels)))
            else:  # a learned position embedding (Primus) on the default 96^3 grid, resized like a checkpoint's
                encoder = build_encoder(encoder_config_for_patch(arch, [REFERENCE_PATCH] * 3, split.channels))
        return ProbeEncoder(spec, encoder.eval(), None, "random init", 0, None)
    ckpt = load_checkpoint(spec, cnn=True)
    channels = int(ckpt["encoder"].get("in_channels", 1))
    if channels != split.channels:
        raise UserError(f"checkpoint {spec} was pretrained on {channels} channels, {split.dataset_name} has "
                        f"{split.channels}: the probe needs a dataset with the checkpoint's channels")
    try:
        encoder = build_encoder(ckpt["encoder"])
        encoder.load_state_dict(encoder_state_dict(ckpt))
    except (RuntimeError, TypeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {spec}: its encoder weights do not fit its encoder configuration "
                        f"({first})") from None
    pretrain = ckpt.get("pretrain") or {}
    patch = pretrain.get("patch_size")  # load_checkpoint reads 0.1's crop_size as it
    if patch is not None:
        patch = [int(p) for p in to_dataset_axes(patch, pretrain.get("transpose_forward") or range(3),
                                                 split.transpose_forward)]
    epochs = pretrain.get("epochs_done")
    return ProbeEncoder(spec, encoder.eval(), patch, str(ckpt.get("method")),
                        int(epochs) if epochs is not None else None, pretrain)


def probe_patch(token_size: Sequence[int], split: ProbeSplit, own: Sequence[int] | None = None,
                given: Sequence[int] | None = None, fallback: Sequence[int] | None = None) -> list[int]:
    """The patch to probe an encoder of ``token_size`` with: ``given`` (``--patch-size``), else ``own`` (its
    pretraining patch), else ``fallback`` (the first checkpoint's, so that ``random:ARCH`` is measured as the
    checkpoints are) where that is a multiple of the token size, else the configuration's median image rounded up to
    whole tokens, at most 96 per axis (:func:`nnunetv2_hiendmae.plans.default_patch`). A given patch that is not a
    multiple of the token size is a :class:`UserError`."""
    token = [int(t) for t in token_size]
    if given:
        return check_patch([int(g) for g in given], token)
    if own is not None:
        return check_patch([int(o) for o in own], token)
    if fallback is not None and all(f % t == 0 for f, t in zip(fallback, token)):
        return [int(f) for f in fallback]
    return default_patch(split.median_shape, token, (REFERENCE_PATCH,) * 3)
