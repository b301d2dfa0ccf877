"""The folder users point ``nnUNet_extTrainer`` at, and helpers that check the variable.

nnU-Net imports every plain module of that folder as a *top-level* module (``__init__`` is skipped), so the folder
holds one uniquely named shim, ``hiendmae_ext_trainers.py``, that only re-exports the trainers from
``nnunetv2_hiendmae.trainers``. Kept free of torch/nnunetv2 imports so that ``nnUNetv2_hiendmae_ext_path`` is instant.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from nnunetv2_hiendmae.errors import ArgumentParser, cli_entry

ENV = "nnUNet_extTrainer"
EXPORT_LINE = f"export {ENV}=$(nnUNetv2_hiendmae_ext_path)"


def ext_path() -> Path:
    """Absolute path of this folder (the value for ``nnUNet_extTrainer``)."""
    return Path(__file__).resolve().parent


def ext_trainer_hint() -> str | None:
    """None if ``nnUNet_extTrainer`` already lists this folder, else the one line telling how to set it."""
    here = ext_path()
    for entry in os.environ.get(ENV, "").split(os.pathsep):
        if entry.strip() and Path(entry).expanduser().resolve() == here:
            return None
    return f"nnU-Net finds the nnunetv2_hiendmae trainers only with: {EXPORT_LINE}"


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    """``nnUNetv2_hiendmae_ext_path``: print the folder, for
    ``export nnUNet_extTrainer=$(nnUNetv2_hiendmae_ext_path)``."""
    ArgumentParser(
        prog="nnUNetv2_hiendmae_ext_path",
        description="Print the folder that nnU-Net's nnUNet_extTrainer variable must name so that nnUNetv2_train, "
                    "nnUNetv2_predict and nnUNetv2_find_best_configuration find the nnunetv2_hiendmae trainers.",
        epilog=f"usage in a shell:  {EXPORT_LINE}",
    ).parse_args(argv)
    print(ext_path())
