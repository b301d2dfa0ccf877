"""The Hi-End-MAE pretraining run: optimiser, schedule, precision, DDP, logging, checkpoints and resume.

Data order is a pure function of (seed, epoch, rank, item) and the global RNG state is saved at every epoch end,
so a killed run resumed from ``checkpoint_latest.pth`` retraces exactly the epochs it had not finished.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
import os
import random
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from timm.scheduler import CosineLRScheduler
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from nnunetv2_hiendmae import __version__
from nnunetv2_hiendmae.checkpoint import load_checkpoint, make_checkpoint, save_atomic
from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.optim import param_groups
from nnunetv2_hiendmae.precision import autocast, resolve_precision
from nnunetv2_hiendmae.presets import PRESETS, encoder_config
from pretrain.data import PretrainCrops, make_loader, pretrain_metadata, resolve_sources
from pretrain.figures import plot_progress, plot_reconstruction
from pretrain.hiend_mae import DECODER_PRESETS, HiEndMAE

LATEST, FINAL = "checkpoint_latest.pth", "checkpoint_final.pth"
# Settings a resumed run must share with the run it continues (the rest, e.g. workers or device, may change).
_RESUME_KEYS = ("datasets", "plans", "configuration", "arch", "patch_size", "mask_ratio", "batch_size",
                "crops_per_volume", "epochs", "lr", "warmup_epochs", "weight_decay", "fold", "seed", "pos_embed",
                "accum_steps")


@dataclass
class PretrainConfig:
    """Everything that defines a run; defaults are the reference's (methods.md §1.8-1.9)."""

    datasets: list[str]
    output_dir: str
    plans: str = "nnUNetPlans"
    configuration: str = "3d_fullres"
    arch: str = "vit_b16"
    patch_size: list[int] = field(default_factory=lambda: [96, 96, 96])
    mask_ratio: float = 0.75
    batch_size: int = 24
    crops_per_volume: int = 8
    epochs: int = 1000
    iters_per_epoch: int | None = None
    lr: float = 1e-4
    warmup_epochs: int = 10
    weight_decay: float = 0.05
    num_workers: int = 8
    fold: int | None = None
    device: str = "cuda"
    precision: str = "auto"  # bf16 on CUDA, fp32 on CPU; fp16 uses a GradScaler
    grad_clip: float | None = None
    accum_steps: int = 1
    pos_embed: str = "sincos"
    resume: bool = False
    seed: int = 41
    recon_every: int = 10
    progress_bar: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "crops_per_volume", "epochs", "accum_steps", "recon_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.iters_per_epoch is not None and self.iters_per_epoch < 1:
            raise UserError(f"--iters-per-epoch must be at least 1, got {self.iters_per_epoch}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise UserError(f"--mask-ratio must be between 0 and 1 (exclusive), got {self.mask_ratio}")
        if self.lr <= 0 or self.warmup_epochs < 0 or self.num_workers < 0 or self.weight_decay < 0:
            raise UserError("--lr must be positive; --warmup-epochs, --num-workers and --weight-decay non-negative")


class NonFiniteLoss(UserError):
    """The loss became NaN/inf: the run stops and the last good checkpoint is kept."""


def _dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) under torchrun, (0, 0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "python": random.getstate(),
    }


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    np.random.set_state(("MT19937", state["numpy"]["keys"].numpy().astype(np.uint32), state["numpy"]["pos"], 0, 0.0))
    random.setstate(state["python"])


def share_cpu_with_workers(num_workers: int) -> None:
    """On CPU, leave the loader workers their cores: oversubscribed intra-op threads spin-wait (measured 30x slower)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - num_workers))


class Logger:
    """nnU-Net style text log (``timestamp: message``), printed too; only rank 0 writes."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        t = datetime.now()
        self.path = out_dir / f"training_log_{t.year}_{t.month}_{t.day}_{t.hour:02d}_{t.minute:02d}_{t.second:02d}.txt"

    def __call__(self, *msg: object) -> None:
        if not self.enabled:
            return
        line = " ".join(str(m) for m in msg)
        with open(self.path, "a") as f:
            f.write(f"{datetime.now()}: {line}\n")
        tqdm.write(line)


