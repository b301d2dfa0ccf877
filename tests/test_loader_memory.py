"""Host memory at real sizes: the loader's batches in flight bounded by bytes, the shared memory a node needs, and an
``--estimate`` that works out the memory of a step before it allocates it."""
from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from nnunetv2_hiendmae.errors import UserError
from pretrain import methods
from pretrain.config import PretrainConfig
from pretrain.data import GIB, LoaderMemory, PretrainCrops, check_shared_memory, make_loader, resolve_sources

MB = 10 ** 6


@pytest.mark.parametrize("method", list(methods.METHODS))
def test_the_batches_in_flight_at_the_vit_b_defaults_fit_the_loader_memory(preprocessed_dataset, method):
    """24 volumes of the method's views of 96^3 in float16, 8 workers: what the loader holds in flight stays within
    --loader-memory-gib (6) with every worker busy; 4 batches per worker would hold 11-21 GB."""
    cfg = PretrainConfig(datasets=[str(preprocessed_dataset["id"])], output_dir="unused", method=method)
    assert (cfg.arch, cfg.batch_size, cfg.patch_size, cfg.num_workers) == ("vit_b16", 24, [96, 96, 96], 8)
    data = PretrainCrops(resolve_sources(cfg.datasets), cfg.views(), 24, dtype="float16")
    batch = data.batch_bytes(24)
    assert batch == 24 * 2 * sum(n * size[0] * size[1] * size[2] for n, size in cfg.views().values())
    loader = make_loader(data, 24, cfg.num_workers, "cuda", memory_gib=cfg.loader_memory_gib)
    in_flight = loader.num_workers * loader.prefetch_factor * batch
    assert loader.num_workers == 8 and loader.pin_memory
    assert 0.5 * cfg.loader_memory_gib * GIB < in_flight <= cfg.loader_memory_gib * GIB, (method, batch / MB)


def test_a_batch_larger_than_the_memory_over_the_workers_takes_fewer_workers(preprocessed_dataset):
    """1 GiB over 8 workers of 340 MB batches: 3 workers of 1 batch each; small batches: 4 per worker at most;
    without workers nothing is shared."""
    data = PretrainCrops(resolve_sources([str(preprocessed_dataset["id"])]), {"crops": (8, (96, 96, 96))}, 24,
                         dtype="float16")
    loader = make_loader(data, 24, 8, "cuda", memory_gib=1.0)
    assert (loader.num_workers, loader.prefetch_factor) == (3, 1)
    assert make_loader(data, 24, 0, "cpu").prefetch_factor is None
    small = PretrainCrops(data.sources, {"crops": (2, (16, 32, 32))}, 24, dtype="float16")
    assert (make_loader(small, 24, 8, "cuda").num_workers, make_loader(small, 24, 8, "cuda").prefetch_factor) == (8, 4)


def test_a_node_whose_dev_shm_cannot_hold_the_batches_is_refused_in_one_line(monkeypatch, tmp_path):
    """A container's default 64 MB /dev/shm cannot hold one ViT-B batch: say what --shm-size it needs."""
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(64 * 2**20, 0, 64 * 2**20))
    memory = LoaderMemory(workers=8, prefetch=2, batch_bytes=340 * MB, pinned=True)
    assert (memory.shared_bytes, memory.pinned_bytes) == (16 * 340 * MB, 18 * 340 * MB)
    with pytest.raises(UserError, match=r"needs 40\.5 GiB of shared memory \(8 rank\(s\) x 16 batch.*--shm-size 41g"):
        check_shared_memory(memory, 8, str(tmp_path))
    check_shared_memory(LoaderMemory(0, 0, 340 * MB, True), 8, str(tmp_path))  # no workers: nothing shared


def test_an_estimate_that_would_not_fit_says_what_fits_without_running_the_full_batch(preprocessed_dataset,
                                                                                      tmp_path, monkeypatch):
    """A step of 1 volume takes 1 GiB and each further volume 0.5 GiB; 3.2 GiB are available: batch 8 needs 4.5 GiB,
    so the estimate says so and that batch 5 fits, and no step of 8 volumes ever runs."""
    from pretrain import estimate
    from pretrain.train import PretrainRun

    cfg = PretrainConfig(datasets=[str(preprocessed_dataset["id"])], output_dir=str(tmp_path / "never"),
                         arch="vit_tiny", patch_size=[16, 32, 32], batch_size=8, num_workers=0,
                         method_settings={"crops_per_volume": 1}, device="cpu", progress_bar=False, iters_per_epoch=1)
    run = PretrainRun(cfg, planned_ranks=1)
    batch = next(iter(make_loader(run.data.crops, 8, 0, "cpu")))
    measured = estimate.step_memory(run, {k: v[:2] for k, v in batch.items()})
    assert measured[0] > 0 and measured[1] >= 0
    steps = []
    real_step = estimate._train_step
    monkeypatch.setattr(estimate, "_train_step", lambda r, batch, model=None: (
        steps.append(next(iter(batch.values())).shape[0]), real_step(r, batch, model)))
    monkeypatch.setattr(estimate, "available_bytes", lambda device: int(3.2 * GIB))
    monkeypatch.setattr(estimate, "step_memory", lambda r, batch: (GIB, GIB // 2))
    figures = estimate.estimate(run)
    assert (figures["fits"], figures["largest_batch_size"], figures["needed_memory_bytes"]) == (False, 5, 4.5 * GIB)
    assert figures["model_crops_per_s"] is None and 8 not in steps
    text = estimate.format_estimate(figures)
    assert "does not fit: a step needs about 4.5 GiB" in text and "--batch-size 5" in text
    assert "host memory per rank for the loader" in text
    monkeypatch.setattr(estimate, "available_bytes", lambda device: 5 * GIB)
    assert estimate.estimate(run, steps=1, warmup=1)["fits"] and steps.count(8) == 2
    assert not (tmp_path / "never").exists()
