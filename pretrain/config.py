"""What defines a pretraining run, as plain data (no torch: the command checks it before anything heavy starts).

Defaults are the reference's (methods.md §1.8-1.9). The method's own hyper-parameters are in ``method_settings``
(see :mod:`pretrain.methods`). A checkpoint stores the whole config; ``--resume`` continues with it, and only the
settings in :data:`CHANGEABLE_ON_RESUME` may differ from the stored ones.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.presets import PRECISIONS, PRESETS, token_size_3d
from pretrain import methods

# How the run is executed, not what it computes; --epochs may grow to extend a run (the schedule is re-planned).
CHANGEABLE_ON_RESUME = ("output_dir", "num_workers", "device", "progress_bar", "recon_every", "compile",
                        "checkpoint_minutes", "epochs")


@dataclass
class PretrainConfig:
    datasets: list[str]
    output_dir: str
    method: str = "hiend_mae"
    method_settings: dict = field(default_factory=dict)  # the method's settings, every field (asdict)
    plans: str = "nnUNetPlans"
    configuration: str = "3d_fullres"
    arch: str = "vit_b16"
    patch_size: list[int] = field(default_factory=lambda: [96, 96, 96])
    batch_size: int = 24
    epochs: int = 1000
    iters_per_epoch: int | None = None
    lr: float = 1e-4
    warmup_epochs: int = 10
    weight_decay: float = 0.05
    num_workers: int = 8
    fold: int | None = None
    device: str = "auto"  # cuda if available, else cpu
    precision: str = "auto"  # bf16 on CUDA, fp32 on CPU; fp16 uses a GradScaler
    compile: bool | None = None  # None: on for CUDA, off elsewhere
    grad_clip: float | None = None
    accum_steps: int = 1
    pos_embed: str = "sincos"
    seed: int = 41
    recon_every: int = 10
    checkpoint_minutes: float = 10.0
    progress_bar: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "accum_steps", "recon_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.iters_per_epoch is not None and self.iters_per_epoch < 1:
            raise UserError(f"--iters-per-epoch must be at least 1, got {self.iters_per_epoch}")
        if self.lr <= 0 or self.warmup_epochs < 0 or self.num_workers < 0 or self.weight_decay < 0:
            raise UserError("--lr must be positive; --warmup-epochs, --num-workers and --weight-decay non-negative")
        if self.checkpoint_minutes < 0:
            raise UserError(f"--checkpoint-minutes must not be negative, got {self.checkpoint_minutes}")
        if self.arch not in PRESETS:
            raise UserError(f"unknown --arch {self.arch!r}; choose from {', '.join(PRESETS)}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise UserError(f"--device must be auto, cuda or cpu, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        token = token_size_3d(PRESETS[self.arch]["token_size"])
        if len(self.patch_size) != 3 or any(s <= 0 or s % t for s, t in zip(self.patch_size, token)):
            raise UserError(f"--patch-size {' '.join(map(str, self.patch_size))} is not a multiple of the token size "
                            f"{token[0]} of {self.arch} on every axis")
        self.method_settings = asdict(self.settings())  # complete, checked
        self.settings().check(self.patch_size, token)

    def settings(self):
        """The method's settings object."""
        return methods.make_settings(self.method, self.method_settings)

    def views(self) -> dict:
        return self.settings().views(self.patch_size)
