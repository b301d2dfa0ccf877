"""nnU-Net's folders and dataset names, looked up the way nnU-Net does it, with its errors turned into one line."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from nnunetv2_hiendmae.errors import UserError


def nnunet_folder(variable: str, must_exist: bool = True) -> Path:
    """The folder an nnU-Net environment variable (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``)
    points at; it must be set and, unless ``must_exist`` is False (a command that creates it when it writes there,
    as nnU-Net's do), exist."""
    value = os.environ.get(variable)
    if not value:
        raise UserError(f"{variable} is not set; export it to the folder nnU-Net uses for it "
                        f"(see nnU-Net's documentation/setting_up_paths.md)")
    if os.path.exists(value) and not os.path.isdir(value):
        raise UserError(f"{variable}={value} is not a folder")
    if must_exist and not os.path.isdir(value):
        raise UserError(f"{variable}={value} does not exist or is not a folder")
    return Path(value)


def dataset_name(dataset: str | int) -> str:
    """``DatasetXXX_Name`` for an id (``4``) or a name, by nnU-Net's own lookup (nnUNet_raw, nnUNet_preprocessed and
    nnUNet_results are searched)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return str(maybe_convert_to_dataset_name(str(dataset)))
    except (RuntimeError, ValueError) as e:
        if "More than one" in str(e):
            named = sorted({p.name for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
                            if os.environ.get(var) for p in Path(os.environ[var]).glob(f"Dataset{int(dataset):03d}_*")
                            if p.is_dir()})
            raise UserError(f"dataset {dataset!r} is ambiguous: {', '.join(named)} have that id in nnUNet_raw, "
                            "nnUNet_preprocessed or nnUNet_results; give the full name of one") from None
        raise UserError(f"dataset {dataset!r} not found in nnUNet_raw, nnUNet_preprocessed or nnUNet_results "
                        "(give an id like 4 or a name like Dataset004_Hippocampus)") from None


def dataset_id(name: str) -> int:
    """The number in ``DatasetXXX_Name``."""
    return int(name[len("Dataset"):len("Dataset") + 3])


def plan_and_preprocess_command(name: str, configuration: str) -> str:
    """The nnU-Net command that plans and preprocesses dataset ``name`` (``DatasetXXX_Name``) for ``configuration``:
    by id, the only form its ``-d`` takes, and one configuration, not all of them."""
    return f"nnUNetv2_plan_and_preprocess -d {dataset_id(name)} -c {configuration}"


DEFAULT_SPLIT = "nnU-Net's default 5-fold split"


def crossval_folds(preprocessed: str | os.PathLike, folds: Sequence[int] | None = None) -> tuple[list[int], str]:
    """The folds a command runs over and the split they come from: ``folds`` (default: every fold of the dataset's
    ``splits_final.json`` in its preprocessed folder, else nnU-Net's default 5, which its first training writes to
    that file). A fold the split lacks is a :class:`UserError`: for it nnU-Net would make a random split of its own,
    whose validation cases overlap the other folds'."""
    splits_file = Path(preprocessed) / "splits_final.json"
    available, source = ((list(range(len(json.loads(splits_file.read_text())))), str(splits_file))
                         if splits_file.is_file() else (list(range(5)), DEFAULT_SPLIT))
    if folds is None:
        return available, source
    lacking = [f for f in folds if f not in available]
    if lacking:
        raise UserError(f"fold {lacking[0]} is not in {source}, which has {len(available)} fold(s) "
                        f"({' '.join(map(str, available))}): choose among them, or leave out -f to run them all")
    return list(folds), source


def crossval_splits(preprocessed: str | os.PathLike, identifiers: Sequence[str]) -> tuple[list[dict], str]:
    """nnU-Net's cross-validation folds of a dataset, ``([{"train": [...], "val": [...]}, ...], where from)``: its
    ``splits_final.json`` in the preprocessed folder if there is one, else the 5-fold split that nnU-Net's trainer
    would create for these case identifiers (``nnUNetTrainer.do_split``: sorted, seed 12345), computed in memory."""
    splits_file = Path(preprocessed) / "splits_final.json"
    if splits_file.is_file():
        return json.loads(splits_file.read_text()), str(splits_file)
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    return generate_crossval_split(sorted(identifiers), seed=12345, n_splits=5), DEFAULT_SPLIT
