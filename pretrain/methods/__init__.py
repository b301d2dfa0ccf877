"""Pretraining methods behind one registry: ``--method NAME`` -> an entry of :data:`METHODS`.

A method is its **model** (one module of this package, a class that fulfils
:class:`~pretrain.methods.contract.PretrainingModel`) and one registry entry here: its **settings** (a dataclass of
its hyper-parameters with defaults and help texts; they become the command's flags, grouped under the method's name in
``--help``; it also says which views of a case the method needs from the data and checks both), its reference
optimisation **recipe** (the defaults of ``--lr``, ``--warmup-epochs`` and ``--epochs``) and its **small** settings
(the views and patch size the CPU demo and the tests use). Settings and entries are plain data, kept here without
torch so that ``--help`` is instant and flags are checked before anything heavy starts; the model is imported only
when a run starts (:func:`model_class`).

Everything that lists methods (the command, the demo, the benchmarks, the tests) reads :data:`METHODS`: adding a
method is a model file and one entry.
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from nnunetv2_hiendmae.errors import UserError

View = tuple[int, tuple[int, int, int]]  # (views per case, size in voxels) of one kind of view


def setting(default, help: str, **metadata):
    """A settings field: its default, its ``--help`` text and optional argparse ``choices``."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def _ratio(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise UserError(f"--{name.replace('_', '-')} must be between 0 and 1 (exclusive), got {value}")


def _at_least_one(settings: object, *names: str) -> None:
    for name in names:
        if getattr(settings, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(settings, name)}")


@dataclass
class MaskedCropsSettings:
    """Hi-End-MAE and MAE: K random crops of the patch size per loaded volume, each masked at random."""

    mask_ratio: float = setting(0.75, "fraction of tokens masked per crop")
    crops_per_volume: int = setting(8, "random crops of the patch size taken from each loaded volume; a step sees "
                                       "batch-size x crops-per-volume crops")

    def views(self, patch_size: Sequence[int]) -> dict[str, View]:
        return {"crops": (self.crops_per_volume, tuple(patch_size))}

    def check(self, patch_size: Sequence[int], token_size: Sequence[int]) -> None:
        _ratio("mask_ratio", self.mask_ratio)
        _at_least_one(self, "crops_per_volume")


@dataclass
class GLMAESettings:
    """GL-MAE: global views (a larger region resized to the patch size) and local views (the patch size)."""

    mask_ratio: float = setting(0.75, "fraction of tokens masked per crop")
    global_views: int = setting(2, "global views per volume (p)")
    local_views: int = setting(6, "local views per volume (q)")
    global_size: list[int] | None = setting(None, "region of a global view in voxels, resized to --patch-size on "
                                                  "the device (default: 5/3 of --patch-size, 160^3 for 96^3)",
                                            nargs=3, metavar=("X", "Y", "Z"))
    proj_dim: int = setting(256, "width of the projected CLS embeddings")
    proj_hidden_dim: int = setting(2048, "hidden width of the projectors")
    global_weight: float = setting(0.1, "weight of the global-to-global consistency loss")
    local_weight: float = setting(0.1, "weight of the global-to-local consistency loss")
    ema_momentum: float = setting(0.996, "teacher EMA momentum at the start, raised to 1 along a cosine")

    def global_region(self, patch_size: Sequence[int]) -> tuple[int, int, int]:
        if self.global_size is not None:
            return tuple(int(g) for g in self.global_size)  # type: ignore[return-value]
        return tuple(round(p * 5 / 3) for p in patch_size)  # type: ignore[return-value]

    def views(self, patch_size: Sequence[int]) -> dict[str, View]:
        return {"global": (self.global_views, self.global_region(patch_size)),
                "local": (self.local_views, tuple(patch_size))}

    def check(self, patch_size: Sequence[int], token_size: Sequence[int]) -> None:
        _ratio("mask_ratio", self.mask_ratio)
        _ratio("ema_momentum", self.ema_momentum)
        _at_least_one(self, "global_views", "local_views", "proj_dim", "proj_hidden_dim")
        region = self.global_region(patch_size)
        if any(g < p for g, p in zip(region, patch_size)):
            raise UserError(f"--global-size {' '.join(map(str, region))} is smaller than --patch-size "
                            f"{' '.join(map(str, patch_size))} on some axis: a global view must hold a local one")
        if self.global_weight < 0 or self.local_weight < 0:
            raise UserError("--global-weight and --local-weight must not be negative")


