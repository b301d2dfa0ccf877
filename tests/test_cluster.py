"""What a GPU cluster node does to a run, shown on the CPU: several gloo ranks, a slow rank 0, a process-group
timeout, a scheduler's SIGTERM in the middle of an epoch, a resume on another number of ranks, then nnU-Net's
planning and fine-tuning of the checkpoint."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SLOW_RANK_ZERO, TRAIN_ENV, descendants, run_cli, start_paused

from nnunetv2_hiendmae.checkpoint import encoder_state_dict, load_checkpoint
from nnunetv2_hiendmae.ext import ext_path
from nnunetv2_hiendmae.plans import main as plan_main
from pretrain.lock import LOCK
from pretrain.train import LRSchedule

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
RANK_ENV = {"OMP_NUM_THREADS": "1"}  # one thread per rank: 4 ranks share 2 cores
POOL_ID, POOL_SCANS, VAL_CASES = 988, 200, 8


def make_pool(tmp_path: Path) -> str:
    """A pool of :data:`POOL_SCANS` generated scans (the demo's phantom at 0.3 of its field of view: about 10 x 22 x
    22 voxels), preprocessed like dataset 990 by ``nnUNetv2_hiendmae_preprocess_unlabeled`` (in this process: one
    process start instead of one per worker). Returns the dataset's name."""
    from nnunetv2_hiendmae.demo.synthetic import make_case, write_image
    from pretrain.unlabeled_cli import main as preprocess_unlabeled

    rng, scans = np.random.default_rng(26), tmp_path / "scans"
    scans.mkdir()
    for i in range(POOL_SCANS):
        image, _, spacing = make_case(rng, 0.3)
        write_image(image, spacing, scans / f"scan_{i:03d}.nii.gz")
    preprocess_unlabeled(["-i", str(scans), "-d", str(POOL_ID), "--name", "Node", "--like", "990", "-np", "1"])
    return f"Dataset{POOL_ID}_Node"


