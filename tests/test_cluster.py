"""What a GPU cluster node does to a run, shown on the CPU: several gloo ranks, a slow rank 0, a process-group
timeout, a resume on another number of ranks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import pretrain_args

from nnunetv2_hiendmae.checkpoint import load_checkpoint

SLOW_RANK_ZERO = Path(__file__).with_name("slow_rank_zero_pretrain.py")


def torchrun(ranks: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(ranks), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_slow_rank_zero_shares_the_fingerprints_and_starts_within_the_timeout(preprocessed_dataset, tmp_path):
    """Fingerprinting the 6 labelled cases costs rank 0 3 s each: alone (18 s) it would outlast the 13.5 s timeout
    while rank 1 waits in DDP's first collective; shared (3 cases each, 9 s) the run starts, trains and records the
    fingerprints of every case."""
    out = tmp_path / "run"
    args = pretrain_args(preprocessed_dataset, out, 1, 1, "--dist-timeout-minutes", "0.225")
    args = [a for a in args if a != str(preprocessed_dataset["unlabelled_id"])]  # only the raw-read dataset
    proc = torchrun(2, str(SLOW_RANK_ZERO), "3", *args[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    pretrain = load_checkpoint(out / "checkpoint_final.pth")["pretrain"]
    assert pretrain["world_size"] == 2 and len(pretrain["history"]["loss"]) == 1
    name = preprocessed_dataset["name"]
    assert sorted(pretrain["case_fingerprints"]) == [f"{name}/case_{i:03d}" for i in range(6)]


def test_the_process_group_waits_as_long_as_dist_timeout_minutes(preprocessed_dataset, tmp_path, monkeypatch):
    """--dist-timeout-minutes is the process group's timeout (PyTorch's default for NCCL, 10 minutes, is too short
    for a fresh run's one-off work on 1,000+ scans)."""
    from datetime import timedelta

    from pretrain import train
    from pretrain.config import PretrainConfig

    seen = {}

    def init_process_group(backend, **kwargs):
        seen.update(kwargs, backend=backend)
        raise InterruptedError  # the test needs nothing more of the run

    monkeypatch.setattr(train.dist, "init_process_group", init_process_group)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = PretrainConfig(datasets=[str(preprocessed_dataset["id"])], output_dir=str(tmp_path), arch="vit_tiny",
                         device="cpu", dist_timeout_minutes=90)
    with pytest.raises(InterruptedError):
        train.PretrainRun(cfg)
    assert seen == {"backend": "gloo", "timeout": timedelta(minutes=90)}
    assert PretrainConfig(datasets=[], output_dir="x").dist_timeout_minutes == 60