class PretrainRun:
    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.rank, local_rank, self.world_size = _dist_info()
        if cfg.arch not in PRESETS:
            raise UserError(f"unknown --arch {cfg.arch!r}; choose from {', '.join(PRESETS)}")
        token = PRESETS[cfg.arch]["token_size"]
        if len(cfg.patch_size) != 3 or any(s <= 0 or s % token for s in cfg.patch_size):
            raise UserError(f"--patch-size {' '.join(map(str, cfg.patch_size))} is not a multiple of the token size "
                            f"{token} of {cfg.arch} on every axis")
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda but no CUDA GPU is visible; use --device cpu")
        self.device = torch.device(cfg.device, local_rank) if cfg.device == "cuda" else torch.device(cfg.device)
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
        else:
            share_cpu_with_workers(cfg.num_workers)
        self.precision = resolve_precision(self.device, cfg.precision)

        self.out = Path(cfg.output_dir)
        self.is_main = self.rank == 0
        sources = resolve_sources(cfg.datasets, cfg.plans, cfg.configuration, cfg.fold)
        self.meta = pretrain_metadata(sources, cfg.plans, cfg.configuration)
        self.num_cases = sum(len(s.identifiers) for s in sources)
        self.iters = cfg.iters_per_epoch or max(1, math.ceil(self.num_cases / (cfg.batch_size * self.world_size)))
        self.data = PretrainCrops(sources, cfg.patch_size, cfg.crops_per_volume, self.iters * cfg.batch_size,
                                  seed=cfg.seed, rank=self.rank, world_size=self.world_size)

        self.encoder_cfg = encoder_config(cfg.arch, self.meta["in_channels"], cfg.pos_embed,
                                          [s // token for s in cfg.patch_size] if cfg.pos_embed == "learned" else None)
        self.decoder_cfg = dict(DECODER_PRESETS[cfg.arch])
        torch.manual_seed(cfg.seed)
        self.model = HiEndMAE(self.encoder_cfg, self.decoder_cfg, cfg.mask_ratio).to(self.device)
        self.ddp = (DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
                    if self.world_size > 1 else self.model)
        torch.manual_seed(cfg.seed + self.rank)  # same initial weights everywhere, different masks on every rank
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95),
                                           fused=self.device.type == "cuda")
        steps_per_epoch = math.ceil(self.iters / cfg.accum_steps)
        self.steps_per_epoch = steps_per_epoch
        # per-step linear warm-up from 0, then half-cycle cosine to 0 (reference: t = epoch + i / iters)
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=max(1, (cfg.epochs - cfg.warmup_epochs) * steps_per_epoch),
                                           lr_min=0.0, warmup_t=cfg.warmup_epochs * steps_per_epoch, warmup_lr_init=0.0,
                                           warmup_prefix=True, t_in_epochs=False)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.start_epoch, self.global_step = 0, 0
        self.history: dict[str, list[float]] = {"loss": [], "lr": [], "crops_per_s": [], "epoch_time": []}
        self.log = Logger(self.out, self.is_main)

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def _rng_states(self) -> list[dict]:
        """Every rank's RNG state, in rank order (a collective: all ranks call it)."""
        state = _rng_state(self.device)
        if self.world_size == 1:
            return [state]
        states: list = [None] * self.world_size
        dist.all_gather_object(states, state)
        return states

    def _checkpoint(self, epochs_done: int, rng: list[dict] | None = None) -> dict:
        cfg = self.cfg
        pretrain = dict(self.meta, crop_size=list(cfg.patch_size), token_size=list(self.model.token_size),
                        mask_ratio=cfg.mask_ratio, epochs_done=epochs_done, epochs_planned=cfg.epochs,
                        iters_per_epoch=self.iters, batch_size=cfg.batch_size, crops_per_volume=cfg.crops_per_volume,
                        world_size=self.world_size, lr=cfg.lr, seed=cfg.seed, history=self.history)
        train_state = None
        if rng is not None:  # a resumable checkpoint
            train_state = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                           "epoch": epochs_done, "global_step": self.global_step, "rng": rng, "config": asdict(cfg)}
        return make_checkpoint(weights=self.model.state_dict(), encoder=self.encoder_cfg,
                               model={"decoder": self.decoder_cfg, "mask_ratio": cfg.mask_ratio}, pretrain=pretrain,
                               method="hiendmae", train_state=train_state)

    def _restore(self) -> None:
        ckpt = load_checkpoint(self.out / LATEST, map_location=self.device)
        state = ckpt.get("train_state")
        if state is None:
            raise UserError(f"{self.out / LATEST} holds no training state to resume from")
        old, new = state["config"], asdict(self.cfg)
        diffs = [k for k in _RESUME_KEYS if old.get(k) != new.get(k)]
        if diffs:
            raise UserError("--resume with settings that differ from the run in the output folder: " +
                            ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in diffs))
        self.model.load_state_dict(ckpt["weights"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.global_step = state["epoch"], state["global_step"]
        self.history = {k: list(v) for k, v in ckpt["pretrain"]["history"].items()}
        if self.rank < len(state["rng"]):
            _set_rng_state(state["rng"][self.rank], self.device)
        else:  # more ranks than the run that wrote the checkpoint: a fresh stream for this rank
            torch.manual_seed(self.cfg.seed + self.rank + 10_000 * self.start_epoch)
        self.log(f"resumed from {self.out / LATEST} after epoch {self.start_epoch} (step {self.global_step})")

    def _prepare_output(self) -> None:
        latest = self.out / LATEST
        if latest.exists() and not self.cfg.resume:
            raise UserError(f"{self.out} already holds a run ({LATEST}); pass --resume to continue it or choose another -o")
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        if self.world_size > 1:
            dist.barrier()
        if self.cfg.resume and latest.exists():
            self._restore()
        elif self.cfg.resume:
            self.log(f"--resume: no {LATEST} in {self.out}, starting a new run")

    # ---- training --------------------------------------------------------------------------------------------------
    def _step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self.scheduler.step_update(self.global_step)

    def _check_finite(self, loss: torch.Tensor, epoch: int, it: int) -> None:
        bad = (~torch.isfinite(loss.detach())).float()
        if self.world_size > 1:
            dist.all_reduce(bad)
        if bad.item() > 0:
            kept = self.out / LATEST
            where = f"last good checkpoint kept: {kept}" if kept.exists() else "no checkpoint was written yet"
            raise NonFiniteLoss(f"non-finite loss at epoch {epoch + 1}, iteration {it + 1}; stopping ({where}). "
                                "Try a lower --lr, --grad-clip 1 or --precision fp32")

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        cfg = self.cfg
        self.model.train()
        self.data.set_epoch(epoch)
        loader = make_loader(self.data, cfg.batch_size, cfg.num_workers, self.device.type)
        bar = tqdm(total=self.iters, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (self.is_main and cfg.progress_bar),
                   dynamic_ncols=True, leave=False)
        loss_sum, crops, t0 = torch.zeros((), device=self.device), 0, time.perf_counter()
        self.scheduler.step_update(self.global_step)
        for it, batch in enumerate(loader):
            x = batch.to(self.device, non_blocking=True).flatten(0, 1)  # [B, K, C, *crop] -> [B*K, C, *crop]
            sync = (it + 1) % cfg.accum_steps == 0 or it + 1 == self.iters
            ctx = self.ddp.no_sync() if (self.world_size > 1 and not sync) else nullcontext()
            with ctx, autocast(self.device, self.precision):
                loss, _, _ = self.ddp(x)
            self._check_finite(loss, epoch, it)
            scaled = loss / cfg.accum_steps
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            if sync:
                self._step()
            loss_sum += loss.detach()
            crops += x.shape[0] * self.world_size
            if self.is_main and cfg.progress_bar and (it % 5 == 0 or it + 1 == self.iters):
                bar.set_postfix(loss=f"{loss.item():.4f}", crops_s=f"{crops / (time.perf_counter() - t0):.1f}")
            bar.update(1)
            if it == 0 and self.is_main and self._want_recon(epoch):
                self._reconstruction(x[:1], epoch)
        bar.close()
        if self.world_size > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= self.world_size
        return loss_sum.item() / self.iters, crops / (time.perf_counter() - t0)

    def _want_recon(self, epoch: int) -> bool:
        return (epoch + 1) % max(1, self.cfg.recon_every) == 0 or epoch + 1 == self.cfg.epochs or epoch == 0

    def _reconstruction(self, x: torch.Tensor, epoch: int) -> None:
        was_training = self.model.training
        self.model.eval()
        state = torch.get_rng_state(), (torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        with autocast(self.device, self.precision):
            masked, recon = self.model.reconstruct(x.float())
        torch.set_rng_state(state[0])  # the figure must not change the training's random stream
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)
        self.model.train(was_training)
        plot_reconstruction(x, masked, recon, self.out / f"reconstruction_epoch_{epoch + 1:04d}.png",
                            f"{self.cfg.arch}, mask ratio {self.cfg.mask_ratio}, epoch {epoch + 1}")

    def run(self) -> Path:
        cfg = self.cfg
        self._prepare_output()
        if self.is_main and self.start_epoch == 0:
            n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            self.log(f"nnunetv2_hiendmae {__version__} Hi-End-MAE pretraining: {cfg.arch} ({n_params / 1e6:.1f}M params), "
                     f"{self.num_cases} cases from {', '.join(d['name'] for d in self.meta['datasets'])}, "
                     f"crop {cfg.patch_size}, {cfg.batch_size}x{cfg.crops_per_volume} crops/iter/rank, "
                     f"{self.iters} iters/epoch, {self.world_size} rank(s), {self.device}, {self.precision}")
        for epoch in range(self.start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            loss, throughput = self.train_epoch(epoch)
            lr = self.optimizer.param_groups[0]["lr"]
            for k, v in (("loss", loss), ("lr", lr), ("crops_per_s", throughput), ("epoch_time", time.perf_counter() - t0)):
                self.history[k].append(v)
            rng = self._rng_states()
            if self.is_main:
                self.log(f"epoch {epoch + 1}/{cfg.epochs}  train_loss {loss:.5f}  lr {lr:.3e}  "
                         f"{throughput:.1f} crops/s  epoch time {self.history['epoch_time'][-1]:.1f} s")
                save_atomic(self._checkpoint(epoch + 1, rng), self.out / LATEST)
                plot_progress(self.history, self.out / "progress.png")
            if self.world_size > 1:
                dist.barrier()
        final = self.out / FINAL
        if self.is_main:
            save_atomic(self._checkpoint(cfg.epochs), final)
            self.log(f"done: {final}")
        return final


def pretrain(cfg: PretrainConfig) -> Path:
    """Run (or resume) a pretraining; returns the path of ``checkpoint_final.pth``."""
    try:
        return PretrainRun(cfg).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
