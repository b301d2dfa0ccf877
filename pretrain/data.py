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
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.fileio import atomic_write_json
from nnunetv2_hiendmae.preprocessed import PreprocessedData, find_preprocessed
from pretrain.stop import ignore_stop_signals

CT_BODY_MIN_HU = -500.0
BODY_EPS = 1e-3
N_BACKGROUND_SAMPLES = 64


def resolve_sources(datasets: list[str], plans: str = "nnUNetPlans", configuration: str = "3d_fullres",
                    fold: int | None = None) -> list[PreprocessedData]:
    """Check every dataset up front so that a typo fails in one clear line before any training starts."""
    if not datasets:
        raise UserError("no dataset given")
    sources = [find_preprocessed(str(d), plans, configuration, fold) for d in datasets]
    counts = {s.dataset_name: len(s.channel_names) for s in sources}
    if len(set(counts.values())) > 1:
        raise UserError("datasets have different channel counts: "
                        + ", ".join(f"{n} has {c}" for n, c in counts.items()))
    return sources


def _first_line(e: Exception) -> str:
    """An exception's message in one line of at most 120 characters, for messages that name a case."""
    text = str(e).strip()
    return text.splitlines()[0][:120] if text else ""


class CaseReadError(UserError):
    """A preprocessed case that cannot be read (truncated or corrupt file)."""


def expected_shape(properties: dict, source: PreprocessedData) -> list[int]:
    """The voxel shape nnU-Net's preprocessing gives a case: its cropped shape resampled from its own spacing to the
    configuration's (both in the transposed axis order), as ``DefaultPreprocessor`` computes it."""
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    spacing = [properties["spacing"][axis] for axis in source.plans["transpose_forward"]]
    shape = compute_new_shape(properties["shape_after_cropping_and_before_resampling"], spacing,
                              source.configuration["spacing"])
    return [int(s) for s in shape]


def case_problem(source: PreprocessedData, dataset, identifier: str) -> str | None:
    """Why a preprocessed case cannot be trained on, or None: it opens, its shape and dtype are what its properties
    and the plans say, and its first and last chunks decompress (a truncated file loses its end). Cheap: two voxels
    are read."""
    try:
        data, seg, _, properties = dataset.load_case(identifier)
        channels = len(source.configuration["normalization_schemes"])
        shape = [channels, *expected_shape(properties, source)]
        if list(data.shape) != shape or (seg is not None and list(seg.shape[1:]) != shape[1:]):
            return f"shape {list(data.shape)}, but its properties and the plans say {shape}"
        if np.dtype(data.dtype) != np.float32:
            return f"dtype {data.dtype}, not float32"
        for array in (data, seg) if seg is not None else (data,):
            np.asarray(array[(slice(0, 1), *(slice(0, 1),) * 3)])
            np.asarray(array[(slice(-1, None), *(slice(n - 1, n) for n in array.shape[1:]))])
    except Exception as e:  # noqa: BLE001 - any failure means the case cannot be read
        return f"unreadable ({type(e).__name__}: {_first_line(e)})"
    return None


UNREADABLE = "unreadable_cases.json"  # in a run's folder: the cases that broke while it ran


def record_unreadable(output_dir: str | os.PathLike, case: str) -> None:
    """Add ``case`` (``DatasetXXX_Name/case``) to the run's :data:`UNREADABLE` record, which ``--skip-bad-cases``
    leaves out when the run resumes: a case can break where the check before the run does not read it."""
    path = Path(output_dir) / UNREADABLE
    atomic_write_json(path, sorted(set(recorded_unreadable(output_dir)) | {case}))


def recorded_unreadable(output_dir: str | os.PathLike) -> list[str]:
    """The cases of the run in ``output_dir`` that broke while it ran (:func:`record_unreadable`); [] if none."""
    path = Path(output_dir) / UNREADABLE
    return json.loads(path.read_text()) if path.is_file() else []


