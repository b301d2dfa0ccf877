"""Folders of unlabelled images -> a dataset in nnU-Net's preprocessed format (the work of
``nnUNetv2_hiendmae_preprocess_unlabeled``; see docs/unlabeled_data.md).

Every case goes through nnU-Net's own inference-time preprocessing (``DefaultPreprocessor.run_case_npy`` with no
segmentation: transpose, crop to the nonzero region, normalise, resample), so at the same spacing and normalisation
the arrays equal those of ``nnUNetv2_plan_and_preprocess``. Instead of a label map, each case stores its **body mask**
as ``<case>_seg.b2nd`` (0 in the body, -1 outside) and up to :data:`BODY_SAMPLES` body voxel coordinates as
``body_locations`` in ``<case>.pkl``, from which the pretraining crop sampler draws body-centred crops without
reading a voxel. "Body" is what the sampler uses elsewhere (:func:`pretrain.data.ct_body_threshold`,
:func:`pretrain.data.sampled_body_threshold`).

Every case's **content fingerprint** (:func:`nnunetv2_hiendmae.leakage.content_fingerprint` of the image as read,
before resampling) goes into its ``.pkl`` and, per dataset, into ``content_fingerprints.json``, for the leakage guard.

Crash safety: a case is written into a staging folder beside the data folder and moved in file by file, the data
file ``<case>.b2nd`` last; nnU-Net's loader lists a case by that file, and a re-run skips exactly the cases that
have it. So a kill at any moment leaves either a complete case or one that the next run redoes.

Parts (``part=(K, N)``, for N cluster jobs): part K preprocesses cases ``K, K+N, K+2N, ...`` of the sorted case list
(nnU-Net's ``-part_id``/``-num_parts`` rule) with a staging folder of its own, writes the settings only if no run
wrote them before (once, atomically: every part computes the same) and no other shared file; a plain run afterwards
writes them (dataset.json, plans, fingerprints, case lists) and preprocesses what the parts did not finish. The
pool's CT statistics are the same in every part: each case's intensity samples are drawn with a seed fixed by the
case and pooled in case order, and are kept in ``.intensity_samples/`` (one file per case, written once), so each
part computes the whole pool's statistics while reading mostly its own cases.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import sys
import zlib
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.fileio import atomic_write, atomic_write_json, publish
from nnunetv2_hiendmae.leakage import FINGERPRINTS_FILE, content_fingerprint
from nnunetv2_hiendmae.nnunet_paths import dataset_name, nnunet_folder, plan_and_preprocess_command
from nnunetv2_hiendmae.presets import ct_window_statistics
from nnunetv2_hiendmae.workers import parallel
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
FORMATS = {".nii.gz": "NIfTI", ".nii": "NIfTI", ".nrrd": "NRRD", ".mha": "MetaImage", ".gipl": "GIPL"}
SAMPLES_FOLDER = ".intensity_samples"  # per case intensity samples for the CT statistics, until they are stored
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
    modality: str  # CT or MR, or one per channel joined by "+" (CT+MR)
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


def _format(path: str) -> str:
    return next(kind for ending, kind in FORMATS.items() if path.lower().endswith(ending))


def _nifti_incomplete(path: str) -> bool:
    """Whether a NIfTI file ends before the voxel data its header announces, or (.nii.gz) its compressed stream is
    cut or fails its checksum. ITK reads such a file without complaint and fills the missing voxels with zeros."""
    import nibabel

    try:
        header = nibabel.load(path).header
        voxels = int(np.prod(header.get_data_shape()))
        expected = int(header.get_data_offset()) + voxels * header.get_data_dtype().itemsize
    except Exception:  # noqa: BLE001 - a header nibabel cannot parse is left to the image reader to judge
        return False
    if not path.lower().endswith(".gz"):
        return os.path.getsize(path) < expected
    size = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                size += len(chunk)
    except (OSError, EOFError, zlib.error):
        return True
    return size < expected


def file_problem(path: str) -> str | None:
    """What makes an image file unusable, in plain words, found without the image reader (None: nothing found)."""
    kind = _format(path)
    if not os.access(path, os.R_OK):
        return "cannot be opened: no read permission"
    if os.path.getsize(path) == 0:
        return f"not a readable {kind}: empty file"
    if kind == "NIfTI" and _nifti_incomplete(path):
        return f"not a readable {kind}: truncated or corrupt"
    return None


def _unreadable(case: Case, reader: str | None) -> str:
    """Why nnU-Net's reader failed on a case, in plain words: the file it cannot read, or channels that differ."""
    def reads(path: str) -> bool:
        try:
            image_reader(path, reader).read_images([path])
        except Exception:  # noqa: BLE001 - any reader failure means the file is unusable
            return False
        return True

    bad = case.files[0] if len(case.files) == 1 else next((f for f in case.files if not reads(f)), None)
    if bad is None:
        return "its channel files differ in shape or spacing"
    return f"not a readable {_format(bad)}: truncated or corrupt" + (f" ({Path(bad).name})" if len(case.files) > 1
                                                                     else "")


