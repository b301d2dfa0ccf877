"""Folders of unlabelled images -> a dataset in nnU-Net's preprocessed format (the work of
``nnUNetv2_hiendmae_preprocess_unlabeled``; see docs/unlabeled_data.md).

Every case goes through nnU-Net's own inference-time preprocessing (``DefaultPreprocessor.run_case_npy`` with no
segmentation: transpose, crop to the nonzero region, normalise, resample), so at the same spacing and normalisation
the arrays equal those of ``nnUNetv2_plan_and_preprocess``. Instead of a label map, each case stores its **body mask**
as ``<case>_seg.b2nd`` (0 in the body, -1 outside) and up to :data:`BODY_SAMPLES` body voxel coordinates as
``body_locations`` in ``<case>.pkl``, from which the pretraining crop sampler draws body-centred crops without
reading a voxel. "Body" is what the sampler uses elsewhere (:func:`pretrain.data.ct_body_threshold`,
:func:`pretrain.data.sampled_body_threshold`).

Crash safety: a case is written into a staging folder beside the data folder and moved in file by file, the data
file ``<case>.b2nd`` last; nnU-Net's loader lists a case by that file, and a re-run skips exactly the cases that
have it. So a kill at any moment leaves either a complete case or one that the next run redoes.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
import shutil
import sys
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.fileio import atomic_write_json, publish
from nnunetv2_hiendmae.nnunet_paths import dataset_name, nnunet_folder
from nnunetv2_hiendmae.presets import ct_window_statistics
from pretrain.data import N_BACKGROUND_SAMPLES, ct_body_threshold, sampled_body_threshold

if TYPE_CHECKING:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

PLANS = "nnUNetPlans"  # what nnUNetv2_hiendmae_pretrain reads by default
CONFIGURATION = "3d_fullres"
DATA_IDENTIFIER = f"{PLANS}_{CONFIGURATION}"
SETTINGS_FILE = "hiendmae_unlabeled.json"
BODY_SAMPLES = 10_000  # body voxel coordinates kept per case (nnU-Net keeps 10,000 per class)
FINGERPRINT_SAMPLES = 10_000  # body intensities sampled per case for the CT statistics
CT_BODY_HU = -500.0  # CT voxels above this are body when the pool's intensity statistics are computed
FILE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".gipl")
CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
DEFAULT_RESAMPLING = {"resampling_fn_data": "resample_data_or_seg_to_shape",
                      "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0,
                                                    "force_separate_z": None},
                      "resampling_fn_seg": "resample_data_or_seg_to_shape",
                      "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                      "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                      "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                             "force_separate_z": None}}


@dataclass
class Settings:
    """Everything the arrays depend on; a dataset is only ever extended with the same settings."""

    channels: int
    modality: str  # CT or MR
    spacing: list[float]
    transpose_forward: list[int]
    normalization_schemes: list[str]
    use_mask_for_norm: list[bool]
    intensity: dict  # foreground_intensity_properties_per_channel ({} per channel when not needed)
    resampling: dict = field(default_factory=lambda: dict(DEFAULT_RESAMPLING))
    patch_size: list[int] = field(default_factory=lambda: [96, 96, 96])  # blosc2 chunking for crops of this size
    source: str = "spacing"  # how spacing and normalisation were chosen: spacing / ct-window / like DATASET
    reader: str | None = None  # nnU-Net image reader class; None: nnU-Net's first for the file ending


@dataclass
class Case:
    name: str
    files: list[str]  # one per channel, in channel order


# ---------------------------------------------------------------------------------------------------- finding cases

def _strip_ending(path: Path) -> str | None:
    for ending in FILE_ENDINGS:
        if path.name.lower().endswith(ending):
            return path.name[:-len(ending)]
    return None


def _sanitise(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "case"


def find_cases(inputs: Sequence[str], file_ending: str | None = None) -> list[Case]:
    """Cases in folders (searched recursively) and list files (one path per line), in a stable order.

    ``CASE_0000.ext``, ``CASE_0001.ext`` ... in one folder are the channels of one case (nnU-Net's naming); any other
    image file is a single-channel case. A case is named after its path relative to its input folder (prefixed by
    that folder's name), with a short hash of the full path if two names would clash.
    """
    groups: dict[tuple[str, str], dict[int, str]] = {}
    for given in inputs:
        root = Path(given).expanduser()
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file())
            base, prefix = root, root.resolve().name
        elif root.is_file() and root.suffix == ".txt":
            lines = [line.strip() for line in root.read_text().splitlines()]
            files = [Path(line).expanduser() for line in lines if line and not line.startswith("#")]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise UserError(f"{root} lists files that do not exist: {', '.join(missing[:3])}"
                                + (" ..." if len(missing) > 3 else ""))
            base, prefix = None, root.stem
        else:
            raise UserError(f"-i {given}: not a folder or a .txt list of image paths")
        for path in files:
            stem = _strip_ending(path)
            if stem is None or (file_ending and not path.name.lower().endswith(file_ending.lower())):
                continue
            rel = path.parent.relative_to(base).as_posix() if base is not None else path.parent.name
            m = CHANNEL.match(stem)
            case, channel = (m["case"], int(m["channel"])) if m else (stem, 0)
            label = "/".join(part for part in (prefix, rel, case) if part not in ("", "."))
            # channels of one case share their folder and name; any other file is a case of its own
            key = (label, str(path.resolve().parent) if m else str(path.resolve()))
            groups.setdefault(key, {})[channel] = str(path.resolve())
    cases, seen = [], set()
    for (label, _), channels in sorted(groups.items()):
        name = _sanitise(label.replace("/", "__"))
        if name in seen:
            name = f"{name}_{hashlib.sha1(next(iter(channels.values())).encode()).hexdigest()[:8]}"
        seen.add(name)
        cases.append(Case(name, [channels[c] for c in sorted(channels)]))
    return cases


# ------------------------------------------------------------------------------------------------- reading one case

def image_reader(path: str, name: str | None = None):
    """The nnU-Net reader called ``name`` (as ``overwrite_image_reader_writer`` in a dataset.json), else nnU-Net's
    first reader for the file's ending (chosen by the ending alone: no trial read of the file)."""
    from nnunetv2.imageio.reader_writer_registry import (
        determine_reader_writer_from_file_ending,
        recursive_find_reader_writer_by_name,
    )

    if name:
        return recursive_find_reader_writer_by_name(name)()
    ending = next(e for e in FILE_ENDINGS if path.lower().endswith(e))
    return determine_reader_writer_from_file_ending(ending, verbose=False)()


def reader_names() -> list[str]:
    """The reader classes nnU-Net knows (its registry's names)."""
    from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES

    return [c.__name__ for c in LIST_OF_IO_CLASSES]


def read_case(case: Case, reader: str | None = None) -> tuple[np.ndarray, dict]:
    """``(data [C, X, Y, Z] float32, properties)``; a file that is not a usable 3D image raises ``ValueError``."""
    try:
        data, props = image_reader(case.files[0], reader).read_images(case.files)
    except Exception as e:  # noqa: BLE001 - any reader failure means the file is unusable
        text = str(e).strip().splitlines()
        raise ValueError(f"unreadable ({type(e).__name__}: {text[0][:150] if text else 'no message'})") from None
    spacing = [float(s) for s in props["spacing"]]
    if len(case.files) == 1 and data.shape[0] > 1:  # nnU-Net's readers take a 4D file for several channels
        raise ValueError(f"a 4D image ({data.shape[0]} volumes in one file) where 3D images are expected")
    if data.ndim != 4 or any(n <= 1 for n in data.shape[1:]) or 999 in spacing:
        raise ValueError(f"not a 3D image (shape {list(data.shape[1:])}, spacing {spacing})")
    if not np.isfinite(data).all():
        raise ValueError("contains NaN or infinite values")
    if all(np.ptp(data[c]) == 0 for c in range(data.shape[0])):
        raise ValueError("constant image (no contrast)")
    return data.astype(np.float32, copy=False), props


def body_intensities(case: Case, channels: int, reader: str | None = None) -> np.ndarray:
    """Up to :data:`FINGERPRINT_SAMPLES` raw intensities per channel of the voxels above :data:`CT_BODY_HU` in any
    channel (the CT body), ``[N, C]``, drawn with a seed fixed per case."""
    data, _ = read_case(case, reader)
    if data.shape[0] != channels:
        raise ValueError(f"has {data.shape[0]} channels, the dataset {channels}")
    body = np.flatnonzero((data > CT_BODY_HU).any(0))
    rng = np.random.default_rng(int(hashlib.sha1(case.name.encode()).hexdigest()[:8], 16))
    pick = body if body.size <= FINGERPRINT_SAMPLES else rng.choice(body, FINGERPRINT_SAMPLES, replace=False)
    return data.reshape(data.shape[0], -1)[:, pick].T


def intensity_statistics(values: np.ndarray) -> dict:
    """nnU-Net's per-channel intensity properties of pooled foreground samples ``[N]``."""
    p00_5, median, p99_5 = np.percentile(values, [0.5, 50, 99.5])
    return {"max": float(values.max()), "mean": float(values.mean()), "median": float(median),
            "min": float(values.min()), "percentile_00_5": float(p00_5), "percentile_99_5": float(p99_5),
            "std": float(values.std())}


# ------------------------------------------------------------------------------------------------ writing one case

def body_mask(data: np.ndarray, settings: Settings, seed: int) -> np.ndarray:
    """Body voxels of a preprocessed case ``[C, X, Y, Z]`` (any channel): CT channels by the normalised -500 HU
    threshold, others by the sampled background level of the case."""
    mask = np.zeros(data.shape[1:], dtype=bool)
    rng = np.random.default_rng(seed)
    for c, scheme in enumerate(settings.normalization_schemes):
        if scheme == "CTNormalization":
            mask |= data[c] > ct_body_threshold(settings.intensity[str(c)])
        else:
            points = tuple(rng.integers(0, n, N_BACKGROUND_SAMPLES) for n in data.shape[1:])
            mask |= data[c] > sampled_body_threshold(data[c][points][:, None])[0]
    return mask


def body_locations(mask: np.ndarray, seed: int) -> np.ndarray:
    """Up to :data:`BODY_SAMPLES` coordinates ``[N, 3]`` (int32) of body voxels, uniformly drawn."""
    flat = np.flatnonzero(mask)
    if flat.size > BODY_SAMPLES:
        flat = np.random.default_rng(seed).choice(flat, BODY_SAMPLES, replace=False)
    return np.stack(np.unravel_index(np.sort(flat), mask.shape), axis=1).astype(np.int32)


def nnunet_preprocess(data: np.ndarray, props: dict, plans: dict) -> tuple[np.ndarray, dict]:
    """nnU-Net's inference-time preprocessing of a read case ``[C, X, Y, Z]`` (``DefaultPreprocessor.run_case_npy``
    without a segmentation, with the plans' :data:`CONFIGURATION`): ``(data [C, *shape] float32 in the plans' transposed
    axes at their spacing, properties with nnU-Net's crop bbox and shapes)``."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    data, _, props = DefaultPreprocessor(verbose=False).run_case_npy(
        data, None, props, manager, manager.get_configuration(CONFIGURATION), {})
    return data, props


def preprocess_case(case: Case, settings: Settings, plans: dict, staging: Path, target: Path) -> str | None:
    """Preprocess and write one case; ``None`` when done, else the reason it was skipped."""
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    try:
        data, props = read_case(case, settings.reader)
    except ValueError as e:
        return str(e)
    if data.shape[0] != settings.channels:
        return f"has {data.shape[0]} channels, the dataset {settings.channels}"
    data, props = nnunet_preprocess(data, props, plans)
    seed = int(hashlib.sha1(case.name.encode()).hexdigest()[:8], 16)
    mask = body_mask(data, settings, seed)
    body = np.where(mask, 0, -1).astype(np.int8)[None]
    props.update(body_locations=body_locations(mask, seed), source_files=list(case.files))
    blocks, chunks = comp_blosc2_params(data.shape, tuple(settings.patch_size), data.itemsize)
    blocks_seg, chunks_seg = comp_blosc2_params(body.shape, tuple(settings.patch_size), body.itemsize)
    stem = staging / case.name
    for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
        (staging / f"{case.name}{suffix}").unlink(missing_ok=True)
    nnUNetDatasetBlosc2.save_case(data.astype(np.float32, copy=False), body, props, str(stem), chunks=chunks,
                                  blocks=blocks, chunks_seg=chunks_seg, blocks_seg=blocks_seg)
    # the data file last: it makes the case visible (nnU-Net lists cases by it; a re-run skips cases that have it)
    publish([(staging / f"{case.name}{suffix}", target / f"{case.name}{suffix}")
             for suffix in ("_seg.b2nd", ".pkl", ".b2nd")])
    return None


def _work(job: tuple) -> tuple[str, str | None]:
    case, settings, plans, staging, target = job
    try:
        return case.name, preprocess_case(case, settings, plans, staging, target)
    except Exception as e:  # noqa: BLE001 - one bad case must never stop the run; it is reported
        text = str(e).strip().splitlines()
        return case.name, f"failed in preprocessing ({type(e).__name__}: {text[0][:150] if text else ''})"


def _fingerprint_work(job: tuple) -> tuple[str, np.ndarray | str]:
    case, channels, reader = job
    try:
        return case.name, body_intensities(case, channels, reader)
    except ValueError as e:
        return case.name, str(e)


def parallel(fn, jobs: Sequence, processes: int, desc: str) -> Iterator:
    """``fn`` over ``jobs`` in ``processes`` worker processes (memory: one case per process), with a progress bar
    that counts the failures (results whose second item is a string)."""
    bar = tqdm(total=len(jobs), desc=desc, unit="case", dynamic_ncols=True, file=sys.stderr)
    failures = 0
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        for result in pool.imap_unordered(fn, jobs, chunksize=1):
            failures += isinstance(result[1], str)
            bar.set_postfix(skipped=failures)
            bar.update(1)
            yield result
    bar.close()


# ------------------------------------------------------------------------------------------------- the whole dataset

def plans_for(name: str, settings: Settings, median_shape: Sequence[float]) -> dict:
    """nnU-Net plans describing the data (only what reading and pretraining need; no network is planned)."""
    back = [settings.transpose_forward.index(i) for i in range(3)]
    return {
        "dataset_name": name, "plans_name": PLANS,
        "original_median_spacing_after_transp": list(settings.spacing),
        "original_median_shape_after_transp": [int(round(s)) for s in median_shape],
        "image_reader_writer": settings.reader or "SimpleITKIO", "transpose_forward": list(settings.transpose_forward),
        "transpose_backward": back,
        "configurations": {CONFIGURATION: {
            "data_identifier": DATA_IDENTIFIER, "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": list(settings.patch_size), "median_image_size_in_voxels": [float(s) for s in median_shape],
            "spacing": list(settings.spacing), "normalization_schemes": list(settings.normalization_schemes),
            "use_mask_for_norm": list(settings.use_mask_for_norm), **settings.resampling,
            "architecture": {"network_class_name": "none: unlabelled pretraining data", "arch_kwargs": {},
                             "_kw_requires_import": []},
            "batch_dice": False}},
        "experiment_planner_used": "nnUNetv2_hiendmae_preprocess_unlabeled",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": settings.intensity,
        "hiendmae_unlabeled": asdict(settings),
    }


def settings_like(dataset: str, plans_name: str, configuration: str, patch_size: Sequence[int]) -> tuple[Settings, str]:
    """Spacing, axis order and normalisation of another dataset's nnU-Net plans (pretrain on the pool, fine-tune on
    that dataset, both preprocessed alike)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    name = dataset_name(dataset)
    folder = nnunet_folder("nnUNet_preprocessed") / name
    plans_file = folder / f"{plans_name}.json"
    if not plans_file.is_file():
        raise UserError(f"--like {dataset}: {plans_file} not found (run nnUNetv2_plan_and_preprocess for it first)")
    manager = PlansManager(str(plans_file))
    if configuration not in manager.available_configurations:
        raise UserError(f"--like {dataset}: configuration {configuration} is not in {plans_file}")
    channels = len(json.loads((folder / "dataset.json").read_text())["channel_names"])
    return settings_from_plans(manager, configuration, channels, patch_size, f"like {name}"), name


def settings_from_plans(manager: PlansManager, configuration: str, channels: int, patch_size: Sequence[int],
                        source: str) -> Settings:
    """Spacing, axis order, normalisation and resampling of one configuration of nnU-Net plans (a ``PlansManager``)
    as :class:`Settings`."""
    cfg = manager.get_configuration(configuration).configuration
    schemes = list(cfg["normalization_schemes"])
    modality = "CT" if all(s == "CTNormalization" for s in schemes) else "MR"
    resampling = {k: cfg[k] for k in DEFAULT_RESAMPLING if k in cfg}
    return Settings(channels, modality, [float(s) for s in cfg["spacing"]], list(manager.transpose_forward), schemes,
                    [bool(m) for m in cfg["use_mask_for_norm"]],
                    json.loads(json.dumps(manager.foreground_intensity_properties_per_channel)),
                    {**DEFAULT_RESAMPLING, **resampling}, list(patch_size), source)


@dataclass
class Report:
    done: int = 0
    skipped: dict = field(default_factory=dict)  # case -> {"files": [...], "reason": ...}
    already: int = 0
    verb: str = "preprocessed"  # what was done to the cases, for the summary

    def summary(self) -> str:
        reasons = Counter(r["reason"].split(" (")[0] for r in self.skipped.values())
        why = "; ".join(f"{n} {reason}" for reason, n in reasons.most_common())
        return (f"{self.done + self.already} {self.verb} ({self.already} from an earlier run), "
                f"{len(self.skipped)} skipped" + (f": {why}" if why else ""))


def preprocess_unlabeled(inputs: Sequence[str], dataset_id: int, name: str, settings_args: dict,
                         processes: int = 4, file_ending: str | None = None) -> tuple[Path, Report]:
    """Create or extend ``$nnUNet_preprocessed/DatasetXXX_NAME`` from image folders; see the module docstring."""
    root = nnunet_folder("nnUNet_preprocessed")
    full_name = f"Dataset{dataset_id:03d}_{name}"
    others = sorted(p.name for p in root.glob(f"Dataset{dataset_id:03d}_*") if p.name != full_name)
    if others:
        raise UserError(f"dataset id {dataset_id} is taken by {others[0]} in nnUNet_preprocessed: choose another -d")
    folder = root / full_name
    created = not folder.exists()
    cases = find_cases(inputs, file_ending)
    if not cases:
        raise UserError(f"no images ({', '.join(FILE_ENDINGS)}) found in {' '.join(inputs)}")
    settings = _settings(settings_args, cases, processes, folder)
    stored = folder / SETTINGS_FILE
    if stored.is_file():
        before = json.loads(json.dumps(asdict(Settings(**json.loads(stored.read_text())))))
        now = json.loads(json.dumps(asdict(settings)))
        if before != now:
            changed = [k for k in before if before[k] != now.get(k)]
            raise UserError(f"{full_name} was preprocessed with other settings ({', '.join(changed)} differ): "
                            f"use another -d, or the settings of {stored}")
    elif folder.exists() and any(folder.iterdir()):
        raise UserError(f"{folder} exists and was not written by nnUNetv2_hiendmae_preprocess_unlabeled: "
                        "choose another -d")
    target, staging = folder / DATA_IDENTIFIER, folder / f".staging_{DATA_IDENTIFIER}"
    target.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of a killed run: never trusted
    staging.mkdir()
    atomic_write_json(stored, asdict(settings))
    atomic_write_json(folder / "cases.json", {c.name: c.files for c in cases})
    plans = plans_for(full_name, settings, [0.0, 0.0, 0.0])
    report = Report()
    todo = [c for c in cases if not (target / f"{c.name}.b2nd").is_file()]
    by_name = {c.name: c for c in cases}
    jobs = [(c, settings, plans, staging, target) for c in todo]
    for case, reason in parallel(_work, jobs, processes, f"preprocessing {full_name}"):
        if reason is None:
            report.done += 1
        else:
            report.skipped[case] = {"files": by_name[case].files, "reason": reason}
            tqdm.write(f"skipped {case}: {reason}", file=sys.stderr)
    shutil.rmtree(staging, ignore_errors=True)
    _write_dataset_files(folder, full_name, settings, cases, target, report)
    if created and report.done == 0:  # nothing usable: leave no dataset that a later run would have to match
        shutil.rmtree(folder)
    return folder, report


def _settings(args: dict, cases: list[Case], processes: int, folder: Path) -> Settings:
    """Settings from the flags, with the reader they name."""
    return replace(_normalisation_settings(args, cases, processes, folder), reader=args.get("reader"))


def _normalisation_settings(args: dict, cases: list[Case], processes: int, folder: Path) -> Settings:
    """Spacing and normalisation from the flags; CT without a window takes its statistics from a fingerprint of the
    pool (once: a re-run reuses the stored settings' statistics)."""
    if args.get("like"):
        settings, _ = settings_like(args["like"], args["plans"], args["configuration"], args["patch_size"])
        return settings
    channels = len(cases[0].files)
    modality, spacing = args["modality"], [float(s) for s in args["spacing"]]
    if modality == "MR":
        return Settings(channels, "MR", spacing, [0, 1, 2], ["ZScoreNormalization"] * channels, [False] * channels,
                        {str(c): {} for c in range(channels)}, patch_size=list(args["patch_size"]), source="spacing")
    if args.get("ct_window"):
        low, high = args["ct_window"]
        props = {str(c): ct_window_statistics(float(low), float(high)) for c in range(channels)}
        return Settings(channels, "CT", spacing, [0, 1, 2], ["CTNormalization"] * channels, [False] * channels, props,
                        patch_size=list(args["patch_size"]), source=f"ct-window {low} {high}")
    stored = folder / SETTINGS_FILE
    if stored.is_file():  # the pool's statistics were computed by the first run
        previous = json.loads(stored.read_text())
        if previous.get("source") == "fingerprint":
            return Settings(**previous)
    samples = []
    jobs = [(c, channels, args.get("reader")) for c in cases]
    for _, result in parallel(_fingerprint_work, jobs, processes, "intensity fingerprint"):
        if not isinstance(result, str) and len(result):
            samples.append(result)
    if not samples:
        raise UserError("no readable CT image with voxels above -500 HU: cannot compute intensity statistics "
                        "(give --ct-window LOW HIGH)")
    pooled = np.concatenate(samples)
    props = {str(c): intensity_statistics(pooled[:, c]) for c in range(channels)}
    return Settings(channels, "CT", spacing, [0, 1, 2], ["CTNormalization"] * channels, [False] * channels, props,
                    patch_size=list(args["patch_size"]), source="fingerprint")


def _write_dataset_files(folder: Path, full_name: str, settings: Settings, cases: list[Case], target: Path,
                         report: Report) -> None:
    """dataset.json, the plans, the fingerprint (spacings, shapes, intensity statistics) and skipped.json, from the
    cases that are complete (this run's and earlier runs')."""
    import pickle

    done = sorted(p.name[:-len(".b2nd")] for p in target.glob("*.b2nd") if not p.name.endswith("_seg.b2nd"))
    spacings, shapes = [], []
    for case in done:
        with open(target / f"{case}.pkl", "rb") as f:
            props = pickle.load(f)
        spacings.append([float(s) for s in props["spacing"]])
        shapes.append([int(s) for s in props["shape_after_cropping_and_before_resampling"]])
    median = np.median([[n * s / t for n, s, t in zip(shape, [sp[i] for i in settings.transpose_forward],
                                                      settings.spacing)]
                        for shape, sp in zip(shapes, spacings)], axis=0) if done else [0.0, 0.0, 0.0]
    channel_name = "CT" if settings.modality == "CT" else "MR"
    atomic_write_json(folder / "dataset.json", {
        "channel_names": {str(c): channel_name for c in range(settings.channels)}, "labels": {"background": 0},
        "numTraining": len(done), "file_ending": ".nii.gz",
        "description": "unlabelled images for self-supervised pretraining (nnUNetv2_hiendmae_preprocess_unlabeled)"})
    atomic_write_json(folder / f"{PLANS}.json", plans_for(full_name, settings, median))
    atomic_write_json(folder / "dataset_fingerprint.json", {
        "spacings": spacings, "shapes_after_crop": shapes,
        "foreground_intensity_properties_per_channel": settings.intensity,
        "statistics_from": settings.source, "cases": done})
    record_skipped(folder / "skipped.json", done, report.skipped)
    report.already = len(done) - report.done


def record_skipped(path: Path, done: Collection[str], skipped: dict) -> None:
    """Write ``skipped.json`` (case -> files and reason): this run's skipped cases, and those of earlier runs that
    are still not done."""
    previous = json.loads(path.read_text()) if path.is_file() else {}
    still = {k: v for k, v in previous.items() if k not in done and k not in skipped}
    atomic_write_json(path, {**still, **skipped})
