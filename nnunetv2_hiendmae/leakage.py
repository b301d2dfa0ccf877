"""Content fingerprints of cases, and the leakage guard: did the pretraining see the images that the target dataset
validates or tests on? (docs/finetuning.md, "Leakage guard").

A pretraining pool that holds a copy of a target validation or test image makes every downstream figure on it
optimistic. File names do not tell (copies get renamed, converted to other formats); the content does: a case's
fingerprint is a hash of its voxel array **as nnU-Net's reader returns it from the source file**, before any
cropping, resampling or normalisation (:func:`content_fingerprint`). ``nnUNetv2_hiendmae_preprocess_unlabeled``
computes it for every case where it reads the case anyway; for labelled nnU-Net datasets it is computed from
``$nnUNet_raw`` (:func:`dataset_fingerprints`). The pretraining records the fingerprints of its cases in the checkpoint
(``pretrain["case_fingerprints"]``, case -> fingerprint) and ``nnUNetv2_hiendmae_plan`` compares them with the target
dataset's cases, fold by fold (:func:`check_checkpoint`).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.nnunet_paths import crossval_splits, dataset_name, nnunet_folder
from nnunetv2_hiendmae.workers import parallel

FINGERPRINTS_FILE = "content_fingerprints.json"  # case -> fingerprint, in a dataset made from unlabelled scans
DOMAIN = b"nnunetv2_hiendmae content fingerprint v1\0"  # a change of what is hashed must change every fingerprint
CHUNK = 1 << 22  # voxels hashed at a time (16 MiB of float32): memory stays small for any image
SHOWN = 8  # case names listed per fold in a warning


def content_fingerprint(image: np.ndarray) -> str:
    """SHA-256 (64 hex digits) of an image's content: the array ``[C, X, Y, Z]`` as nnU-Net's reader returns it
    (``read_images``: all channels, the file's own axis order), before cropping, resampling or normalisation.

    Hashed, in this order: :data:`DOMAIN`, the shape as little-endian int64 values, then every voxel in C order as a
    little-endian float32, with -0.0 written as 0.0 and every NaN as the same NaN. Values equal as float32 give
    equal fingerprints whatever the array's dtype, so a scan stored as int16 NIfTI and as float32 NRRD or MHA matches;
    a renamed file matches (the name is not hashed, nor the spacing, origin or direction); a reoriented, cropped,
    resampled or re-quantised version does not.
    """
    flat = np.ascontiguousarray(image).reshape(-1)
    h = hashlib.sha256(DOMAIN)
    h.update(np.asarray(image.shape, dtype="<i8").tobytes())
    for start in range(0, flat.size, CHUNK):
        part = np.add(flat[start:start + CHUNK], 0, dtype="<f4")  # a float32 copy; -0.0 + 0 is 0.0
        part[np.isnan(part)] = np.nan
        h.update(part)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ fingerprints of a dataset

def _fingerprint_job(job: tuple) -> tuple[str, str]:
    case, files, reader = job
    try:
        data, _ = reader().read_images(files)
    except Exception as e:  # noqa: BLE001 - any reader failure means the file cannot be compared
        raise UserError(f"{files[0]} cannot be read by {reader.__name__} ({type(e).__name__}) to compare its "
                        "content with the pretraining") from None
    return case, content_fingerprint(data)


def dataset_fingerprints(dataset: str | int, folder: str = "imagesTr", processes: int = 4,
                         progress: bool = True, only: Collection[str] | None = None) -> dict[str, str] | None:
    """``{case: content fingerprint}`` of a labelled nnU-Net dataset's images in ``$nnUNet_raw/<dataset>/<folder>``
    (``imagesTr``: nnU-Net's training cases, also those a dataset.json lists under ``dataset``; ``imagesTs``: the
    test images, ``{}`` when there are none), read with nnU-Net's reader for the dataset's file ending (or its
    ``overwrite_image_reader_writer``), in ``processes`` worker processes with a progress bar; ``only``: just these
    cases (the others are not read).

    ``None`` when ``nnUNet_raw`` is unset or does not hold the dataset. An unreadable image raises UserError.
    """
    raw = os.environ.get("nnUNet_raw")
    name = dataset_name(dataset)
    base = Path(raw) / name if raw else None
    if base is None or not (base / "dataset.json").is_file():
        return None
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import (
        create_lists_from_splitted_dataset_folder,
        get_filenames_of_train_images_and_targets,
        get_identifiers_from_splitted_dataset_folder,
    )

    dataset_json = json.loads((base / "dataset.json").read_text())
    if folder == "imagesTr":
        cases = {k: v["images"] for k, v in get_filenames_of_train_images_and_targets(str(base), dataset_json).items()}
    elif (base / folder).is_dir():
        ending = dataset_json["file_ending"]
        identifiers = get_identifiers_from_splitted_dataset_folder(str(base / folder), ending)
        files = create_lists_from_splitted_dataset_folder(str(base / folder), ending, identifiers)
        cases = dict(zip(identifiers, files))
    else:
        cases = {}
    if only is not None:
        wanted = set(only)
        cases = {case: files for case, files in cases.items() if case in wanted}
    if not cases:
        return {}
    reader = determine_reader_writer_from_dataset_json(dataset_json, next(iter(cases.values()))[0], verbose=False)
    jobs = [(case, list(files), reader) for case, files in sorted(cases.items())]
    return dict(parallel(_fingerprint_job, jobs, processes, f"content fingerprints of {name}/{folder}", failed=None,
                         progress=progress))


def pretraining_fingerprints(dataset: str | int, identifiers: Sequence[str] | None = None, processes: int = 4,
                             progress: bool = True) -> dict[str, str] | None:
    """``{case: content fingerprint}`` of the cases a pretraining on ``dataset`` reads (all, or ``identifiers``):
    stored by ``nnUNetv2_hiendmae_preprocess_unlabeled`` (:data:`FINGERPRINTS_FILE`; no image is read), else those
    of the labelled dataset's ``imagesTr`` in ``$nnUNet_raw``; ``None`` when neither holds it."""
    stored = nnunet_folder("nnUNet_preprocessed") / dataset_name(dataset) / FINGERPRINTS_FILE
    found = (json.loads(stored.read_text()) if stored.is_file()
             else dataset_fingerprints(dataset, "imagesTr", processes, progress, only=identifiers))
    if found is None or identifiers is None:
        return found
    return {case: found[case] for case in identifiers if case in found}


# --------------------------------------------------------------------------------------------- the leakage check

@dataclass
class Leaks:
    """Target cases the pretraining saw, each with the pretraining cases of the same content (or of the same name,
    where the pretraining read the target dataset itself), per fold of nnU-Net's ``splits``."""

    dataset: str
    splits: list[dict]  # nnU-Net's folds: [{"train": [...], "val": [...]}, ...]
    folds: list[int]  # the folds checked
    validation: dict[int, dict[str, list[str]]] = field(default_factory=dict)  # fold -> case -> pretraining cases
    test: dict[str, list[str]] = field(default_factory=dict)  # imagesTs case -> pretraining cases
    compared: int = 0  # target cases compared by content (0: by name only)

    def add(self, seen: dict[str, list[str]]) -> None:
        """Record training cases the pretraining saw (case -> pretraining cases) under the folds validating on them."""
        for f in self.folds:
            found = self.validation.setdefault(f, {})
            for case in sorted(set(self.splits[f]["val"]) & set(seen)):
                found[case] = sorted({*found.get(case, []), *seen[case]})

    @property
    def found(self) -> bool:
        return bool(self.test) or any(self.validation.values())


def _matches(pretrain_fingerprints: dict[str, str], target: dict[str, str]) -> dict[str, list[str]]:
    """target case -> the pretraining cases of the same content, for the target cases the pretraining holds."""
    by_content: dict[str, list[str]] = {}
    for case, fingerprint in pretrain_fingerprints.items():
        by_content.setdefault(fingerprint, []).append(case)
    return {case: sorted(by_content[fp]) for case, fp in sorted(target.items()) if fp in by_content}


def _no_leaks(dataset: str, identifiers: Sequence[str], folds: Sequence[int] | None) -> Leaks | None:
    """Nothing found yet, for nnU-Net's folds of the dataset (its splits_final.json, else nnU-Net's default split of
    ``identifiers``); ``folds``: those checked (default: all). None without a split file or identifiers."""
    preprocessed = nnunet_folder("nnUNet_preprocessed", must_exist=False) / dataset
    if not identifiers and not (preprocessed / "splits_final.json").is_file():
        return None
    splits = crossval_splits(preprocessed, identifiers)[0]
    folds = list(range(len(splits))) if folds is None else [f for f in folds if 0 <= f < len(splits)]
    return Leaks(dataset, splits, folds)


def _preprocessed_identifiers(dataset: str) -> list[str]:
    """The cases of the dataset's preprocessed nnUNetPlans_3d_fullres data (those nnU-Net's default split is made
    of), for when nnUNet_raw does not hold the dataset."""
    folder = nnunet_folder("nnUNet_preprocessed", must_exist=False) / dataset / "nnUNetPlans_3d_fullres"
    return sorted(p.stem for p in folder.glob("*.pkl"))


def leaked_cases(pretrain_fingerprints: dict[str, str], dataset: str | int, folds: Sequence[int] | None = None,
                 processes: int = 4, progress: bool = True) -> Leaks | None:
    """The validation cases of nnU-Net's ``folds`` (default: every fold of its splits_final.json, else of nnU-Net's
    default 5-fold split) and the ``imagesTs`` cases of a labelled dataset whose content, read from ``$nnUNet_raw``
    (:func:`dataset_fingerprints`), is among ``pretrain_fingerprints`` (pretraining case -> fingerprint); ``None``
    when nnUNet_raw does not hold the dataset."""
    name = dataset_name(dataset)
    train = dataset_fingerprints(name, "imagesTr", processes, progress)
    if train is None:
        return None
    test = dataset_fingerprints(name, "imagesTs", processes, progress) or {}
    leaks = _no_leaks(name, sorted(train), folds)
    leaks.add(_matches(pretrain_fingerprints, train))
    leaks.test, leaks.compared = _matches(pretrain_fingerprints, test), len(train) + len(test)
    return leaks


def _listing(cases: dict[str, list[str]], with_sources: bool) -> str:
    shown = [f"{case} (as {', '.join(sources[:2])}{' ...' if len(sources) > 2 else ''})" if with_sources else case
             for case, sources in sorted(cases.items())[:SHOWN]]
    return ", ".join(shown) + (f" and {len(cases) - SHOWN} more" if len(cases) > SHOWN else "")


def leakage_warning(leaks: Leaks, strict: bool = False) -> list[str]:
    """Warning lines naming, per fold, the validation cases (and the imagesTs cases) the pretraining saw, each with
    the pretraining cases it was seen as; ``[]`` when it saw none. With ``strict`` a leak raises UserError (one
    line) instead."""
    groups = [(f"fold {f} validation", cases) for f, cases in leaks.validation.items() if cases]
    groups += [("imagesTs", leaks.test)] if leaks.test else []
    if not groups:
        return []
    total = sum(len(cases) for _, cases in groups)
    if strict:
        raise UserError(f"the pretraining saw {total} validation or test case(s) of {leaks.dataset} (--strict): "
                        + "; ".join(f"{group}: {_listing(cases, False)}" for group, cases in groups))
    return ([f"the pretraining saw {total} validation or test case(s) of {leaks.dataset}; figures on them are "
             "optimistic:"]
            + [f"  {group}: {_listing(cases, True)}" for group, cases in groups]
            + ["  pretrain without them (on this dataset itself: with --fold F, then fine-tune fold F only); "
               "--strict makes this an error"])


def pretraining_datasets(pretrain: dict) -> list[str]:
    """The names of the datasets a checkpoint's ``pretrain`` block says it read (``datasets``: names, or records
    with a ``name``, docs/checkpoint_format.md)."""
    return [d if isinstance(d, str) else d.get("name") for d in pretrain.get("datasets") or []]


def _pretrained_on(pretrain: dict, dataset: str) -> bool:
    return dataset in pretraining_datasets(pretrain)


def check_checkpoint(pretrain: dict, dataset: str, strict: bool = False, processes: int = 4,
                     scored_folds: Sequence[int] | None = None,
                     progress: bool = True) -> tuple[list[str], list[str]]:
    """The leakage guard of ``nnUNetv2_hiendmae_plan``: ``(warnings, notes)`` about the validation and imagesTs
    cases of the target ``dataset`` (``DatasetXXX_Name``) that a checkpoint's pretraining (its ``pretrain`` block)
    saw; with ``strict``, UserError when it saw any. ``scored_folds``: only the validation cases of these folds, those
    a command scores (the linear probe, a study, a comparison), are checked. ``progress``: a bar while the dataset's
    images are read.

    By content (:func:`leaked_cases`) when the checkpoint records ``case_fingerprints`` and nnUNet_raw holds the
    dataset; by name where the pretraining read the dataset itself (``datasets``): all its cases, or, with a recorded
    ``fold`` F, the training cases of fold F, whose plans then serve fold F only, so only fold F is checked (by
    content too: the guard confirms the fold rather than trusting it). Without fingerprints (older or imported
    checkpoints) a note says that the content cannot be checked; for a checkpoint read from nnssl, which records no
    case list at all, the note names the pretraining dataset it does record.
    """
    fingerprints = pretrain.get("case_fingerprints") or {}
    own = _pretrained_on(pretrain, dataset)
    fold = pretrain.get("fold") if own else None
    folds = list(scored_folds) if scored_folds is not None else None if fold is None else [fold]
    leaks = leaked_cases(fingerprints, dataset, folds, processes, progress) if fingerprints else None
    if leaks is not None and scored_folds is not None:
        leaks.test = {}
    notes = []
    if pretrain.get("source") == "nnssl":
        notes.append(f"nnssl records no list of its pretraining cases (this checkpoint names only its pretraining "
                     f"dataset, {pretrain.get('nnssl_dataset') or 'unnamed'}): whether it saw {dataset}'s "
                     "validation or test images cannot be checked; make sure that dataset holds none of them")
    elif not fingerprints:
        notes.append("the checkpoint records no content fingerprints of its pretraining cases: whether it saw this "
                     "dataset's validation or test images cannot be checked"
                     + (f" (checked by name: it pretrained on {dataset} itself)" if own else ""))
    elif leaks is None:
        notes.append(f"{dataset} is not in nnUNet_raw: its images cannot be compared with the pretraining's")
    leaks = leaks or _no_leaks(dataset, _preprocessed_identifiers(dataset), folds)
    if leaks is None:
        return [], notes
    if own:
        in_fold = fold is not None and 0 <= fold < len(leaks.splits)
        cases = leaks.splits[fold]["train"] if in_fold else leaks.splits[0]["train"] + leaks.splits[0]["val"]
        leaks.add({case: [f"{dataset}/{case}"] for case in cases})
        if fold is not None and scored_folds is None:
            notes.append(f"pretrained on the training cases of fold {fold} of {dataset}: use these plans for fold "
                         f"{fold} only (the other folds validate on cases the encoder saw)")
    warnings = leakage_warning(leaks, strict)
    if not warnings and leaks.compared:
        test = "" if scored_folds is not None else " and no imagesTs case"
        notes.append(f"leakage guard: no validation case of fold(s) {', '.join(map(str, leaks.folds))}{test} of "
                     f"{dataset} is among the {len(fingerprints)} pretraining cases (compared by content)")
    return warnings, notes