def read_case(case: Case, reader: str | None = None) -> tuple[np.ndarray, dict]:
    """``(data [C, X, Y, Z] float32, properties)``; a file that is not a usable 3D image raises ``ValueError`` that
    says what is wrong with it in plain words (not the reader library's message)."""
    for path in case.files:
        problem = file_problem(path)
        if problem:
            raise ValueError(problem + (f" ({Path(path).name})" if len(case.files) > 1 else ""))
    try:
        data, props = image_reader(case.files[0], reader).read_images(case.files)
    except Exception:  # noqa: BLE001 - any reader failure means the file is unusable
        raise ValueError(_unreadable(case, reader)) from None
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


def body_intensities(case: Case, channels: int, reader: str | None = None, cache: Path | None = None) -> np.ndarray:
    """Up to :data:`FINGERPRINT_SAMPLES` raw intensities per channel of the voxels above :data:`CT_BODY_HU` in any
    channel (the CT body), ``[N, C]``, drawn with a seed fixed per case: the same whichever run or part draws them.
    With ``cache`` (a folder), they are kept there, one ``.npy`` per case written once, and read from there."""
    key = hashlib.sha1(json.dumps([case.files, reader, channels]).encode()).hexdigest()[:12]
    path = cache / f"{case.name}.{key}.npy" if cache else None
    if path is not None and path.is_file():
        return np.load(path)
    data, _ = read_case(case, reader)
    if data.shape[0] != channels:
        raise ValueError(f"has {data.shape[0]} channels, the dataset {channels}")
    body = np.flatnonzero((data > CT_BODY_HU).any(0))
    rng = np.random.default_rng(int(hashlib.sha1(case.name.encode()).hexdigest()[:8], 16))
    pick = body if body.size <= FINGERPRINT_SAMPLES else rng.choice(body, FINGERPRINT_SAMPLES, replace=False)
    samples = np.ascontiguousarray(data.reshape(data.shape[0], -1)[:, pick].T)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: np.save(f, samples), exclusive=True)  # a part drawing it too keeps its own
    return samples


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
    fingerprint = content_fingerprint(data)  # as read: before cropping, resampling and normalisation
    data, props = nnunet_preprocess(data, props, plans)
    seed = int(hashlib.sha1(case.name.encode()).hexdigest()[:8], 16)
    mask = body_mask(data, settings, seed)
    body = np.where(mask, 0, -1).astype(np.int8)[None]
    props.update(body_locations=body_locations(mask, seed), source_files=list(case.files),
                 content_fingerprint=fingerprint)
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
    case, channels, reader, cache = job
    try:
        return case.name, body_intensities(case, channels, reader, cache)
    except ValueError as e:
        return case.name, str(e)


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
        made_by = (f"run {plan_and_preprocess_command(name, configuration)} first"
                   if plans_name == "nnUNetPlans" else "run the planner that writes them first")
        raise UserError(f"--like {dataset}: {plans_file} not found ({made_by})")
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
                         processes: int = 4, file_ending: str | None = None,
                         part: tuple[int, int] | None = None) -> tuple[Path, Report]:
    """Create or extend ``$nnUNet_preprocessed/DatasetXXX_NAME`` from image folders (creating nnUNet_preprocessed
    if needed); ``part=(K, N)``: only part K of N of the cases, writing no shared file but the settings (see the
    module docstring)."""
    root = nnunet_folder("nnUNet_preprocessed", must_exist=False)
    full_name = f"Dataset{dataset_id:03d}_{name}"
    others = sorted(p.name for p in root.glob(f"Dataset{dataset_id:03d}_*") if p.name != full_name)
    if others:
        raise UserError(f"dataset id {dataset_id} is taken by {others[0]} in nnUNet_preprocessed: choose another -d")
    folder = root / full_name
    stored = folder / SETTINGS_FILE
    if folder.is_dir() and not stored.is_file() and any(not p.name.startswith(".") for p in folder.iterdir()):
        raise UserError(f"{folder} exists and was not written by nnUNetv2_hiendmae_preprocess_unlabeled: "
                        "choose another -d")
    created = not folder.exists()
    cases = find_cases(inputs, file_ending)
    if not cases:
        raise UserError(f"no images ({', '.join(FILE_ENDINGS)}) found in {' '.join(inputs)}")
    share = cases if part is None else cases[part[0]::part[1]]
    rest = [] if part is None else [c for i, c in enumerate(cases) if i % part[1] != part[0]]
    try:
        settings = _settings(settings_args, share + rest, processes, folder)  # its own cases read first
    except UserError:
        if created and part is None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    _store_settings(stored, settings, full_name)
    target = folder / DATA_IDENTIFIER
    staging = folder / (f".staging_{DATA_IDENTIFIER}" + (f"_part{part[0]}of{part[1]}" if part else ""))
    target.mkdir(parents=True, exist_ok=True)
    leftovers = [staging] if part else list(folder.glob(f".staging_{DATA_IDENTIFIER}*"))  # the parts' too
    for path in leftovers:  # of a killed run: never trusted
        shutil.rmtree(path, ignore_errors=True)
    staging.mkdir()
    if part is None:
        atomic_write_json(folder / "cases.json", {c.name: c.files for c in cases})
    plans = plans_for(full_name, settings, [0.0, 0.0, 0.0])
    report = Report()
    todo = [c for c in share if not (target / f"{c.name}.b2nd").is_file()]
    by_name = {c.name: c for c in cases}
    jobs = [(c, settings, plans, staging, target) for c in todo]
    desc = f"preprocessing {full_name}" + (f", part {part[0]} of {part[1]}" if part else "")
    for case, reason in parallel(_work, jobs, processes, desc):
        if reason is None:
            report.done += 1
        else:
            report.skipped[case] = {"files": by_name[case].files, "reason": reason}
            tqdm.write(f"skipped {case}: {reason}", file=sys.stderr)
    shutil.rmtree(staging, ignore_errors=True)
    if part is not None:
        report.already = len(share) - len(todo)
        return folder, report
    _write_dataset_files(folder, full_name, settings, cases, target, report)
    shutil.rmtree(folder / SAMPLES_FOLDER, ignore_errors=True)  # the statistics are stored with the settings
    if created and report.done == 0:  # nothing usable: leave no dataset that a later run would have to match
        shutil.rmtree(folder)
    return folder, report


