"""Fine-tuning variants as data: the small tables whose product makes the trainer names, and the label-budget rule.

A trainer name is ``nnUNetTrainerHiEndMAE`` + fine-tuning + memory + schedule + label budget, one suffix from each
table (``""`` where a table's default applies), e.g. ``nnUNetTrainerHiEndMAE_frozen_250epochs_budget10``. nnU-Net's
default trainer on our schedules and budgets is ``nnUNetTrainerHiEndMAEBaseline`` + schedule + budget, built on
nnU-Net's own trainer of that length where nnU-Net has one (``nnUNetTrainer_250epochs``). Every name is a class of
:mod:`nnunetv2_hiendmae.trainers`, a subclass of the name one suffix shorter that changes that one thing; adding a
budget or a schedule is one entry here. Kept free of torch and nnU-Net imports, so that command-line tools read names
(figure labels, the study's runs) without seconds of start-up.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

PREFIX = "nnUNetTrainerHiEndMAE"
BASELINE_PREFIX = "nnUNetTrainerHiEndMAEBaseline"
NNUNET_ARM = "nnunet"  # the study's name for nnU-Net's default trainer and network
FULL_BUDGET = 100  # percent: every training case of the fold, no suffix
BUDGET_SEED = 12345  # nnU-Net's own cross-validation seed, plus the fold


@dataclass(frozen=True)
class Schedule:
    """Training length. ``warmup_epochs=None``: 50 epochs (nnU-Net's warm-up), at most 10% of a short run, min 1.
    ``test_time_mirroring=False``: validation and prediction without nnU-Net's mirrored passes (8 per tile in 3D),
    training augmentation unchanged; for the seconds-long checks only."""

    epochs: int
    iterations: int = 250
    val_iterations: int = 50
    warmup_epochs: int | None = None
    test_time_mirroring: bool = True

    def warmup(self) -> int:
        return self.warmup_epochs if self.warmup_epochs is not None else max(1, min(50, self.epochs // 10))


DEFAULT = Schedule(epochs=1000)  # nnU-Net's default length
SMOKE = Schedule(epochs=2, iterations=3, val_iterations=2, warmup_epochs=1, test_time_mirroring=False)  # CPU tests
DEMO = Schedule(epochs=6, iterations=10, val_iterations=3)  # CPU demo: ~3 min per trainer on 2 cores


@dataclass(frozen=True)
class Freezing:
    """Which epochs train with the ViT encoder frozen (the UNETR decoder always learns).

    ``share`` of the run's epochs, counted from the start: 0 never (full fine-tuning), 1 always (the linear-probe
    analogue inside nnU-Net), in between the first epochs only (staged fine-tuning: afterwards the encoder joins with
    a linear warm-up of its own).
    """

    share: float = 0.0

    def unfreeze_epoch(self, epochs: int) -> int | None:
        """First epoch the encoder learns in (``share`` of ``epochs``, at least 1, before the last); None: never."""
        if self.share >= 1:
            return None
        if self.share <= 0:
            return 0
        return min(epochs - 1, max(1, round(self.share * epochs)))

    def frozen(self, epoch: int, epochs: int) -> bool:
        """Whether the encoder is frozen in ``epoch`` (0-based) of a run of ``epochs``."""
        start = self.unfreeze_epoch(epochs)
        return start is None or epoch < start


@dataclass(frozen=True)
class Option:
    """One entry of a name table: the suffix it adds, the class attributes it sets, how figures call it and one line
    on what it changes (the generated class's docstring)."""

    suffix: str
    attributes: Mapping[str, object] = field(default_factory=dict)
    label: str = ""
    about: str = ""


# what the ViT starts from and when it learns; the keys are the study's arm names
FINE_TUNING = {
    "pretrained": Option("", {}, "pretrained ViT", "fine-tunes the pretrained encoder end to end"),
    "scratch": Option("_scratch", {"load_pretrained": False, "layer_decay": 1.0}, "ViT from scratch",
                      "random initialisation, no layer-wise decay (it protects pretrained features and would only "
                      "slow a random encoder down): the baseline that isolates the effect of pretraining"),
    "frozen": Option("_frozen", {"freezing": Freezing(1.0)}, "frozen pretrained ViT",
                     "the pretrained encoder never learns, the UNETR decoder does (the linear-probe analogue)"),
    "staged": Option("_staged", {"freezing": Freezing(0.1)}, "staged pretrained ViT",
                     "the pretrained encoder is frozen for the first 10 % of the epochs, then learns, with a "
                     "warm-up of its own"),
}
MEMORY = {
    False: Option(""),
    True: Option("_recompute", {"recompute_full_resolution": True}, "recompute",
                 "recomputes the full-resolution blocks in the backward: the same gradients for less activation "
                 "memory (docs/benchmarks.md has the memory and FLOPs it trades)"),
}
SCHEDULES = {
    "full": Option("", {"schedule": DEFAULT}, "1000 epochs", "nnU-Net's 1000 epochs"),
    "100epochs": Option("_100epochs", {"schedule": Schedule(epochs=100)}, "100 epochs", "100 epochs"),
    "250epochs": Option("_250epochs", {"schedule": Schedule(epochs=250)}, "250 epochs", "250 epochs"),
    "smoke": Option("_smoke", {"schedule": SMOKE}, "smoke", "2 epochs x 3 iterations, no test-time mirroring (tests)"),
    "demo": Option("_demo", {"schedule": DEMO}, "demo", "6 epochs x 10 iterations (the CPU demo)"),
}
# nnU-Net's own trainer of a schedule's length, the nnU-Net arm's trainer at the full label budget
NNUNET_TRAINERS = {"full": "nnUNetTrainer", "100epochs": "nnUNetTrainer_100epochs",
                   "250epochs": "nnUNetTrainer_250epochs"}
BUDGETS = {percent: Option(f"_budget{percent}", {"label_budget": percent}, f"{percent} % labels",
                           f"trains on {percent} % of the fold's training cases (a nested, seeded subset; the "
                           "fold's whole validation set)")
           for percent in (5, 10, 25, 50)}
ARMS = (*FINE_TUNING, NNUNET_ARM)
ARM_LABELS = {**{arm: option.label for arm, option in FINE_TUNING.items()}, NNUNET_ARM: "nnU-Net default"}


@dataclass(frozen=True)
class Variant:
    """What a trainer name stands for: the arm, the schedule (a key of SCHEDULES), the label budget in percent."""

    arm: str
    schedule: str = "full"
    budget: int = FULL_BUDGET
    recompute: bool = False


def _budget_option(budget: int) -> Option:
    return Option("") if budget == FULL_BUDGET else BUDGETS[budget]


def trainer_name(variant: Variant) -> str:
    """The trainer name of a variant; for the nnU-Net arm at the full budget, nnU-Net's own trainer of that length
    where it has one (so existing nnU-Net results are reused). KeyError for an arm, schedule or budget not tabled."""
    schedule, budget = SCHEDULES[variant.schedule], _budget_option(variant.budget)
    if variant.arm == NNUNET_ARM:
        if variant.budget == FULL_BUDGET and variant.schedule in NNUNET_TRAINERS:
            return NNUNET_TRAINERS[variant.schedule]
        return BASELINE_PREFIX + schedule.suffix + budget.suffix
    return PREFIX + FINE_TUNING[variant.arm].suffix + MEMORY[variant.recompute].suffix + schedule.suffix + budget.suffix


@dataclass(frozen=True)
class ClassSpec:
    """A trainer class to generate: its name, its bases (names: ours, nnU-Net's, or the mixins of
    :mod:`nnunetv2_hiendmae.trainers`), the attributes it sets and its docstring."""

    name: str
    bases: tuple[str, ...]
    attributes: Mapping[str, object]
    doc: str


def class_specs() -> Iterator[ClassSpec]:
    """Every generated trainer class, parents before children. ``nnUNetTrainerHiEndMAE`` itself (the recipe) is
    written by hand; each other name derives from the name without its last suffix and sets that suffix's attributes
    (a budget also brings the ``_LabelBudget`` mixin)."""
    for arm, tuning in FINE_TUNING.items():
        for recompute, memory in MEMORY.items():
            for schedule_key, schedule in SCHEDULES.items():
                for budget in (FULL_BUDGET, *BUDGETS):
                    if budget != FULL_BUDGET:
                        parent, option = Variant(arm, schedule_key, FULL_BUDGET, recompute), BUDGETS[budget]
                    elif schedule.suffix:
                        parent, option = Variant(arm, "full", budget, recompute), schedule
                    elif recompute:
                        parent, option = Variant(arm, "full", budget, False), memory
                    elif tuning.suffix:
                        parent, option = Variant("pretrained"), tuning
                    else:
                        continue  # nnUNetTrainerHiEndMAE, the hand-written recipe
                    name, parent = trainer_name(Variant(arm, schedule_key, budget, recompute)), trainer_name(parent)
                    bases = ("_LabelBudget", parent) if budget != FULL_BUDGET else (parent,)
                    yield ClassSpec(name, bases, dict(option.attributes), f"As {parent}; {option.about}.")
    for schedule_key, schedule in SCHEDULES.items():
        base = NNUNET_TRAINERS.get(schedule_key)
        if base is None:
            base = BASELINE_PREFIX + schedule.suffix
            yield ClassSpec(base, ("_Scheduled", "nnUNetTrainer"), dict(schedule.attributes),
                            f"nnU-Net's default network and recipe, {schedule.about} (a fair CNN reference).")
        for budget, option in BUDGETS.items():
            yield ClassSpec(trainer_name(Variant(NNUNET_ARM, schedule_key, budget)), ("_LabelBudget", base),
                            dict(option.attributes), f"As {base}; {option.about}.")


def _variants_by_name() -> dict[str, Variant]:
    names = {}
    for arm in ARMS:
        for recompute in MEMORY if arm != NNUNET_ARM else (False,):
            for schedule in SCHEDULES:
                for budget in (FULL_BUDGET, *BUDGETS):
                    variant = Variant(arm, schedule, budget, recompute)
                    names[trainer_name(variant)] = variant
    return names


VARIANTS = _variants_by_name()  # every trainer name of the tables (and nnU-Net's of our schedules) -> its variant
_NNUNET_EPOCHS = re.compile(r"^nnUNetTrainer_(\d+)epochs?$")


def describe(trainer: str) -> tuple[str, str, str]:
    """Short (arm, schedule, budget) labels of a trainer name for figures, e.g. ("frozen pretrained ViT",
    "250 epochs", "10 % labels"); "" where a table's default applies, the name itself (without ``nnUNetTrainer``)
    for a trainer outside the tables."""
    variant = VARIANTS.get(trainer)
    if variant is not None:
        arm = ARM_LABELS[variant.arm] + (" (recompute)" if variant.recompute else "")
        schedule = "" if variant.schedule == "full" else SCHEDULES[variant.schedule].label
        return arm, schedule, _budget_option(variant.budget).label
    match = _NNUNET_EPOCHS.match(trainer)
    if match:
        return ARM_LABELS[NNUNET_ARM], f"{match.group(1)} epochs", ""
    return trainer.removeprefix("nnUNetTrainer").lstrip("_") or trainer, "", ""


def budget_cases(train_cases: Sequence[str], percent: int, fold: int | str) -> list[str]:
    """The cases of a label budget: ``ceil(percent/100 * N)`` of a fold's N training cases, at least 2 (all if N < 2),
    sorted.

    The cases are the first of one seeded permutation of the sorted list (seed ``BUDGET_SEED + fold``, numpy's legacy
    ``RandomState`` as nnU-Net's own split, stable across numpy versions), so smaller budgets are subsets of larger
    ones and every trainer of a fold gets the same cases. ValueError for a percent outside 1-100.
    """
    if not 0 < percent <= 100:
        raise ValueError(f"label budget {percent} % is not in (0, 100]")
    ordered = sorted(train_cases)
    seed = BUDGET_SEED + (fold if isinstance(fold, int) else 0)
    ranked = [ordered[i] for i in np.random.RandomState(seed).permutation(len(ordered))]
    count = min(len(ordered), max(2, -(-len(ordered) * percent // 100)))
    return sorted(ranked[:count])
