"""What defines a pretraining run, as plain data (no torch: the command checks it before anything heavy starts).

Defaults are the Hi-End-MAE reference's (``main.py``, ``trainer.py``: AdamW, batch 24 volumes of 8 crops, seed 41);
``--lr``, ``--warmup-epochs`` and ``--epochs`` default to the method's own reference recipe
(:class:`pretrain.methods.Recipe`). The method's hyper-parameters are its settings object (``method_settings``; see
:mod:`pretrain.methods`). A checkpoint stores the whole config; ``--resume`` continues with it, and only the settings
in :data:`CHANGEABLE_ON_RESUME` may differ from the stored ones.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, is_dataclass

from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.presets import PRECISIONS, PRESETS, default_pos_embed, encoder_kind, token_size_3d
from pretrain import methods

# How the run is executed, not what it computes (--skip-bad-cases: cases that became unreadable are left out); and
# what a run that diverged needs to continue: --epochs may grow to extend a run and --lr change (the schedule is
# re-planned from the point reached), --grad-clip and --precision change.
CHANGEABLE_ON_RESUME = ("output_dir", "num_workers", "device", "progress_bar", "recon_every", "compile",
                        "checkpoint_minutes", "skip_bad_cases", "val_every", "probe_every", "probe_strict", "epochs",
                        "lr", "grad_clip", "precision", "dist_timeout_minutes", "loader_memory_gib")



def val_cases_value(given: str) -> float:
    """``--val-cases`` as a number: a count (an integer >= 1) or a fraction in [0, 1). Raises :class:`UserError`
    for anything else, before any data is read."""
    try:
        value = float(given)
    except ValueError:
        value = -1.0
    if value < 0 or (value >= 1 and value != int(value)):
        raise UserError(f"--val-cases must be a count or a fraction such as 0.05, got {given!r}")
    return value


@dataclass
class PretrainConfig:
    datasets: list[str]
    output_dir: str
    method: str = "hiend_mae"
    method_settings: object = field(default_factory=dict)  # the method's settings object; a dict of fields is read
    plans: str = "nnUNetPlans"
    configuration: str = "3d_fullres"
    arch: str = "vit_b16"
    patch_size: list[int] = field(default_factory=lambda: [96, 96, 96])
    batch_size: int = 24
    epochs: int | None = None  # None: the method's recipe
    iters_per_epoch: int | None = None
    lr: float | None = None  # None: the method's recipe (scaled with the views per step where it says so)
    warmup_epochs: int | None = None  # None: the method's recipe
    weight_decay: float = 0.05
    num_workers: int = 8
    loader_memory_gib: float = 6.0  # batches in flight per rank, in shared and in pinned host memory each
    fold: int | None = None
    device: str = "auto"  # cuda if available, else cpu
    precision: str = "auto"  # bf16 on GPUs with native bf16, else fp16 (with a GradScaler); fp32 on CPU
    compile: bool | None = None  # None: on for CUDA, off elsewhere
    grad_clip: float | None = None
    accum_steps: int = 1
    pos_embed: str | None = None  # None: the preset's (sin-cos for the ViT, learned for Primus)
    seed: int = 41
    recon_every: int = 10
    checkpoint_minutes: float = 10.0
    # how long a rank waits for the others in a collective: a fresh run's one-off work (fingerprints of every case,
    # held-out views, probe data) comes first, and PyTorch's NCCL default (10 minutes) does not cover 1,000+ scans
    dist_timeout_minutes: float = 60.0
    progress_bar: bool = True
    skip_bad_cases: bool = False  # leave out preprocessed cases that cannot be read, instead of refusing to start
    val_cases: str | None = None  # held-out cases: a count or a fraction (None: 5 %, 1..50, none below 10 cases)
    val_every: int = 1
    probe_dataset: str | None = None  # a labelled dataset for the downstream linear probe
    probe_fold: int = 0
    probe_every: int | None = None  # None: 10 % of the run, at least every 50 epochs
    probe_strict: bool = False  # refuse a probe whose validation cases are among the pretraining cases

    def probe_interval(self) -> int:
        """Epochs between probes (and one after the last epoch)."""
        return self.probe_every or max(1, min(50, round(0.1 * self.epochs)))

    def __post_init__(self) -> None:
        settings = self.method_settings
        if not is_dataclass(settings):
            settings = methods.make_settings(self.method, dict(settings))
        elif not isinstance(settings, methods.method(self.method).settings):
            raise TypeError(f"method_settings is a {type(settings).__name__}, not the settings of {self.method}")
        self.method_settings = settings
        if self.arch not in PRESETS:
            raise UserError(f"unknown --arch {self.arch!r}; choose from {', '.join(PRESETS)}")
        recipe = self.recipe()
        if self.epochs is None:
            self.epochs = recipe.epochs
        if self.warmup_epochs is None:
            self.warmup_epochs = recipe.warmup_epochs
        for name in ("batch_size", "epochs", "accum_steps", "recon_every", "val_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.probe_every is not None and self.probe_every < 1:
            raise UserError(f"--probe-every must be at least 1, got {self.probe_every}")
        if self.probe_fold < 0:
            raise UserError(f"--probe-fold must not be negative, got {self.probe_fold}")
        if self.iters_per_epoch is not None and self.iters_per_epoch < 1:
            raise UserError(f"--iters-per-epoch must be at least 1, got {self.iters_per_epoch}")
        if (self.lr is not None and self.lr <= 0) or self.warmup_epochs < 0 or self.num_workers < 0 \
                or self.weight_decay < 0:
            raise UserError("--lr must be positive; --warmup-epochs, --num-workers and --weight-decay non-negative")
        if self.loader_memory_gib <= 0:
            raise UserError(f"--loader-memory-gib must be positive, got {self.loader_memory_gib}")
        if self.dist_timeout_minutes <= 0:
            raise UserError(f"--dist-timeout-minutes must be positive, got {self.dist_timeout_minutes}")
        if self.checkpoint_minutes < 0:
            raise UserError(f"--checkpoint-minutes must not be negative, got {self.checkpoint_minutes}")
        if self.pos_embed is None:
            self.pos_embed = default_pos_embed(self.arch)
        elif self.pos_embed != default_pos_embed(self.arch) and encoder_kind(PRESETS[self.arch]) == "primus":
            raise UserError(f"--pos-embed {self.pos_embed}: {self.arch} has a learned position embedding (with rotary "
                            "embeddings) and no other")
        if self.device not in ("auto", "cuda", "cpu"):
            raise UserError(f"--device must be auto, cuda or cpu, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        token = token_size_3d(PRESETS[self.arch]["token_size"])
        if len(self.patch_size) != 3 or any(s <= 0 or s % t for s, t in zip(self.patch_size, token)):
            raise UserError(f"--patch-size {' '.join(map(str, self.patch_size))} is not a multiple of the token size "
                            f"{token[0]} of {self.arch} on every axis")
        settings.check(self.patch_size, token)
        if self.val_cases is not None:
            val_cases_value(self.val_cases)
        if self.lr is None:
            world_size = int(os.environ.get("WORLD_SIZE", 1))
            self.lr = recipe.peak_lr(self.views_per_case() * self.batch_size * self.accum_steps * world_size)

    def recipe(self) -> methods.Recipe:
        """The method's recipe for this encoder (ViT or Primus)."""
        return methods.method(self.method).recipe_for(encoder_kind(PRESETS[self.arch]))

    def views(self) -> dict:
        """``{name: (count, size)}``: the views of a case the method reads."""
        return self.method_settings.views(self.patch_size)

    def views_per_case(self) -> int:
        return sum(n for n, _ in self.views().values())