def _store_settings(stored: Path, settings: Settings, full_name: str) -> None:
    """Write the settings if no run did (once: parts running at the same time all compute the same), else check
    that they equal those stored."""
    now = json.loads(json.dumps(asdict(settings)))
    stored.parent.mkdir(parents=True, exist_ok=True)
    if not stored.is_file() and atomic_write_json(stored, now, exclusive=True):
        return
    before = json.loads(json.dumps(asdict(Settings(**json.loads(stored.read_text())))))
    if before != now:
        changed = [k for k in before if before[k] != now.get(k)]
        raise UserError(f"{full_name} was preprocessed with other settings ({', '.join(changed)} differ): "
                        f"use another -d, or the settings of {stored}")


def _settings(args: dict, cases: list[Case], processes: int, folder: Path) -> Settings:
    """Settings from the flags, with the reader they name."""
    return replace(_normalisation_settings(args, cases, processes, folder), reader=args.get("reader"))


def channel_modalities(given: Sequence[str], channels: int, ct_window: bool) -> list[str]:
    """The modality of each of the pool's ``channels`` from ``--modality`` (one value for all, or one per channel).
    A CT window given for several channels under one value is refused: an MR channel would be clipped at the CT
    window without a word."""
    if len(given) not in (1, channels):
        raise UserError(f"--modality gives {len(given)} values for a pool of {channels} channel(s): give one for "
                        f"every channel or one per channel (CASE_0000, CASE_0001, ...)")
    if len(given) == 1 and channels > 1 and ct_window:
        raise UserError(f"--ct-window with one --modality for a pool of {channels} channels would clip every channel "
                        f"at the CT window: give the modality of each channel, e.g. --modality "
                        f"{' '.join(['CT'] * channels)} or --modality CT {' '.join(['MR'] * (channels - 1))}")
    return list(given) * (channels if len(given) == 1 else 1)


