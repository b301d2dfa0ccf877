"""What a pretraining will cost, before it runs (``nnUNetv2_hiendmae_pretrain ... --estimate``).

The run is built exactly as it would be (datasets, held-out cases, model, optimiser, compilation, loader workers),
as rank 0 of the planned number of ranks (``WORLD_SIZE``, without starting them), and nothing is written. The loader
alone produces a few batches from the real cases (worker start-up excluded). Before any full-size step, the memory
of a step is measured at 1 and 2 volumes (uncompiled) and extrapolated linearly to the batch size: where that does
not fit the device (the GPU's memory, or the host's available memory on a CPU), the estimate says so, with the
largest batch size that fits, instead of being killed by the out-of-memory killer. Otherwise the model alone takes a
few full training steps on one batch (device augmentation, forward, backward, optimiser step), after ``warmup``
steps that hold compilation. The slower of the two sets the pace: an epoch is ``iterations x max(step, batch)``,
and the run is that times the epochs left, plus compilation once. All ranks are assumed as fast as this one.
"""
from __future__ import annotations

import io
import os
import resource
import sys
import time
from pathlib import Path

import torch

from nnunetv2_hiendmae.precision import autocast
from pretrain.augment import augment_views
from pretrain.data import make_loader
from pretrain.train import PretrainRun, rng_state


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(run: PretrainRun, batch: dict[str, torch.Tensor], model=None) -> None:
    """One full step as the run takes it (no accumulation): augment, forward, backward, optimiser step; ``model``:
    the run's compiled model unless given."""
    with autocast(run.device, run.precision):
        loss = (model or run.compiled)(augment_views(batch))["loss"]
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        loss.backward()
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def _data_bytes(run: PretrainRun) -> int:
    """Bytes on disk of the preprocessed cases the run reads (each case's files: data, segmentation, properties)."""
    total = 0
    for src in run.data.sources:
        folder = Path(src.folder)
        for case in src.identifiers:
            total += sum(p.stat().st_size for p in folder.glob(f"{case}[._]*") if p.is_file())
    return total


def _peak_bytes(device: torch.device) -> int:
    """The peak memory so far: the GPU's allocations since the last reset, or the process's resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def available_bytes(device: torch.device) -> int:
    """The memory a step may take: the GPU's free memory plus what this process holds, or on a CPU the host's
    available memory (``MemAvailable`` of ``/proc/meminfo``, else its free pages) plus this process's peak so far."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        free = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return free + _peak_bytes(device)