@dataclass
class MiMSettings:
    """MiM: one region of twice the patch size per case, reconstructed at three nested levels."""

    mask_ratio_up: float = setting(0.5, "coarse level: fraction of the 8 octants masked")
    mask_ratio_mid: float = setting(0.6, "middle level: fraction of tokens masked in each octant volume")
    mask_ratio_down: float = setting(0.5, "fine level: fraction of tokens masked in each upsampled token volume")
    mid_samples: int = setting(4, "middle-level volumes per case, taken among the masked octants")
    down_samples: int = setting(4, "fine-level volumes per middle volume, taken among its masked tokens")
    align_weight: float = setting(0.1, "weight of each cross-level alignment loss")
    alignment: str = setting("byol", "cross-level alignment: byol (2 - 2 cos, the published script) or ce "
                                     "(cross-entropy over which octant / token a volume came from)",
                             choices=("byol", "ce"))
    ce_temperature: float = setting(1.0, "temperature of the cosine logits of the ce alignment (1: the raw cosines, "
                                         "as the reference)")

    def views(self, patch_size: Sequence[int]) -> dict[str, View]:
        return {"region": (1, tuple(2 * p for p in patch_size))}

    def check(self, patch_size: Sequence[int], token_size: Sequence[int]) -> None:
        for name in ("mask_ratio_up", "mask_ratio_mid", "mask_ratio_down"):
            _ratio(name, getattr(self, name))
        _at_least_one(self, "mid_samples", "down_samples")
        grid = [p // t for p, t in zip(patch_size, token_size)]
        shown = f"got {' '.join(map(str, patch_size))} with token size {' '.join(map(str, token_size))}"
        if any(g % 2 for g in grid):
            raise UserError(f"mim needs a patch size of an even number of tokens on every axis (octants of the "
                            f"coarse level), {shown}")
        if len(set(grid)) != 1:
            stretch = " x ".join(str(g) for g in grid)
            raise UserError(f"mim needs a patch size of the same number of tokens on every axis: its fine level "
                            f"upsamples one token to the patch size, which would stretch it {stretch}; {shown}")
        masked_octants = round(8 * self.mask_ratio_up)
        if not 1 <= masked_octants <= 7 or self.mid_samples > masked_octants:
            raise UserError(f"--mid-samples {self.mid_samples} needs as many masked octants, but --mask-ratio-up "
                            f"{self.mask_ratio_up} masks {masked_octants} of 8 (at least 1, at most 7)")
        tokens = grid[0] * grid[1] * grid[2]
        masked_tokens = tokens - int(tokens * (1 - self.mask_ratio_mid))
        if self.down_samples > masked_tokens:
            raise UserError(f"--down-samples {self.down_samples} exceeds the {masked_tokens} tokens masked per "
                            f"middle volume")
        if self.align_weight < 0 or self.ce_temperature <= 0:
            raise UserError("--align-weight must not be negative and --ce-temperature must be positive")


@dataclass(frozen=True)
class Recipe:
    """A method's reference optimisation: the defaults of ``--lr``, ``--warmup-epochs`` and ``--epochs``, and AdamW's
    betas.

    ``lr`` is the peak learning rate; with ``lr_reference_batch`` it is a *base* rate scaled linearly with the
    views an optimiser step sees over all ranks (MAE's ``blr * batch / 256``)."""

    lr: float
    warmup_epochs: int
    epochs: int
    lr_reference_batch: int | None = None
    source: str = ""
    betas: tuple[float, float] = (0.9, 0.95)

    def peak_lr(self, views_per_step: int) -> float:
        """The peak learning rate for an optimiser step over ``views_per_step`` views (all ranks together)."""
        return self.lr * views_per_step / self.lr_reference_batch if self.lr_reference_batch else self.lr


@dataclass(frozen=True)
class Method:
    """One registry entry.

    ``model``: ``module:Class`` (importable module path) of the model; ``recipe`` its optimisation on the ViT and
    ``primus_recipe`` on a Primus encoder; ``small``: settings for the CPU demo and tests (few, small views) and
    ``small_patch`` their patch size (None: the demo's default)."""

    settings: type
    model: str
    title: str
    recipe: Recipe
    small: dict = field(default_factory=dict)
    small_patch: tuple[int, int, int] | None = None
    primus_recipe: Recipe = field(default_factory=lambda: PRIMUS_RECIPE)

    def recipe_for(self, encoder_kind: str) -> Recipe:
        """The recipe for an encoder kind (``vit`` or ``primus``, :data:`nnunetv2_hiendmae.presets.ENCODERS`)."""
        return self.primus_recipe if encoder_kind == "primus" else self.recipe


# nnssl's Primus-M MAE (MIC-DKFZ/nnssl, src/nnssl/training/nnsslTrainer/masked_image_modeling/BaseEvaMAETrainer.py):
# AdamW 3e-4 (not scaled with the batch), betas 0.9/0.98, 50 linear warm-up epochs of nnssl's 1000 (its LayerScale 0.1
# and drop-path 0.2 are encoder settings: the primus_* presets' init_values and drop_path_rate). No published recipe
# pretrains Primus with the other methods: they take this one, the only one tuned for Primus.
PRIMUS_RECIPE = Recipe(3e-4, 50, 1000, betas=(0.9, 0.98),
                       source="nnssl's BaseEvaMAETrainer (Primus-M MAE): AdamW 3e-4, betas 0.9/0.98, drop-path 0.2, "
                              "50 warm-up epochs of 1000")
HI_END_MAE_RECIPE = Recipe(1e-4, 10, 1000, source="Hi-End-MAE's main.py, the rate not scaled with the batch")

METHODS: dict[str, Method] = {
    "hiend_mae": Method(MaskedCropsSettings, "pretrain.methods.hiend_mae:HiEndMAE",
                        "Hi-End-MAE (Tang et al. 2025): hierarchical encoder-driven decoder", HI_END_MAE_RECIPE,
                        small={"crops_per_volume": 4}),
    "mae": Method(MaskedCropsSettings, "pretrain.methods.mae:MAE", "MAE (He et al. 2022): plain Transformer decoder",
                  Recipe(1.5e-4, 40, 800, lr_reference_batch=256,
                         source="MAE's PRETRAIN.md, its base rate scaled with the batch"),
                  small={"crops_per_volume": 4}),
    "gl_mae": Method(GLMAESettings, "pretrain.methods.gl_mae:GLMAE",
                     "GL-MAE (Zhuang et al. 2025): global/local views, EMA teacher, global-guided consistency",
                     replace(HI_END_MAE_RECIPE, source="none published: Hi-End-MAE's"),
                     small={"global_views": 1, "local_views": 3}),
    "mim": Method(MiMSettings, "pretrain.methods.mim:MiM",
                  "MiM (Zhuang et al. 2025): mask in mask, three levels, cross-level alignment",
                  Recipe(2e-4, 40, 800, source="MiM's published pretraining script: blr 1e-4 x 512 / 256"),
                  small={"mid_samples": 2, "down_samples": 2}, small_patch=(32, 32, 32)),
}


def method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def settings_fields(name: str) -> list[dataclasses.Field]:
    return list(dataclasses.fields(method(name).settings))


def make_settings(name: str, values: dict) -> object:
    """The method's settings from ``values`` (field -> value; missing fields take their defaults)."""
    known = {f.name for f in settings_fields(name)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{', '.join('--' + u.replace('_', '-') for u in unknown)}: not a setting of method {name}")
    return method(name).settings(**values)


def small_flags(name: str) -> list[str]:
    """The command-line flags of the method's small settings, for the CPU demo and the tests."""
    flags = []
    for key, value in method(name).small.items():
        flags += [f"--{key.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    return flags


def model_class(name: str) -> type:
    """The method's model class (imports torch and the model's module)."""
    module, cls = method(name).model.split(":")
    return getattr(importlib.import_module(module), cls)