@pytest.mark.slow
def test_a_node_rehearsal_sigterm_in_an_epoch_resume_on_fewer_ranks_then_plan_and_fine_tune(
        preprocessed_dataset, nnunet_dirs, tmp_path):
    """4 gloo ranks pretrain on a pool of 200 scans with held-out cases and a probe, rank 0 slowed: fingerprinting costs
    it 0.1 s a case, 20 s alone, over the 15 s timeout, 5 s for its quarter (the ranks share the work), so the run
    starts. The scheduler's SIGTERM in the middle of epoch 2, to every process of the job as Slurm sends it (each rank
    gets it twice: torchrun forwards it), stops every rank after the same step: rank 0 saves it, releases the lock and
    prints the one line that says how to continue; the other ranks say nothing. That command, followed on 2 ranks,
    finishes the run with the schedule of an uninterrupted one (the learning rate of every epoch, the epochs, the
    iterations of 2 ranks, every history entry), and nnU-Net plans and fine-tunes a fold from its checkpoint."""
    pool = make_pool(tmp_path)
    out = tmp_path / "run"
    epochs, lr = 3, 1e-4
    args = ["-d", str(POOL_ID), "-o", str(out), "--arch", "vit_tiny", "--patch-size", "16", "32", "32",
            "--crops-per-volume", "1", "--batch-size", "4", "--num-workers", "0", "--device", "cpu",
            "--no-progress-bar", "--epochs", str(epochs), "--warmup-epochs", "1", "--lr", str(lr),
            "--checkpoint-minutes", "60", "--recon-every", "100", "--val-cases", str(VAL_CASES),
            "--probe-dataset", str(preprocessed_dataset["id"]), "--probe-every", str(epochs),
            "--dist-timeout-minutes", "0.25"]
    iters = {4: (POOL_SCANS - VAL_CASES) // (4 * 4), 2: (POOL_SCANS - VAL_CASES) // (2 * 4)}  # 12 and 24
    stop_after = iters[4] + iters[4] // 2  # half of epoch 2
    proc = start_paused([*TORCHRUN, "--standalone", "--nproc_per_node", "4", str(SLOW_RANK_ZERO), "0.1", *args],
                        stop_after, tmp_path, RANK_ENV)
    for pid in [proc.pid, *descendants(proc.pid)]:  # as Slurm signals a job: every process; torchrun forwards it too
        os.kill(pid, signal.SIGTERM)
    stderr = proc.communicate(timeout=300)[1]

    ours = [line for line in stderr.splitlines() if "interrupted" in line]
    assert len(ours) == 1 and ours[0].startswith(f"interrupted: SIGTERM at epoch 2, iteration {iters[4] // 2 + 1} of "
                                                 f"{iters[4]}: stopped after the last finished step; "), stderr[-3000:]
    # torchrun's own lines: its warnings, then the traceback of its agent's SignalException (exit status 1)
    assert stderr.count("Traceback") == 1 and stderr.rstrip().endswith("got signal: 15"), stderr[-3000:]
    assert proc.returncode == 1 and not (out / LOCK).exists() and not (out / "checkpoint_final.pth").exists()
    state = load_checkpoint(out / "checkpoint_latest.pth")["train_state"]
    assert (state["epoch"], state["iteration"], state["global_step"]) == (1, iters[4] // 2, stop_after)
    assert f"{out / 'checkpoint_latest.pth'} holds epoch 2 up to iteration {iters[4] // 2}; " in ours[0]

    command = shlex.split(ours[0].split("continue with: ", 1)[1])
    assert command[:3] == ["torchrun", "--standalone", "--nproc_per_node=4"]
    resumed = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node=2", *command[3:]], capture_output=True,
                             text=True, timeout=600, env={**os.environ, **RANK_ENV})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = "".join(p.read_text() for p in out.glob("training_log_*.txt"))
    assert f"resumed from {out / 'checkpoint_latest.pth'} after epoch 1, iteration {iters[2] // 2}" in log
    assert f"4 -> 2 rank(s): 16 -> 8 volumes per iteration over all ranks, {iters[4]} -> {iters[2]} iterations" in log

    final = load_checkpoint(out / "checkpoint_final.pth")
    run = final["pretrain"]
    schedule = LRSchedule(lr, 1, epochs)
    assert (run["epochs_done"], run["world_size"], run["iters_per_epoch"]) == (epochs, 2, iters[2])
    assert run["history"]["lr"] == pytest.approx([schedule(e + 1) for e in range(epochs)], rel=1e-9)
    assert {k: len(v) for k, v in run["history"].items()} == dict.fromkeys(run["history"], epochs)
    assert all(np.isfinite(run["history"][k]).all() for k in ("loss", "val_loss"))
    assert np.isnan(run["history"]["probe_dice"][:-1]).all() and run["history"]["probe_dice"][-1] > 0
    assert len(run["val_cases"]) == VAL_CASES and len(run["case_fingerprints"]) == POOL_SCANS
    assert {case.split("/")[0] for case in run["case_fingerprints"]} == {pool}

    plans = "nnUNetPlans_node"
    plan_main(["-d", str(preprocessed_dataset["id"]), "-pt", str(out / "checkpoint_final.pth"), "-o", plans])
    trainer = "nnUNetTrainerHiEndMAE_smoke"
    fine_tuned = run_cli("nnUNetv2_train", str(preprocessed_dataset["id"]), "3d_fullres", "0", "-tr", trainer, "-p",
                         plans, "-device", "cpu", env={"nnUNet_extTrainer": str(ext_path()), **TRAIN_ENV}, check=True)
    assert f"pretrained encoder: {len(encoder_state_dict(final))} tensors loaded" in fine_tuned.stdout
    fold = nnunet_dirs["nnUNet_results"] / preprocessed_dataset["name"] / f"{trainer}__{plans}__3d_fullres" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()


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