def check_cases(sources: list[PreprocessedData], skip: bool = False, progress: bool = True,
                held_out: bool = False, broke: Sequence[str] = ()) -> list[str]:
    """Every case of every source checked (:func:`case_problem`) before training starts. Bad cases refuse the run in
    one line naming them, or, with ``skip``, are dropped from their source, as are the cases in ``broke``
    (``DatasetXXX_Name/case`` that broke during an earlier part of the run); returns the notes on dropped cases.
    ``held_out``: the sources are the held-out cases, which may all be dropped (the run then scores none)."""
    problems = []
    for src in sources:
        dataset = infer_dataset_class(src.folder)(src.folder, list(src.identifiers))
        for identifier in tqdm(src.identifiers, desc=f"checking {src.dataset_name}", disable=not progress,
                               leave=False):
            problem = "could not be read during the run" if skip and f"{src.dataset_name}/{identifier}" in broke \
                else case_problem(src, dataset, identifier)
            if problem is not None:
                problems.append((src, identifier, problem))
    if not problems:
        return []
    named = [f"{src.dataset_name}/{case}: {problem}" for src, case, problem in problems]
    if not skip:
        shown = "; ".join(named[:5]) + (f"; and {len(named) - 5} more" if len(named) > 5 else "")
        raise UserError(f"{len(named)} preprocessed case(s) cannot be read ({shown}): preprocess them again (the "
                        f"command that made the dataset skips finished cases), or pass --skip-bad-cases to leave them "
                        f"out")
    for src, case, _ in problems:
        src.identifiers.remove(case)
    if not held_out and not any(src.identifiers for src in sources):
        raise UserError("no readable case is left: preprocess the datasets again")
    return [f"left out (--skip-bad-cases): {n}" for n in named]


NORMALISATION_KEYS = ("mean", "std", "percentile_00_5", "percentile_99_5")


def normalisation_differences(sources: list[PreprocessedData]) -> list[str]:
    """One note per dataset whose spacing or intensity normalisation differs from the first dataset's, which is what
    the checkpoint records and fine-tuning plans take."""
    first, notes = sources[0], []
    for src in sources[1:]:
        diffs = []
        for key in ("spacing", "normalization_schemes", "use_mask_for_norm"):
            a, b = first.configuration[key], src.configuration[key]
            if key == "spacing" and np.allclose(a, b, rtol=1e-3) or key != "spacing" and list(a) == list(b):
                continue
            diffs.append(f"{key} {list(b)} vs {list(a)}")
        for c, scheme in enumerate(src.configuration["normalization_schemes"]):
            a = first.plans["foreground_intensity_properties_per_channel"].get(str(c), {})
            b = src.plans["foreground_intensity_properties_per_channel"].get(str(c), {})
            if scheme != "CTNormalization" or not a:
                continue
            for key in NORMALISATION_KEYS:
                if not np.isclose(a[key], b[key], rtol=1e-3):
                    diffs.append(f"channel {c} CT {key} {b[key]:.4g} vs {a[key]:.4g}")
        if diffs:
            notes.append(f"{src.dataset_name} is preprocessed differently from {first.dataset_name} ("
                         f"{'; '.join(diffs)}): its voxels mean other intensities or sizes; the checkpoint records "
                         f"the first dataset's, and fine-tuning plans take those")
    return notes


def _dataset_metadata(s: PreprocessedData, plans: str, configuration: str) -> dict:
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


def pretrain_metadata(sources: list[PreprocessedData], plans: str, configuration: str) -> dict:
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