def _normalisation_settings(args: dict, cases: list[Case], processes: int, folder: Path) -> Settings:
    """Spacing and normalisation from the flags; CT without a window takes its statistics from a fingerprint of the
    pool (once: a re-run reuses the stored settings' statistics). The pool's statistics do not depend on the order of
    ``cases`` (read first to last) nor on who drew each case's samples (see :func:`body_intensities`)."""
    if args.get("like"):
        settings, _ = settings_like(args["like"], args["plans"], args["configuration"], args["patch_size"])
        return settings
    channels = len(cases[0].files)
    modalities = channel_modalities(args["modality"], channels, bool(args.get("ct_window")))
    spacing = [float(s) for s in args["spacing"]]
    schemes = [{"CT": "CTNormalization", "MR": "ZScoreNormalization"}[m] for m in modalities]
    modality = "+".join(modalities) if len(set(modalities)) > 1 else modalities[0]
    if modality == "MR":
        return Settings(channels, "MR", spacing, [0, 1, 2], ["ZScoreNormalization"] * channels, [False] * channels,
                        {str(c): {} for c in range(channels)}, patch_size=list(args["patch_size"]), source="spacing")
    if args.get("ct_window"):
        low, high = args["ct_window"]
        props = {str(c): ct_window_statistics(float(low), float(high)) if m == "CT" else {}
                 for c, m in enumerate(modalities)}
        return Settings(channels, modality, spacing, [0, 1, 2], schemes, [False] * channels, props,
                        patch_size=list(args["patch_size"]), source=f"ct-window {low} {high}")
    if modality != "CT":
        raise UserError(f"--modality {' '.join(modalities)}: a pool of CT and MR channels needs --ct-window LOW HIGH "
                        "for its CT channels (the pool's CT statistics are measured on all channels alike)")
    stored = folder / SETTINGS_FILE
    if stored.is_file():  # the pool's statistics were computed by the first run
        previous = json.loads(stored.read_text())
        if previous.get("source") == "fingerprint":
            return Settings(**previous)
    samples = {}
    jobs = [(c, channels, args.get("reader"), folder / SAMPLES_FOLDER) for c in cases]
    for case, result in parallel(_fingerprint_work, jobs, processes, "intensity fingerprint"):
        if not isinstance(result, str) and len(result):
            samples[case] = result
    if not samples:
        raise UserError("no readable CT image with voxels above -500 HU: cannot compute intensity statistics "
                        "(give --ct-window LOW HIGH)")
    pooled = np.concatenate([samples[case] for case in sorted(samples)])  # in case order: bit-identical statistics
    props = {str(c): intensity_statistics(pooled[:, c]) for c in range(channels)}
    return Settings(channels, "CT", spacing, [0, 1, 2], ["CTNormalization"] * channels, [False] * channels, props,
                    patch_size=list(args["patch_size"]), source="fingerprint")


def _write_dataset_files(folder: Path, full_name: str, settings: Settings, cases: list[Case], target: Path,
                         report: Report) -> None:
    """dataset.json, the plans, the fingerprint (spacings, shapes, intensity statistics) and skipped.json, from the
    cases that are complete (this run's and earlier runs')."""
    import pickle

    done = sorted(p.name[:-len(".b2nd")] for p in target.glob("*.b2nd") if not p.name.endswith("_seg.b2nd"))
    spacings, shapes, fingerprints = [], [], {}
    for case in done:
        with open(target / f"{case}.pkl", "rb") as f:
            props = pickle.load(f)
        spacings.append([float(s) for s in props["spacing"]])
        shapes.append([int(s) for s in props["shape_after_cropping_and_before_resampling"]])
        if "content_fingerprint" in props:  # cases written before fingerprints existed have none
            fingerprints[case] = props["content_fingerprint"]
    median = np.median([[n * s / t for n, s, t in zip(shape, [sp[i] for i in settings.transpose_forward],
                                                      settings.spacing)]
                        for shape, sp in zip(shapes, spacings)], axis=0) if done else [0.0, 0.0, 0.0]
    names = settings.modality.split("+")  # one modality for all channels, or one per channel
    atomic_write_json(folder / "dataset.json", {
        "channel_names": {str(c): names[c % len(names)] for c in range(settings.channels)},
        "labels": {"background": 0},
        "numTraining": len(done), "file_ending": ".nii.gz",
        "description": "unlabelled images for self-supervised pretraining (nnUNetv2_hiendmae_preprocess_unlabeled)"})
    atomic_write_json(folder / f"{PLANS}.json", plans_for(full_name, settings, median))
    atomic_write_json(folder / "dataset_fingerprint.json", {
        "spacings": spacings, "shapes_after_crop": shapes,
        "foreground_intensity_properties_per_channel": settings.intensity,
        "statistics_from": settings.source, "cases": done})
    atomic_write_json(folder / FINGERPRINTS_FILE, fingerprints)
    record_skipped(folder / "skipped.json", done, report.skipped)
    report.already = len(done) - report.done


def record_skipped(path: Path, done: Collection[str], skipped: dict) -> None:
    """Write ``skipped.json`` (case -> files and reason): this run's skipped cases, and those of earlier runs that
    are still not done."""
    previous = json.loads(path.read_text()) if path.is_file() else {}
    still = {k: v for k, v in previous.items() if k not in done and k not in skipped}
    atomic_write_json(path, {**still, **skipped})
