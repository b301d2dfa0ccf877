"""nnU-Net's folders and dataset names, looked up the way nnU-Net does it, with its errors turned into one line."""
from __future__ import annotations

import os
from pathlib import Path

from nnunetv2_hiendmae.errors import UserError


def nnunet_folder(variable: str) -> Path:
    """The folder an nnU-Net environment variable (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``)
    points at; it must be set and exist."""
    value = os.environ.get(variable)
    if not value:
        raise UserError(f"{variable} is not set; export it to the folder nnU-Net uses for it "
                        f"(see nnU-Net's documentation/setting_up_paths.md)")
    if not os.path.isdir(value):
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
            raise UserError(f"dataset {dataset!r} is ambiguous: more than one DatasetXXX_* folder has that id in "
                            "nnUNet_raw, nnUNet_preprocessed or nnUNet_results; give the full name") from None
        raise UserError(f"dataset {dataset!r} not found in nnUNet_raw, nnUNet_preprocessed or nnUNet_results "
                        "(give an id like 4 or a name like Dataset004_Hippocampus)") from None


def dataset_id(name: str) -> int:
    """The number in ``DatasetXXX_Name``."""
    return int(name[len("Dataset"):len("Dataset") + 3])
