"""A pretraining run, for any method of the registry: optimiser, schedule, precision, DDP, logging, checkpoints, resume.

Data order is a pure function of (seed, epoch, rank, item) and every rank's RNG state is saved with each checkpoint,
so a killed run resumed from ``checkpoint_latest.pth`` retraces exactly the epochs it had not saved. The data path:
one loader streams the whole run; its workers read the views of a case (blosc2, only the crop regions) in a compact
dtype into pinned memory; the next batch is copied to the device while the current one is computed
(:func:`~pretrain.data.device_batches`) and is augmented there (:mod:`pretrain.augment`); the method's model returns
named losses. The host synchronises with the device only every :data:`SYNC_EVERY` iterations and at an epoch's end,
and redraws ``progress.png`` at most every :data:`PLOT_EVERY_S` seconds: on a GPU an epoch of a small dataset takes a
second or two, and drawing the curves after each would stall it for a tenth of a second every time.
"""
from __future__ import annotations

import math
import os
import random
import shlex
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from nnunetv2_hiendmae import __version__
from nnunetv2_hiendmae.checkpoint import load_checkpoint, make_checkpoint, save_atomic
from nnunetv2_hiendmae.commands import executable
from nnunetv2_hiendmae.errors import Interrupted, UserError
from nnunetv2_hiendmae.precision import autocast
from pretrain.augment import augment_views
from pretrain.build import build_data, build_model, build_placement, build_signals
from pretrain.config import CHANGEABLE_ON_RESUME, PretrainConfig
from pretrain.data import (
    CaseReadError,
    check_shared_memory,
    device_batches,
    make_loader,
    record_unreadable,
)
from pretrain.figures import plot_progress, plot_reconstruction
from pretrain.lock import RunLock
from pretrain.stop import StopRequested, StopSignals

LATEST, FINAL, BEST = "checkpoint_latest.pth", "checkpoint_final.pth", "checkpoint_best.pth"
SYNC_EVERY = 25  # iterations between host-device synchronisations (non-finite check, progress bar)
PLOT_EVERY_S = 60.0  # progress.png is redrawn at most this often, and after the last epoch
# A run that diverges slowly climbs for epochs before its loss becomes NaN. An epoch whose mean loss is LOSS_RISE_KEEP
# times the run's lowest epoch mean does not replace checkpoint_latest.pth (the run keeps one from before the rise);
# at LOSS_RISE_STOP times it stops, before the NaN, with the advice to continue from that checkpoint at a lower lr.
LOSS_RISE_KEEP = 2.0
LOSS_RISE_STOP = 10.0


class NonFiniteLoss(UserError):
    """The loss became NaN/inf: the run stops and the last good checkpoint is kept."""


class Diverged(UserError):
    """The loss rose far above the run's own level (:data:`LOSS_RISE_STOP`): the run stops before it becomes NaN."""


class CheckpointNotWritten(UserError):
    """A checkpoint could not be written (disk full, file too large, ...): the run stops; the file written before it
    is kept, since every checkpoint goes to a temporary file first."""


def _os_error(error: BaseException) -> OSError | None:
    """The operating system's error behind ``error``: torch.save reports a failed write as a RuntimeError of its
    zip writer, raised while handling the file's OSError."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


def save_checkpoint(ckpt: dict, path: Path) -> None:
    """:func:`~nnunetv2_hiendmae.checkpoint.save_atomic`; a write the system refuses raises
    :class:`CheckpointNotWritten` naming the file and the cause (``No space left on device``, ``File too large``)."""
    try:
        save_atomic(ckpt, path)
    except Exception as e:
        cause = _os_error(e)
        if cause is None:
            raise
        kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
        raise CheckpointNotWritten(f"cannot write {path}: {cause.strerror or cause}; {kept}") from None


def resume_command(out: Path) -> str:
    """The command that continues the run in ``out`` the way this process was started: on its own, or under torchrun
    on this node's number of ranks (any other number works too: the position is counted in volumes); quoted for the
    shell, as it is to be pasted."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return f"nnUNetv2_hiendmae_pretrain --resume -o {shlex.quote(str(out))}"
    program = f"{shlex.quote(executable('nnUNetv2_hiendmae_pretrain'))} --resume -o {shlex.quote(str(out))}"
    if int(os.environ["WORLD_SIZE"]) == local:
        return f"torchrun --standalone --nproc_per_node={local} {program}"
    return f"on every node, torchrun with the run's rendezvous flags and --nproc_per_node={local}, then {program}"


def rng_state(device: torch.device) -> dict:
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


