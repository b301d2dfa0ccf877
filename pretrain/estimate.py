"""What a pretraining will cost, before it runs (``nnUNetv2_hiendmae_pretrain ... --estimate``).

The run is built exactly as it would be (datasets, held-out cases, model, optimiser, compilation, loader workers),
as rank 0 of the planned number of ranks (``WORLD_SIZE``, without starting them), and nothing is written. The loader
alone produces a few batches from the real cases (worker start-up excluded); the model alone then takes a few full
training steps on them (device augmentation, forward, backward, optimiser step), after ``warmup`` steps that hold
compilation. The slower of the two sets the pace: an epoch is ``iterations x max(step, batch)``, and the run is that
times the epochs left, plus compilation once. All ranks are assumed as fast as this one.
"""
from __future__ import annotations

import io
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


def _train_step(run: PretrainRun, batch: dict[str, torch.Tensor]) -> None:
    """One full step as the run takes it (no accumulation): augment, forward, backward, optimiser step."""
    with autocast(run.device, run.precision):
        loss = run.compiled(augment_views(batch))["loss"]
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


def estimate(run: PretrainRun, steps: int = 5, warmup: int = 2, remaining_epochs: int | None = None) -> dict:
    """The figures of a run before it runs: crops/s of the model and of the loader and which one limits, seconds per
    epoch, the whole run's wall time and device-hours, peak memory (device, or the process's on a CPU), the size of
    one ``checkpoint_latest.pth`` and of the preprocessed data, and compilation's start-up."""
    cfg, device = run.cfg, run.device
    loader = make_loader(run.data.crops, cfg.batch_size, cfg.num_workers, device.type)
    source = iter(loader)
    t0 = time.perf_counter()
    batches = [next(source)]
    loader_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    batches += [next(source) for _ in range(warmup + steps - 1)]
    batch_s = (time.perf_counter() - t0) / (warmup + steps - 1)
    del source, loader  # the workers stop
    on_device = [{k: v.to(device) for k, v in b.items()} for b in batches]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run.model.train()
    _sync(device)
    t0 = time.perf_counter()
    for i, batch in enumerate(on_device):
        if i == warmup:
            _sync(device)
            warm_s, t0 = time.perf_counter() - t0, time.perf_counter()
        _train_step(run, batch)
    _sync(device)
    step_s = (time.perf_counter() - t0) / steps
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024))
    buffer = io.BytesIO()
    torch.save(run._checkpoint(0, [rng_state(device)]), buffer)
    compiled = run.compiled is not run.ddp
    compile_s = max(0.0, warm_s - warmup * step_s) if compiled else 0.0
    epochs = cfg.epochs if remaining_epochs is None else remaining_epochs
    epoch_s = run.data.iters * max(step_s, batch_s)
    run_s = epochs * epoch_s + compile_s
    crops = run.crops_per_step
    return {
        "method": cfg.method, "arch": cfg.arch, "device": str(device), "precision": run.precision,
        "ranks": run.world_size, "batch_size": cfg.batch_size, "crops_per_step": crops,
        "iterations_per_epoch": run.data.iters, "epochs": epochs, "num_workers": cfg.num_workers,
        "model_crops_per_s": crops / step_s, "model_s_per_step": step_s,
        "loader_crops_per_s": crops / batch_s, "loader_s_per_batch": batch_s, "loader_start_s": loader_start,
        "limited_by": "model" if step_s >= batch_s else "loader",
        "epoch_s": epoch_s, "run_s": run_s, "device_hours": run_s * run.world_size / 3600,
        "peak_memory_bytes": int(peak), "peak_memory_kind": "device" if device.type == "cuda" else "process",
        "checkpoint_bytes": buffer.getbuffer().nbytes, "data_bytes": _data_bytes(run),
        "compile": compiled, "compile_s": compile_s,
    }


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 3 * 86400 else f"{seconds / 86400:.1f} days"


def format_estimate(e: dict) -> str:
    """One line per figure, for a person."""
    gib = 2 ** 30
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
        f"peak {e['peak_memory_kind']} memory: {e['peak_memory_bytes'] / gib:.2f} GiB",
        f"one checkpoint_latest.pth: {e['checkpoint_bytes'] / 2**20:.1f} MiB",
        f"preprocessed data read: {e['data_bytes'] / 2**20:.1f} MiB on disk",
        compile_line,
    ])
