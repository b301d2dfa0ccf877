"""The variant tables: trainer names as their product, each a class that changes one thing, the label-budget rule."""
from __future__ import annotations

import math

import pytest

from nnunetv2_hiendmae import trainers, variants
from nnunetv2_hiendmae.variants import Variant, budget_cases, trainer_name

# the names users and docs had before the tables: each must stay a trainer
NAMES_BEFORE = ["nnUNetTrainerHiEndMAE", "nnUNetTrainerHiEndMAE_scratch", "nnUNetTrainerHiEndMAE_recompute",
                "nnUNetTrainerHiEndMAE_scratch_recompute", "nnUNetTrainerHiEndMAE_100epochs",
                "nnUNetTrainerHiEndMAE_250epochs", "nnUNetTrainerHiEndMAE_smoke", "nnUNetTrainerHiEndMAE_demo",
                "nnUNetTrainerHiEndMAE_scratch_100epochs", "nnUNetTrainerHiEndMAE_scratch_250epochs",
                "nnUNetTrainerHiEndMAE_scratch_smoke", "nnUNetTrainerHiEndMAE_scratch_demo",
                "nnUNetTrainerHiEndMAEBaseline_smoke", "nnUNetTrainerHiEndMAEBaseline_demo"]


def test_earlier_names_are_kept_and_mean_what_they_meant():
    assert set(NAMES_BEFORE) <= set(trainers.__all__)
    t = trainers
    assert t.nnUNetTrainerHiEndMAE_scratch.load_pretrained is False and t.nnUNetTrainerHiEndMAE_scratch.layer_decay == 1
    assert t.nnUNetTrainerHiEndMAE_scratch_recompute.recompute_full_resolution
    assert not t.nnUNetTrainerHiEndMAE_scratch_recompute.load_pretrained
    assert t.nnUNetTrainerHiEndMAE_scratch_250epochs.schedule == variants.Schedule(epochs=250)
    assert t.nnUNetTrainerHiEndMAEBaseline_demo.schedule == variants.DEMO
    assert t.nnUNetTrainerHiEndMAEBaseline_smoke.__mro__[2] is trainers.nnUNetTrainer  # nnU-Net's default recipe


def test_every_generated_name_is_a_module_level_subclass_that_changes_one_thing():
    specs = list(variants.class_specs())
    assert len(specs) == len({s.name for s in specs})
    for spec in specs:
        cls = getattr(trainers, spec.name)
        assert (cls.__name__, cls.__qualname__, cls.__module__) == (spec.name, spec.name, "nnunetv2_hiendmae.trainers")
        parent = cls.__bases__[-1]
        assert parent.__name__ == spec.bases[-1]
        assert {k for k in vars(cls) if not k.startswith("__")} == set(spec.attributes), spec.name
        for key, value in spec.attributes.items():
            assert getattr(cls, key) == value and getattr(parent, key, None) != value, (spec.name, key)
        assert spec.name in trainers.__all__


def test_names_are_the_product_of_the_tables():
    vit = [trainer_name(Variant(arm, schedule, budget, recompute)) for arm in variants.FINE_TUNING
           for recompute in variants.MEMORY for schedule in variants.SCHEDULES
           for budget in (100, *variants.BUDGETS)]
    assert len(set(vit)) == 4 * 2 * 5 * 5 and set(vit) <= set(trainers.__all__)
    assert trainer_name(Variant("frozen", "250epochs", 10)) == "nnUNetTrainerHiEndMAE_frozen_250epochs_budget10"
    assert trainer_name(Variant("staged", "full", 100, True)) == "nnUNetTrainerHiEndMAE_staged_recompute"
    # nnU-Net's arm: nnU-Net's own trainer where it has one of that length, ours for the budgets and short schedules
    assert trainer_name(Variant("nnunet", "250epochs")) == "nnUNetTrainer_250epochs"
    assert trainer_name(Variant("nnunet")) == "nnUNetTrainer"
    assert trainer_name(Variant("nnunet", "250epochs", 5)) == "nnUNetTrainerHiEndMAEBaseline_250epochs_budget5"
    assert trainers.nnUNetTrainerHiEndMAEBaseline_250epochs_budget5.__bases__[-1].__name__ == "nnUNetTrainer_250epochs"
    assert not [n for n in trainers.__all__ if not n.startswith("nnUNetTrainerHiEndMAE")]  # never a built-in's name
    for name, variant in variants.VARIANTS.items():
        assert trainer_name(variant) == name


def test_short_labels_for_figures():
    assert variants.describe("nnUNetTrainerHiEndMAE_frozen_250epochs_budget10") == \
        ("frozen pretrained ViT", "250 epochs", "10 % labels")
    assert variants.describe("nnUNetTrainerHiEndMAE_scratch") == ("ViT from scratch", "", "")
    assert variants.describe("nnUNetTrainer_500epochs") == ("nnU-Net default", "500 epochs", "")
    assert variants.describe("nnUNetTrainerHiEndMAEBaseline_smoke_budget5") == \
        ("nnU-Net default", "smoke", "5 % labels")
    assert variants.describe("MyTrainer") == ("MyTrainer", "", "")


@pytest.mark.parametrize("n", [1, 2, 3, 7, 24, 100, 241])
def test_budget_subsets_are_nested_seeded_and_at_least_two(n):
    cases = [f"case_{i:03d}" for i in range(n)]
    for fold in (0, 3, "all"):
        subsets = {b: budget_cases(cases, b, fold) for b in (5, 10, 25, 50, 100)}
        for small, large in zip((5, 10, 25, 50), (10, 25, 50, 100)):
            assert set(subsets[small]) <= set(subsets[large])
        for b, subset in subsets.items():
            assert len(subset) == min(n, max(2, math.ceil(n * b / 100))) and subset == sorted(set(subset))
            assert set(subset) <= set(cases)
            assert budget_cases(list(reversed(cases)), b, fold) == subset  # the order nnU-Net lists them in
        assert subsets[100] == sorted(cases)
    if n >= 24:  # the seed is the fold's: another fold draws other cases
        assert budget_cases(cases, 10, 0) != budget_cases(cases, 10, 1)
    with pytest.raises(ValueError):
        budget_cases(cases, 0, 0)


def test_freezing_epochs():
    frozen, staged, never = variants.Freezing(1.0), variants.Freezing(0.1), variants.Freezing()
    assert [frozen.frozen(e, 10) for e in (0, 9)] == [True, True] and frozen.unfreeze_epoch(10) is None
    assert [staged.frozen(e, 1000) for e in (0, 99, 100)] == [True, True, False]
    assert staged.unfreeze_epoch(2) == 1 and staged.unfreeze_epoch(20) == 2  # at least one frozen, one learning
    assert not never.frozen(0, 10) and never.unfreeze_epoch(10) == 0
