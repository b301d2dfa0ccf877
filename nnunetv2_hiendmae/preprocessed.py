"""A dataset's nnU-Net-preprocessed data for one plans and configuration, found and checked as nnU-Net uses it (one
line for each thing that can be missing), and its cross-validation folds. Read-only: nothing is ever written into
``$nnUNet_preprocessed`` (nnU-Net's default split of a dataset without ``splits_final.json`` is made in memory)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.nnunet_paths import crossval_splits, dataset_name, nnunet_folder, plan_and_preprocess_command
from nnunetv2_hiendmae.nnunet_paths import dataset_id as nnunet_dataset_id


@dataclass
class PreprocessedData:
    """One dataset's preprocessed cases of one configuration: where they are and how they were preprocessed."""

    dataset_name: str
    folder: str  # the configuration's data_identifier folder
    identifiers: list[str]
    plans: dict  # plans_name, transpose_forward, foreground_intensity_properties_per_channel
    configuration: dict  # the resolved configuration (inheritance applied)
    dataset_json: dict
    fold: int | None = None  # the cases are fold F's training cases (else all)
    plans_manager: Any = field(default=None, repr=False, compare=False)  # nnU-Net's PlansManager, parsed once

    @property
    def channel_names(self) -> dict:
        """dataset.json's ``channel_names`` (``{"0": "CT", ...}``)."""
        return self.dataset_json["channel_names"]


def fold_split(base: str | os.PathLike, identifiers: list[str], fold: int) -> tuple[list[str], list[str]]:
    """Training and validation cases of nnU-Net fold ``fold`` of the dataset whose preprocessed folder is ``base``,
    each sorted (:func:`~nnunetv2_hiendmae.nnunet_paths.crossval_splits`). ``identifiers`` are its preprocessed
    cases; a split naming others, a fold out of range, or nnU-Net's default split of fewer than 5 cases is a
    :class:`UserError`."""
    if not (Path(base) / "splits_final.json").is_file() and len(identifiers) < 5:
        raise UserError(f"nnU-Net's default 5-fold split needs at least 5 cases, {base} has {len(identifiers)}: "
                        f"write a splits_final.json there")
    splits, origin = crossval_splits(base, identifiers)
    if not 0 <= fold < len(splits):
        raise UserError(f"fold {fold} is out of range: {origin} has folds 0-{len(splits) - 1}")
    train, val = (sorted(str(k) for k in splits[fold][part]) for part in ("train", "val"))
    missing = sorted(set(train + val) - set(identifiers))
    if missing:
        raise UserError(f"{origin} fold {fold} lists cases that are not preprocessed: {', '.join(missing[:5])}")
    return train, val


def find_preprocessed(dataset: str | int, plans: str = "nnUNetPlans", configuration: str = "3d_fullres",
                      fold: int | None = None) -> PreprocessedData:
    """Find and check one dataset's plans, configuration and data folder (``fold``: keep only its training cases)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    name = dataset_name(dataset)
    dataset_id = nnunet_dataset_id(name)
    base = nnunet_folder("nnUNet_preprocessed") / name
    plan_and_preprocess = f"`{plan_and_preprocess_command(name, configuration)}`"
    if not base.is_dir():
        raise UserError(f"{base} not found; {plan_and_preprocess} creates it")
    plans_file = base / f"{plans}.json"
    if not plans_file.is_file():
        raise UserError(f"plans file {plans_file} not found; {plan_and_preprocess} creates nnUNetPlans (other plans "
                        f"names come from their own planner)")
    if not (base / "dataset.json").is_file():
        raise UserError(f"{base / 'dataset.json'} not found; {plan_and_preprocess} creates it")
    manager = PlansManager(str(plans_file))
    if configuration not in manager.available_configurations:
        raise UserError(f"configuration {configuration!r} is not in {plans_file}; available: "
                        f"{', '.join(manager.available_configurations)}")
    config = manager.get_configuration(configuration).configuration
    folder = base / config["data_identifier"]
    create = f"`nnUNetv2_preprocess -d {dataset_id} -plans_name {plans} -c {configuration}` creates it"
    if not folder.is_dir():
        raise UserError(f"preprocessed data folder {folder} not found; {create}")
    try:
        dataset_class = infer_dataset_class(str(folder))
    except (AssertionError, KeyError):
        raise UserError(f"preprocessed data folder {folder} is empty or holds mixed file types; {create}") from None
    identifiers = sorted(dataset_class.get_identifiers(str(folder)))
    if not identifiers:
        raise UserError(f"preprocessed data folder {folder} has no cases; {create}")
    if fold is not None:
        identifiers = fold_split(base, identifiers, fold)[0]
    return PreprocessedData(
        dataset_name=name, folder=str(folder), identifiers=identifiers,
        plans={"plans_name": plans, "transpose_forward": manager.transpose_forward,
               "foreground_intensity_properties_per_channel": manager.foreground_intensity_properties_per_channel},
        configuration=config, dataset_json=json.loads((base / "dataset.json").read_text()), plans_manager=manager,
        fold=fold)