def _channel_rules(s: PreprocessedData) -> tuple[list[str], list[float], list[float]]:
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

    def __init__(self, sources: list[PreprocessedData], views: dict[str, tuple[int, Sequence[int]]],
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

    def batch_bytes(self, batch_size: int) -> int:
        """Bytes of one batch of ``batch_size`` items (all views, all channels, in the transfer dtype)."""
        channels = len(self.sources[0].channel_names)
        voxels = sum(n * math.prod(size) for n, size in self.views.values())
        return batch_size * voxels * channels * self.dtype.itemsize

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
        try:
            data, seg, _, props = self._nnunet_dataset(s).load_case(self.sources[s].identifiers[j])
            thresholds = self._thresholds(s, j, data)
            body = props.get("body_locations")
            out = {}
            for name, (count, size) in self.views.items():
                crops = [self._crop(s, data, self._centre(rng, s, data, seg, thresholds, body), size)
                         for _ in range(count)]
                out[name] = torch.from_numpy(np.stack(crops)).to(self.dtype)  # torch converts 2x faster than numpy
        except Exception as e:  # noqa: BLE001 - the case is named; the run stops on it (pretrain.train)
            raise CaseReadError(f"cannot read {self.case_name(index)} ({type(e).__name__}: {_first_line(e)})") from None
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


class RunSampler(Sampler):
    """Item indices ``start, start + 1, ...`` without end (item ``e * n + i`` is item ``i`` of epoch ``e``): the run
    takes ``n / batch`` batches per epoch from one loader iterator, and a run resumed in the middle of an epoch
    starts at the item it had reached."""

    def __init__(self, start: int = 0):
        self.start = start

    def __iter__(self):
        return itertools.count(self.start)


def init_worker(worker_id: int) -> None:
    """A loader worker: numpy and random seeded from torch's per-worker seed (the crops use their own RNG), and
    Ctrl-C and SIGTERM left to the training process (:mod:`pretrain.stop`)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    ignore_stop_signals()


GIB = 2 ** 30
MAX_PREFETCH = 4  # batches per worker at most, however small: more only delays the loader's start


@dataclass(frozen=True)
class LoaderMemory:
    """What one rank's loader holds in host memory: ``workers`` processes with ``prefetch`` batches of
    ``batch_bytes`` each in flight. A worker's finished batch crosses to the training process through shared memory
    (``/dev/shm``) as one object, and is then copied to page-locked (pinned) memory for the GPU, where the batch being
    copied and the one being computed are held too."""

    workers: int
    prefetch: int
    batch_bytes: int
    pinned: bool

    @property
    def in_flight(self) -> int:
        return self.workers * self.prefetch

    @property
    def shared_bytes(self) -> int:
        return self.in_flight * self.batch_bytes

    @property
    def pinned_bytes(self) -> int:
        return (max(1, self.in_flight) + 2) * self.batch_bytes if self.pinned else 0


def loader_memory(batch_bytes: int, num_workers: int, memory_gib: float, pinned: bool) -> LoaderMemory:
    """The loader's depth bounded by bytes, not by count: as many batches in flight as ``memory_gib`` holds (at least
    one), spread over at most ``num_workers`` workers (fewer when a batch is so large that fewer fit), each prefetching
    the same number, at most :data:`MAX_PREFETCH`. A count of batches per worker does not bound it: at the ViT-B
    defaults a batch is 340 MB (GL-MAE 650 MB), so 8 workers x 4 batches are 11-21 GB of pinned memory per rank.
    Raises ValueError for a negative ``num_workers`` or a non-positive ``memory_gib``."""
    if num_workers < 0 or memory_gib <= 0:
        raise ValueError(f"need num_workers >= 0 and memory_gib > 0, got {num_workers} and {memory_gib}")
    if num_workers == 0:
        return LoaderMemory(0, 0, batch_bytes, pinned)
    in_flight = max(1, int(memory_gib * GIB) // batch_bytes)
    workers = min(num_workers, in_flight)
    return LoaderMemory(workers, min(MAX_PREFETCH, in_flight // workers), batch_bytes, pinned)


def check_shared_memory(memory: LoaderMemory, ranks_on_node: int, folder: str = "/dev/shm") -> None:
    """Refuse, in one line, a node whose shared memory cannot hold the batches in flight of all its ranks (a
    container's default ``/dev/shm`` is 64 MB; one ViT-B batch is 340 MB): the workers would die with a bus error
    mid-run. A system without ``folder`` is not checked."""
    if not memory.workers or not os.path.isdir(folder):
        return
    need, have = memory.shared_bytes * ranks_on_node, shutil.disk_usage(folder).total
    if need > have:
        raise UserError(f"the loader needs {need / GIB:.1f} GiB of shared memory ({ranks_on_node} rank(s) x "
                        f"{memory.in_flight} batch(es) of {memory.batch_bytes / 2**20:.0f} MiB in flight), {folder} "
                        f"holds {have / GIB:.2f} GiB: give the container more (docker run --shm-size "
                        f"{math.ceil(need / GIB)}g), or lower --loader-memory-gib or --num-workers")


def make_loader(dataset: PretrainCrops, batch_size: int, num_workers: int, device_type: str,
                start_epoch: int = 0, start_iteration: int = 0, memory_gib: float = 6.0) -> DataLoader:
    """Batches ``{name: [B, count, C, *size]}`` in item order (items are already random), from iteration
    ``start_iteration`` of epoch ``start_epoch`` on, without end; ``batch_size`` must divide the items per epoch, so
    that no batch spans two epochs. Batches are pinned for the copy to a GPU (:func:`device_batches`); at most
    ``memory_gib`` of them are in flight (:func:`loader_memory`). The loader seeds its workers from a generator of its
    own, not from torch's global one, which drives the masks: a resumed run's masks continue the stream of the run it
    resumes."""
    if len(dataset) % batch_size:
        raise ValueError(f"batch size {batch_size} does not divide the {len(dataset)} items of an epoch")
    start = start_epoch * len(dataset) + start_iteration * batch_size
    memory = loader_memory(dataset.batch_bytes(batch_size), num_workers, memory_gib, device_type == "cuda")
    return DataLoader(dataset, batch_size=batch_size, sampler=RunSampler(start),
                      num_workers=memory.workers, pin_memory=memory.pinned, drop_last=False,
                      prefetch_factor=memory.prefetch or None,
                      worker_init_fn=init_worker if memory.workers else None,
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