@dataclass
class LRSchedule:
    """The learning rate at a point ``t`` of the run counted in epochs (``t = epoch + fraction of its iterations
    done``): linear warm-up from 0 over ``warmup_epochs``, then a half cosine to 0 at ``epochs`` (the Hi-End-MAE
    reference's per-iteration schedule, ``trainer.py``). Counted in epochs, not optimiser steps, so that it does not
    depend on the number of ranks, the batch size or the iterations per epoch: a run resumed on other GPUs follows the
    schedule it planned. A run whose ``--epochs`` or ``--lr`` change on resume follows the schedule planned for them
    from the point it has reached."""

    base_lr: float
    warmup_epochs: float
    epochs: float

    def __call__(self, t: float) -> float:
        if t < self.warmup_epochs:
            return self.base_lr * t / self.warmup_epochs
        span = max(1e-12, self.epochs - self.warmup_epochs)
        return self.base_lr * 0.5 * (1 + math.cos(math.pi * min(t - self.warmup_epochs, span) / span))


class Logger:
    """nnU-Net style text log (``timestamp: message``), printed too; only rank 0 writes."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        t = datetime.now()
        self.path = out_dir / f"training_log_{t.year}_{t.month}_{t.day}_{t.hour:02d}_{t.minute:02d}_{t.second:02d}.txt"

    def __call__(self, *msg: object, echo: bool = True) -> None:
        """Append the line to the log and print it (``echo=False``: the log only, for a line the command prints
        itself)."""
        if not self.enabled:
            return
        line = " ".join(str(m) for m in msg)
        with open(self.path, "a") as f:
            f.write(f"{datetime.now()}: {line}\n")
        if echo:
            tqdm.write(line)


class CheckpointWriter:
    """Writes checkpoints in a background thread (one at a time), so the GPU does not wait for the disk; a failed
    write is raised in the training thread by the next :meth:`wait` or :meth:`check`."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def write(self, ckpt: dict, path: Path) -> None:
        self.wait()

        def run() -> None:
            try:
                save_checkpoint(ckpt, path)
            except BaseException as e:  # noqa: BLE001 - re-raised in the training thread by wait()
                self._error = e

        self._thread = threading.Thread(target=run, name=f"write {path.name}", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def check(self) -> None:
        """Raise the error of a write that has finished, without waiting for one that runs."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()


def _on_cpu(obj):
    """A copy of a (nested) state with every tensor on the CPU, taken now: training may change the originals."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def resumed_config(stored: dict, given: dict) -> tuple[PretrainConfig, list[str]]:
    """The stored run's config with the explicitly ``given`` settings applied; only :data:`CHANGEABLE_ON_RESUME`
    may differ. Returns the config and what changed."""
    changed, refused = [], []
    settings = dict(stored["method_settings"])
    for key, value in given.items():
        if key == "method_settings":
            for name, v in value.items():
                if settings.get(name) != v:
                    refused.append(f"{name} {settings.get(name)!r} -> {v!r}")
            continue
        if stored.get(key) == value:
            continue
        if key in CHANGEABLE_ON_RESUME:
            changed.append(f"{key} {stored.get(key)!r} -> {value!r}")
        else:
            refused.append(f"{key} {stored.get(key)!r} -> {value!r}")
    if refused:
        raise UserError("--resume continues the run with its own settings; these differ: " + ", ".join(refused)
                        + " (leave them out, or start a new run in another -o)")
    merged = {**stored, **{k: v for k, v in given.items() if k != "method_settings"}, "method_settings": settings}
    try:
        return PretrainConfig(**merged), changed
    except TypeError:  # a run of a release whose settings had other names (before the method registry)
        raise UserError("the run was written by an older nnunetv2_hiendmae whose settings this version does not "
                        "know: it cannot be resumed (its checkpoints still fine-tune)") from None


class PretrainRun:
    """One run; ``resume_from``: the loaded ``checkpoint_latest.pth`` of the run it continues; ``planned_ranks``: build
    the run as rank 0 of that many without starting them (``--estimate``), instead of from torchrun's environment."""

    def __init__(self, cfg: PretrainConfig, resume_from: dict | None = None, planned_ranks: int | None = None):
        self.cfg, self.resume_from = cfg, resume_from
        place = build_placement(cfg, planned_ranks)
        self.rank, self.world_size, self.device, self.precision = place.rank, place.world_size, place.device, \
            place.precision
        self.is_main = place.is_main
        self.out = Path(cfg.output_dir)
        stored = (resume_from or {}).get("pretrain", {})  # what the run a resume continues decided
        self.data = build_data(cfg, place, stored)
        if planned_ranks is None:  # before the slow steps: a /dev/shm too small is refused at once
            check_shared_memory(self.data.loader_memory, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        self.signals = build_signals(cfg, place, self.data, stored)
        self.encoder_cfg, self.model, self.ddp, self.compiled, self.optimizer, self.scaler = build_model(
            cfg, place, self.data.meta["in_channels"])
        self.crops_per_step = cfg.batch_size * cfg.views_per_case()
        self.best = -math.inf  # the best probe score so far (checkpoint_best.pth)
        self.schedule = LRSchedule(cfg.lr, cfg.warmup_epochs, cfg.epochs)
        self.t = 0.0  # where the run is, in epochs (the schedule's clock)
        self.start_epoch, self.start_iteration, self.global_step = 0, 0, 0
        self.partial: dict[str, float] = {}  # loss sums of the iterations of ``start_epoch`` done before a resume
        self.lock: RunLock | None = None
        self.history: dict[str, list[float]] = {}
        self.log = Logger(self.out, self.is_main)
        self.writer = CheckpointWriter()
        self.stop = StopSignals()  # Ctrl-C and SIGTERM stop the run after a step all ranks finished (run())
        # the ranks agree on stopping at every step, on the CPU (gloo): the host need not wait for the GPU
        self.stop_group = dist.new_group(backend="gloo") if dist.is_initialized() and self.device.type == "cuda" \
            else None
        self.last_save = time.monotonic()
        self.saved_epochs: int | None = None  # epochs done in the checkpoint_latest.pth this run wrote or resumed
        self.last_plot = -math.inf

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def _rng_states(self) -> list[dict]:
        """Every rank's RNG state, in rank order (a collective: all ranks call it)."""
        state = rng_state(self.device)
        if self.world_size == 1:
            return [state]
        states: list = [None] * self.world_size
        dist.all_gather_object(states, state)
        return states

    def _checkpoint(self, epochs_done: int, rng: list[dict] | None = None, iteration: int = 0,
                    partial: dict[str, float] | None = None) -> dict:
        """The checkpoint after ``epochs_done`` epochs and ``iteration`` iterations of the next (whose loss sums so
        far are ``partial``); resumable when ``rng`` holds every rank's random state."""
        cfg = self.cfg
        pretrain = dict(self.data.meta, patch_size=list(cfg.patch_size), token_size=list(self.model.token_size),
                        views={k: [n, list(size)] for k, (n, size) in self.data.views.items()},
                        epochs_done=epochs_done, epochs_planned=cfg.epochs, iters_per_epoch=self.data.iters,
                        batch_size=cfg.batch_size, world_size=self.world_size, lr=cfg.lr, seed=cfg.seed,
                        val_cases=list(self.data.val_cases), case_fingerprints=self.signals.fingerprints,
                        history=self.history)
        train_state = None
        if rng is not None:  # a resumable checkpoint
            train_state = {"optimizer": self.optimizer.state_dict(),
                           "scaler": self.scaler.state_dict() if self.scaler else None,
                           "epoch": epochs_done, "iteration": iteration, "partial_losses": dict(partial or {}),
                           "global_step": self.global_step, "rng": rng, "config": asdict(cfg)}
        return _on_cpu(make_checkpoint(weights=self.model.state_dict(), encoder=self.encoder_cfg,
                                       model={"settings": asdict(cfg.method_settings),
                                              "decoder": dict(self.model.decoder_config)},
                                       pretrain=pretrain, method=cfg.method, train_state=train_state))

    def _restore(self, ckpt: dict) -> None:
        state, cfg = ckpt["train_state"], self.cfg
        self.model.load_state_dict(ckpt["weights"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.global_step = state["epoch"], state["global_step"]
        self.saved_epochs = self.start_epoch
        self.start_iteration, self.partial = self._position_in_epoch(ckpt)
        self.t = self.start_epoch + self.start_iteration / self.data.iters
        self.history = {k: list(v) for k, v in ckpt["pretrain"]["history"].items()}
        self.best = max((v for v in self.history.get("probe_dice", []) if v == v), default=-math.inf)
        if self.rank < len(state["rng"]):
            _set_rng_state(state["rng"][self.rank], self.device)
        else:  # more ranks than the run that wrote the checkpoint: a fresh stream for this rank
            torch.manual_seed(cfg.seed + self.rank + 10_000 * self.start_epoch)
        within = f", iteration {self.start_iteration}" if self.start_iteration else ""
        self.log(f"resumed from {self.out / LATEST} after epoch {self.start_epoch}{within} (step {self.global_step})")
        stored, before = state["config"], ckpt["pretrain"]
        if cfg.epochs < self.start_epoch:
            raise UserError(f"--epochs {cfg.epochs}: the run has already done {self.start_epoch} epochs")
        replanned = [f"--{k} {stored[k]} -> {getattr(cfg, k)}" for k in ("epochs", "lr")
                     if stored[k] != getattr(cfg, k)]
        if replanned:
            self.log(f"{', '.join(replanned)}: the learning-rate schedule is re-planned (peak {cfg.lr:.3e} after "
                     f"{cfg.warmup_epochs} warm-up epochs, 0 at epoch {cfg.epochs}) and followed from epoch "
                     f"{self.start_epoch} on (lr {self.schedule(self.t):.3e})")
        for key in ("grad_clip", "precision"):
            if stored[key] != getattr(cfg, key):
                self.log(f"--{key.replace('_', '-')} {stored[key]} -> {getattr(cfg, key)} from epoch "
                         f"{self.start_epoch + 1} on")
        if before["world_size"] != self.world_size or before["iters_per_epoch"] != self.data.iters:
            volumes = before["batch_size"] * before["world_size"]
            self.log(f"{before['world_size']} -> {self.world_size} rank(s): {volumes} -> "
                     f"{cfg.batch_size * self.world_size} volumes per iteration over all ranks, "
                     f"{before['iters_per_epoch']} -> {self.data.iters} iterations per epoch; the learning-rate "
                     f"schedule counts epochs, so it continues as planned")

    def _position_in_epoch(self, ckpt: dict) -> tuple[int, dict[str, float]]:
        """Where a checkpoint written in the middle of an epoch resumes on this run's ranks: the iteration that has
        the same number of volumes behind it over all ranks (rounded down to an optimiser step: a few volumes are
        drawn again rather than skipped), and the loss sums of the iterations before it. Counted in volumes, not
        iterations: 20 of 100 iterations on 1 rank are 5 of 25 on 4 ranks, not 20. A position the epoch no longer
        has (fewer volumes per epoch now) starts the epoch again."""
        state, before = ckpt["train_state"], ckpt["pretrain"]
        done = state.get("iteration", 0)
        volumes = done * before["batch_size"] * before["world_size"]
        iteration = volumes // (self.cfg.batch_size * self.world_size) // self.cfg.accum_steps * self.cfg.accum_steps
        if not done or not 0 < iteration < self.data.iters:
            return 0, {}
        return iteration, {k: v * iteration / done for k, v in state.get("partial_losses", {}).items()}

    def _loss_rise(self, loss: float) -> tuple[float, float]:
        """``(rise, level)``: an epoch's mean ``loss`` over the lowest epoch mean of the run before it (1 for the
        first epoch), and that lowest mean."""
        earlier = [v for v in self.history.get("loss", [])[:-1] if math.isfinite(v)]
        level = min(earlier, default=loss)
        return (loss / level if level > 0 else 1.0), level

    def _save_latest(self, epochs_done: int, last: bool, rise: float = 1.0) -> None:
        """``checkpoint_latest.pth`` at most every ``--checkpoint-minutes`` and after the last epoch; not after an
        epoch whose loss rose to :data:`LOSS_RISE_KEEP` times the run's level (``rise``), unless it is the last."""
        if rise >= LOSS_RISE_KEEP and not last:
            if self.saved_epochs is not None:
                self.log(f"the loss is {rise:.1f}x the run's lowest: {LATEST} keeps epoch {self.saved_epochs}, "
                         "from before the rise")
            return
        due = last or time.monotonic() - self.last_save >= 60 * self.cfg.checkpoint_minutes
        if self.world_size > 1:  # every rank must agree (the RNG gather is a collective)
            flag = torch.tensor([float(due)], device=self.device if self.device.type == "cuda" else "cpu")
            dist.broadcast(flag, 0)
            due = bool(flag.item())
        if not due:
            return
        rng = self._rng_states()
        if self.is_main:
            self.writer.write(self._checkpoint(epochs_done, rng), self.out / LATEST)
        self.last_save, self.saved_epochs = time.monotonic(), epochs_done

    # ---- training --------------------------------------------------------------------------------------------------
    def _set_lr(self) -> None:
        lr = self.schedule(self.t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def _step(self, t: float) -> None:
        """One optimiser step, after which the run stands at ``t`` epochs."""
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
        self.t = t
        self.model.step_done(min(1.0, t / self.cfg.epochs))
        self._set_lr()

    def _check_finite(self, first_bad: torch.Tensor, epoch: int) -> None:
        """Stop at the first non-finite loss seen so far (a host synchronisation)."""
        bad = first_bad.clone()
        if self.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        it = int(bad.item())
        if it >= 0:
            self.writer.wait()
            kept = self.out / LATEST
            where = f"last good checkpoint kept: {kept}" if kept.exists() else "no checkpoint was written yet"
            advice = (f"continue it with a lower --lr, --grad-clip 1 or --precision fp32: "
                      f"{resume_command(self.out)} --lr {self.cfg.lr / 2:g}" if kept.exists() else
                      "start it again with a lower --lr, --grad-clip 1 or --precision fp32")
            raise NonFiniteLoss(f"non-finite loss at epoch {epoch + 1}, iteration {it + 1}; stopping ({where}); "
                                f"{advice}")

    def train_epoch(self, epoch: int, batches, start: int = 0, partial: dict[str, float] | None = None
                    ) -> dict[str, float]:
        """Iterations ``start..iters`` of epoch ``epoch`` from the run's stream of device batches; ``partial``: the
        loss sums of the iterations before ``start`` (a run resumed in the middle of the epoch)."""
        cfg = self.cfg
        self.model.train()
        bar = tqdm(total=self.data.iters, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (self.is_main and cfg.progress_bar), dynamic_ncols=True, leave=False)
        sums: dict[str, torch.Tensor] = {k: torch.tensor(v, device=self.device) for k, v in (partial or {}).items()}
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        t0 = time.perf_counter()
        self.t = epoch + start / self.data.iters
        self._set_lr()
        for it in range(start, self.data.iters):
            if it % cfg.accum_steps == 0 and (signum := self.stop.agreed(self.stop_group)) is not None:
                self._stop_interrupted(signum, epoch, it, sums)
            try:
                batch = next(batches)
            except CaseReadError as e:
                self._stop_unreadable(e, epoch, it, sums)
            views = augment_views(batch)
            sync = (it + 1) % cfg.accum_steps == 0 or it + 1 == self.data.iters
            ctx = self.ddp.no_sync() if (self.world_size > 1 and not sync) else nullcontext()
            with ctx, autocast(self.device, self.precision):
                losses = self.compiled(views)
            loss = losses["loss"]
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), it, first_bad)
            scaled = loss / cfg.accum_steps
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            if sync:
                self._step(epoch + (it + 1) / self.data.iters)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            if (it + 1) % SYNC_EVERY == 0 or it + 1 == self.data.iters:
                self._check_finite(first_bad, epoch)
                self.writer.check()
                if self.is_main and cfg.progress_bar:
                    rate = (it + 1 - start) * self.crops_per_step / (time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{loss.item():.4f}", crops_s=f"{rate:.1f}")
            bar.update(1)
            if it == start and self.is_main and self._want_recon(epoch):
                self._reconstruction(self.model.figure_input(views), epoch)
        bar.close()
        return self._mean_over_ranks({k: v / self.data.iters for k, v in sums.items()})

    def _mean_over_ranks(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """``values`` (scalar tensors) averaged over the ranks, as floats; a collective: every rank calls it at the
        same point."""
        if not values:
            return {}
        stacked = torch.stack(list(values.values()))
        if self.world_size > 1:
            dist.all_reduce(stacked)
            stacked /= self.world_size
        return dict(zip(values, stacked.tolist()))

    def _stop_unreadable(self, error: CaseReadError, epoch: int, it: int, sums: dict[str, torch.Tensor]) -> None:
        """A case that cannot be read stops the run in one line naming it, after ``checkpoint_latest.pth`` of the last
        finished step (one process, at an optimiser step: the state is then whole), so no work is lost. The case is
        recorded in the run's folder, so that the resume ``--skip-bad-cases`` advises leaves it out."""
        # a loader worker's error comes back with its traceback in the message: keep what the case's reader said
        said = str(error).strip().splitlines()[-1].split(f"{CaseReadError.__name__}: ", 1)[-1]
        record_unreadable(self.out, said.removeprefix("cannot read ").split(" (", 1)[0])  # for --skip-bad-cases
        kept = "the last checkpoint kept"
        if self.world_size == 1 and it % self.cfg.accum_steps == 0:
            kept = self._save_step(epoch, it, sums)
        raise CaseReadError(f"{said}; stopped ({kept}): preprocess that case again, or continue without it: "
                            f"{resume_command(self.out)} --skip-bad-cases") from None

    def _stop_diverged(self, epoch: int, loss: float, rise: float, level: float) -> None:
        """The loss rose :data:`LOSS_RISE_STOP` times above the run's level: stop before the NaN, nothing of this
        epoch kept; advise continuing from the checkpoint of before the rise at half the ``--lr``, or, where none was
        written, starting again."""
        self.writer.wait()
        lr = f"{self.cfg.lr / 2:g}"
        if self.saved_epochs is not None and (self.out / LATEST).exists():
            advice = (f"{LATEST} holds epoch {self.saved_epochs}, from before the rise: continue it with a lower "
                      f"--lr: {resume_command(self.out)} --lr {lr}")
        else:
            advice = (f"no checkpoint from before the rise was written: start the run again with a lower --lr "
                      f"(--lr {lr}), with --checkpoint-minutes small enough to keep one")
        raise Diverged(f"the loss rose to {loss:.4g} at epoch {epoch + 1}, {rise:.0f}x the run's lowest epoch mean "
                       f"({level:.4g}): the run diverges; stopped before the loss becomes NaN; {advice}")

    def _stop_interrupted(self, signum: signal.Signals, epoch: int, it: int, sums: dict[str, torch.Tensor]) -> None:
        """Ctrl-C or SIGTERM (``signum``, on any rank): ``checkpoint_latest.pth`` of the last finished step (every rank
        stops at the same one), then one line, from rank 0 alone, saying where the run stopped, what was saved and the
        command that continues it (the lock is released by :meth:`run`)."""
        kept = self._save_step(epoch, it, sums, signum)
        raise Interrupted(f"{signum.name} at epoch {epoch + 1}, iteration {it + 1} of {self.data.iters}: stopped "
                          f"after the last finished step; {kept}; continue with: {resume_command(self.out)}", signum,
                          quiet=not self.is_main)

    def _save_step(self, epoch: int, it: int, sums: dict[str, torch.Tensor],
                   signum: signal.Signals = signal.SIGTERM) -> str:
        """``checkpoint_latest.pth`` after ``it`` iterations of epoch ``epoch`` (0-based), whose loss sums so far are
        ``sums`` (averaged over the ranks); resumable when called between optimiser steps, by every rank at the same
        one. Returns what it holds. Where rank 0 cannot write it, or could not write the checkpoint it was writing in
        the background, rank 0 raises :class:`CheckpointNotWritten` and the others end quietly with ``signum``'s exit
        code."""
        failed: CheckpointNotWritten | None = None
        try:
            self.writer.wait()
        except CheckpointNotWritten as e:  # raised after the collectives below, which every rank must make
            failed = e
        partial = self._mean_over_ranks(sums)
        rng = self._rng_states()
        if self.is_main and failed is None:
            try:
                save_checkpoint(self._checkpoint(epoch, rng, iteration=it, partial=partial), self.out / LATEST)
            except CheckpointNotWritten as e:
                failed = e
        if self.world_size > 1:  # the others wait for it (torchrun takes a rank's early exit for a failure, ends
            # rank 0), and learn whether it was written: if not, they end at once, quietly, rank 0 saying why
            written = torch.tensor([int(failed is None)])
            dist.broadcast(written, 0, group=self.stop_group)
            if not written.item() and not self.is_main:
                raise Interrupted("rank 0 could not save the stopped step", signum, quiet=True)
        if failed is not None:
            raise failed
        return (f"{self.out / LATEST} holds epoch {epoch + 1} up to iteration {it}" if it else
                f"{self.out / LATEST} holds {epoch} finished epoch(s)")

    def _due(self, epoch: int, every: int) -> bool:
        return (epoch + 1) % max(1, every) == 0 or epoch + 1 == self.cfg.epochs

    def _evaluate(self, epoch: int) -> dict[str, float]:
        """The held-out losses (every ``--val-every`` epochs and after the last) and the probe's score (every
        ``--probe-every`` epochs and after the last, keeping ``checkpoint_best.pth``), on rank 0. A stop request cuts
        either short (:meth:`~pretrain.stop.StopSignals.cut_short`): what it did not measure is left out of the
        epoch's figures, and the run stops at its next step, with the epoch saved."""
        cfg, figures, doing = self.cfg, {}, None
        try:
            if self.signals.held_out is not None and self._due(epoch, cfg.val_every):
                doing = "held-out loss"
                with self.stop.cut_short():
                    held_out = self.signals.held_out(self.model, self.device, self.precision, cfg.batch_size)
                figures.update(held_out)
            if self.signals.probe is not None and self._due(epoch, cfg.probe_interval()):
                from nnunetv2_hiendmae.probe import probe_score

                doing = "probe"
                with self.stop.cut_short():
                    result = probe_score(self.model.encoder, self.signals.probe, self.device,
                                         batch_size=cfg.batch_size, precision=self.precision)
                self._record_probe(result, epoch)
                figures["probe_dice"] = result.score
        except StopRequested:
            then = "stops at its next step" if epoch + 1 < cfg.epochs else "ends, as it was its last epoch"
            self.log(f"{self.stop.requested.name}: the {doing} of epoch {epoch + 1} was cut short and is left out "
                     f"with the rest of the epoch's evaluation; the run {then}")
        return figures

    def _record_probe(self, result, epoch: int) -> None:
        """Log the probe's score after ``epoch`` (0-based); the best so far goes to ``checkpoint_best.pth``."""
        seen = " (on validation cases the pretraining saw: see the warning above)" if self.signals.probe_leakage else ""
        if result.score > self.best:
            self.best = result.score
            best = self._checkpoint(epoch + 1)
            split = self.signals.probe.split
            best["pretrain"]["best"] = {"epoch": epoch + 1, "probe_dice": result.score,
                                        "probe_dataset": split.dataset_name, "probe_fold": split.fold,
                                        "probe_leakage": self.signals.probe_leakage}
            self.writer.write(best, self.out / BEST)
            self.log(f"probe: mean foreground Dice {result.score:.4f} on {split.dataset_name} fold {split.fold}, "
                     f"the best so far: {self.out / BEST} ({result.seconds:.1f} s){seen}")
        else:
            self.log(f"probe: mean foreground Dice {result.score:.4f} (the best: {self.best:.4f}; "
                     f"{result.seconds:.1f} s){seen}")

    def _record(self, record: dict[str, float]) -> None:
        """Append one epoch to the history; a figure not measured this epoch (or before it appeared) is NaN."""
        epochs = len(self.history.get("loss", []))
        for key in self.history.keys() - record.keys():
            self.history[key].append(math.nan)
        for key, value in record.items():
            self.history.setdefault(key, [math.nan] * epochs).append(value)

    def _want_recon(self, epoch: int) -> bool:
        return self._due(epoch, self.cfg.recon_every) or epoch == 0

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
                            f"{self.cfg.method} {self.cfg.arch}, epoch {epoch + 1}", spacing=self.data.meta["spacing"])

    def _prepare_output(self) -> bool:
        """Check the output folder against the mode, take its lock and restore a resumed run. False: the run is
        already finished (nothing is touched)."""
        latest = self.out / LATEST
        if latest.exists() and self.resume_from is None:
            raise UserError(f"{self.out} already holds a run ({LATEST}); "
                            "pass --resume to continue it or choose another -o")
        if self.resume_from is not None:
            done = self.resume_from["train_state"]["epoch"]
            if done >= self.cfg.epochs and (self.out / FINAL).exists():
                self.start_epoch = done
                return False  # finished: touch nothing (plans pin the final checkpoint)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.lock = RunLock(self.out).__enter__()  # before anything is written: a second run is refused here
            if self.lock.note:
                self.log(self.lock.note)
        if self.resume_from is not None:
            self._restore(self.resume_from)
            self.resume_from = None  # the weights are in the model now
        if self.world_size > 1:
            dist.barrier()
        return True

    def run(self) -> Path:
        """Train, or continue, the run. Whatever stops it once its folder is taken (an interruption, a NaN, a case or
        a checkpoint that cannot be read or written) is written to its log as the line the command prints, and the
        lock is released."""
        final = self.out / FINAL
        try:
            with self.stop:
                if not self._prepare_output():
                    if self.is_main:
                        print(f"already finished: {final} ({self.start_epoch} of {self.cfg.epochs} epochs); "
                              "nothing to do")
                    return final
                return self._train(final)
        except CheckpointNotWritten as e:
            resume = (resume_command(self.out) if (self.out / LATEST).exists() else
                      "start the run again")
            stopped = CheckpointNotWritten(f"{e}; once {self.out} has room for it, continue: {resume}")
            self.log(f"stopped: {stopped}", echo=False)
            raise stopped from None
        except (UserError, Interrupted) as e:
            if self.lock is not None:
                self.log(f"stopped: {e}", echo=False)
            raise
        finally:
            if self.lock is not None:
                self.lock.__exit__(None, None, None)

    def _train(self, final: Path) -> Path:
        cfg = self.cfg
        for note in self.data.notes:
            self.log(f"note: {note}")
        for line in self.signals.probe_leakage:
            self.log(f"warning: probe: {line.strip()}")
        if self.data.val_cases:
            self.log(f"held out of training, scored every {cfg.val_every} epoch(s): {len(self.data.val_cases)} cases "
                     f"({', '.join(self.data.val_cases)})")
        if self.is_main and self.start_epoch == 0 and self.start_iteration == 0:
            n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            self.log(f"nnunetv2_hiendmae {__version__} pretraining, method {cfg.method}: {cfg.arch} "
                     f"({n_params / 1e6:.1f}M trainable params), {self.data.num_cases} cases from "
                     f"{', '.join(d['name'] for d in self.data.meta['datasets'])}, patch {cfg.patch_size}, "
                     f"views per case "
                     f"{ {k: [n, list(s)] for k, (n, s) in self.data.views.items()} }, batch {cfg.batch_size}/rank, "
                     f"{self.data.iters} iters/epoch, {self.world_size} rank(s), {self.device}, {self.precision}")
        loader = make_loader(self.data.crops, cfg.batch_size, cfg.num_workers, self.device.type, self.start_epoch,
                             self.start_iteration, cfg.loader_memory_gib)
        batches = device_batches(loader, self.device)
        t0 = time.perf_counter()
        for epoch in range(self.start_epoch, cfg.epochs):
            start = self.start_iteration if epoch == self.start_epoch else 0
            losses = self.train_epoch(epoch, batches, start, self.partial if start else None)
            crops = (self.data.iters - start) * self.crops_per_step * self.world_size
            # an epoch's time runs from the end of the previous one, so its logging, figures and checkpoint count too
            epoch_time, t0 = time.perf_counter() - t0, time.perf_counter()
            throughput, lr = crops / epoch_time, self.schedule(self.t)
            evaluated = self._evaluate(epoch)
            self._record({**losses, **evaluated, "lr": lr, "crops_per_s": throughput, "epoch_time": epoch_time})
            if self.is_main:
                parts = "  ".join(f"{k} {v:.5f}" for k, v in {**losses, **evaluated}.items())
                self.log(f"epoch {epoch + 1}/{cfg.epochs}  {parts}  lr {lr:.3e}  {throughput:.1f} crops/s  "
                         f"epoch time {epoch_time:.1f} s")
                if epoch + 1 == cfg.epochs or time.monotonic() - self.last_plot >= PLOT_EVERY_S:
                    plot_progress(self.history, self.out / "progress.png")
                    self.last_plot = time.monotonic()
            rise, level = self._loss_rise(losses["loss"])
            if rise >= LOSS_RISE_STOP:
                self._stop_diverged(epoch, losses["loss"], rise, level)
            self._save_latest(epoch + 1, last=epoch + 1 == cfg.epochs, rise=rise)
        if self.is_main:
            self.writer.wait()
            save_checkpoint(self._checkpoint(cfg.epochs), final)
            self.log(f"done: {final}")
        return final


def pretrain(cfg: PretrainConfig, resume_from: dict | None = None) -> Path:
    """Run (or continue) a pretraining; returns the path of ``checkpoint_final.pth``."""
    try:
        return PretrainRun(cfg, resume_from).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def config_from_flags(given: dict, mode: str = "new") -> tuple[PretrainConfig, dict | None]:
    """The run the command's flags ask for: its config, and the checkpoint it resumes (None for a new run).
    ``given`` holds only the settings given on the command line; ``mode``: ``new`` (refuses a folder that holds a
    run), ``resume`` (the run in the folder, with its stored settings; refuses a folder without one) or ``auto``
    (resume if the folder holds a run, else a new one)."""
    out = Path(given["output_dir"])
    latest = out / LATEST
    if mode == "auto":
        mode = "resume" if latest.exists() else "new"
    if mode == "new":
        if "datasets" not in given:
            raise UserError("-d/--datasets is required to start a run (only --resume continues without it)")
        return PretrainConfig(**given), None
    if not latest.is_file():
        raise UserError(f"--resume: {out} holds no run to resume (no {LATEST}); check -o, or leave out --resume "
                        "to start a new run")
    ckpt = load_checkpoint(latest, nnssl=False)
    if "train_state" not in ckpt:
        raise UserError(f"{latest} holds no training state to resume from")
    cfg, changed = resumed_config(ckpt["train_state"]["config"], given)
    if changed and int(os.environ.get("RANK", 0)) == 0:
        print(f"resuming with changed settings: {', '.join(changed)}")
    return cfg, ckpt


def pretrain_from_flags(given: dict, mode: str = "new") -> Path:
    """The command's run (see :func:`config_from_flags`); returns the path of ``checkpoint_final.pth``."""
    return pretrain(*config_from_flags(given, mode))