def step_memory(run: PretrainRun, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``(bytes at 1 volume, bytes per further volume)`` of a training step (augment, forward, backward, optimiser
    step, uncompiled: no shape is compiled for it), from steps at 1 and 2 volumes of ``batch`` (at 1 only for a batch
    of 1); the optimiser's state is allocated by the first."""
    peaks = []
    for volumes in range(1, min(2, next(iter(batch.values())).shape[0]) + 1):
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        _train_step(run, {k: v[:volumes] for k, v in batch.items()}, run.ddp)
        _sync(run.device)
        peaks.append(_peak_bytes(run.device))
    return peaks[0], max(0, peaks[-1] - peaks[0])


def estimate(run: PretrainRun, steps: int = 5, warmup: int = 2, remaining_epochs: int | None = None) -> dict:
    """The figures of a run before it runs: crops/s of the model and of the loader and which one limits, seconds per
    epoch, the whole run's wall time and device-hours, peak memory (device, or the process's on a CPU) and the host
    memory of the loader per rank (pinned and shared), the size of one ``checkpoint_latest.pth`` and of the
    preprocessed data, and compilation's start-up. Where a step of the batch size would not fit (:func:`step_memory`,
    :func:`available_bytes`), ``fits`` is False, the model's figures are None and ``largest_batch_size`` says what
    fits."""
    cfg, device = run.cfg, run.device
    loader = make_loader(run.data.crops, cfg.batch_size, cfg.num_workers, device.type, memory_gib=cfg.loader_memory_gib)
    source = iter(loader)
    t0 = time.perf_counter()
    batch = next(source)
    loader_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(warmup + steps - 1):
        next(source)
    batch_s = (time.perf_counter() - t0) / (warmup + steps - 1)
    del source, loader  # the workers stop
    batch = {k: v.to(device) for k, v in batch.items()}
    run.model.train()
    first, per_volume = step_memory(run, batch)
    need, have = first + (cfg.batch_size - 1) * per_volume, available_bytes(device)
    fits = need <= have
    largest = cfg.batch_size if fits else max(0, 1 + (have - first) // per_volume if per_volume else 0)
    figures = {"fits": fits, "needed_memory_bytes": int(need), "available_memory_bytes": int(have),
               "largest_batch_size": int(largest)}
    memory = run.data.loader_memory
    figures.update(host_pinned_bytes=memory.pinned_bytes, host_shared_bytes=memory.shared_bytes,
                   loader_workers=memory.workers, loader_batches_in_flight=memory.in_flight)
    if not fits:
        return {**_plan(run, remaining_epochs), **figures, "loader_crops_per_s": run.crops_per_step / batch_s,
                "loader_s_per_batch": batch_s, "loader_start_s": loader_start, "model_crops_per_s": None}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            warm_s, t0 = time.perf_counter() - t0, time.perf_counter()
        _train_step(run, batch)
    _sync(device)
    step_s = (time.perf_counter() - t0) / steps
    peak = _peak_bytes(device)
    buffer = io.BytesIO()
    torch.save(run._checkpoint(0, [rng_state(device)]), buffer)
    compiled = run.compiled is not run.ddp
    compile_s = max(0.0, warm_s - warmup * step_s) if compiled else 0.0
    epochs = cfg.epochs if remaining_epochs is None else remaining_epochs
    epoch_s = run.data.iters * max(step_s, batch_s)
    run_s = epochs * epoch_s + compile_s
    crops = run.crops_per_step
    return {
        **_plan(run, remaining_epochs), **figures,
        "model_crops_per_s": crops / step_s, "model_s_per_step": step_s,
        "loader_crops_per_s": crops / batch_s, "loader_s_per_batch": batch_s, "loader_start_s": loader_start,
        "limited_by": "model" if step_s >= batch_s else "loader",
        "epoch_s": epoch_s, "run_s": run_s, "device_hours": run_s * run.world_size / 3600,
        "peak_memory_bytes": int(peak), "peak_memory_kind": "device" if device.type == "cuda" else "process",
        "checkpoint_bytes": buffer.getbuffer().nbytes, "data_bytes": _data_bytes(run),
        "compile": compiled, "compile_s": compile_s,
    }


def _plan(run: PretrainRun, remaining_epochs: int | None) -> dict:
    """What the estimate is of: the method, the device, the ranks and the shape of an epoch."""
    cfg = run.cfg
    return {"method": cfg.method, "arch": cfg.arch, "device": str(run.device), "precision": run.precision,
            "ranks": run.world_size, "batch_size": cfg.batch_size, "crops_per_step": run.crops_per_step,
            "iterations_per_epoch": run.data.iters, "num_workers": cfg.num_workers,
            "epochs": cfg.epochs if remaining_epochs is None else remaining_epochs}


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 3 * 86400 else f"{seconds / 86400:.1f} days"


def format_estimate(e: dict) -> str:
    """One line per figure, for a person."""
    gib = 2 ** 30
    host = (f"host memory per rank for the loader: {e['host_pinned_bytes'] / gib:.2f} GiB pinned, "
            f"{e['host_shared_bytes'] / gib:.2f} GiB shared (/dev/shm: {e['loader_batches_in_flight']} batch(es) in "
            f"flight over {e['loader_workers']} worker(s); a container needs --shm-size of the shared figure times "
            f"the ranks on the node)")
    if not e["fits"]:
        return "\n".join([
            f"estimate for {e['method']} {e['arch']} on {e['device']} ({e['precision']}), {e['ranks']} rank(s): "
            f"batch {e['batch_size']} volumes ({e['crops_per_step']} crops) per rank",
            f"does not fit: a step needs about {e['needed_memory_bytes'] / gib:.1f} GiB, {e['device']} has "
            f"{e['available_memory_bytes'] / gib:.1f} GiB available (measured at 1 and 2 volumes, nothing larger "
            f"was run)",
            f"what would fit: --batch-size {e['largest_batch_size']} (more ranks keep the volumes per step: "
            f"--batch-size is per rank), or fewer crops per volume, a smaller --patch-size or a smaller --arch"
            if e["largest_batch_size"] else "what would fit: not even 1 volume; a smaller --patch-size or --arch",
            f"loader: {e['loader_crops_per_s']:.1f} crops/s with {e['num_workers']} worker(s)",
            host,
        ])
    compile_line = (f"torch.compile: on; its start-up, about {_duration(e['compile_s'])}, is included above"
                    if e["compile"] else "torch.compile: off (on CUDA it is on by default and adds minutes of "
                                         "start-up once)")
    return "\n".join([
        f"estimate for {e['method']} {e['arch']} on {e['device']} ({e['precision']}), {e['ranks']} rank(s): "
        f"{e['iterations_per_epoch']} iterations per epoch of {e['batch_size']} volumes ({e['crops_per_step']} crops) "
        f"per rank, {e['epochs']} epochs",
        f"model: {e['model_crops_per_s']:.1f} crops/s per rank ({e['model_s_per_step']:.3f} s per step)",
        f"loader: {e['loader_crops_per_s']:.1f} crops/s with {e['num_workers']} worker(s) "
        f"({e['loader_s_per_batch']:.3f} s per batch; {e['loader_start_s']:.1f} s to start)",
        f"limited by: the {e['limited_by']}",
        f"time per epoch: {_duration(e['epoch_s'])}",
        f"whole run: {_duration(e['run_s'])} wall time, {e['device_hours']:.2f} device-hours on {e['ranks']} rank(s)",
        f"peak {e['peak_memory_kind']} memory: {e['peak_memory_bytes'] / gib:.2f} GiB "
        f"(of {e['available_memory_bytes'] / gib:.1f} GiB available)",
        host,
        f"one checkpoint_latest.pth: {e['checkpoint_bytes'] / 2**20:.1f} MiB",
        f"preprocessed data read: {e['data_bytes'] / 2**20:.1f} MiB on disk",
        compile_line,
    ])
