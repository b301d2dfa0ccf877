"""Pretraining runs you can trust: a corrupt case is caught before the run (or, if it breaks later, the run stops
in one line with nothing lost and resumes exactly), one run per output folder, and datasets preprocessed differently
are named at the start."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import console_script, copy_preprocessed_dataset, kill_tree, run_cli

from nnunetv2_hiendmae.checkpoint import load_checkpoint
from nnunetv2_hiendmae.errors import UserError
from pretrain import data as pretrain_data
from pretrain.config import PretrainConfig
from pretrain.lock import LOCK, RunLock
from pretrain.train import PretrainRun

TINY = dict(arch="vit_tiny", patch_size=[16, 32, 32], batch_size=2, method_settings={"crops_per_volume": 2},
            warmup_epochs=1, lr=1e-4, num_workers=0, device="cpu", progress_bar=False, checkpoint_minutes=0)


@pytest.fixture
def private_root(preprocessed_dataset, tmp_path, monkeypatch):
    """A private nnUNet_preprocessed holding copies of datasets 990 and 991, for tests that damage or edit them."""
    root = tmp_path / "preprocessed"
    copies = {"labelled": copy_preprocessed_dataset(preprocessed_dataset["preprocessed"], root, 990, "HiEndTest"),
              "pool": copy_preprocessed_dataset(preprocessed_dataset["unlabelled_preprocessed"], root, 991, "Pool")}
    monkeypatch.setenv("nnUNet_preprocessed", str(root))
    return root, copies


def truncate(path, keep: float = 0.5) -> None:
    content = path.read_bytes()
    path.write_bytes(content[:int(len(content) * keep)])


def log_of(out) -> str:
    return "".join(p.read_text() for p in out.glob("training_log_*.txt"))


# ---------------------------------------------------------------------------------------------------- corrupt cases

def test_a_corrupt_case_refuses_the_run_before_it_starts_or_is_left_out_on_request(private_root, tmp_path):
    root, copies = private_root
    damaged = sorted((copies["pool"] / "nnUNetPlans_3d_fullres").glob("*pool_001.b2nd"))[0]
    truncate(damaged)
    case = damaged.name.removesuffix(".b2nd")
    out = tmp_path / "run"
    args = ["nnUNetv2_hiendmae_pretrain", "-d", "990", "991", "-o", str(out), "--arch", "vit_tiny", "--patch-size",
            "16", "32", "32", "--batch-size", "2", "--crops-per-volume", "2", "--num-workers", "0", "--device", "cpu",
            "--no-progress-bar", "--epochs", "1", "--iters-per-epoch", "2"]
    env = {"nnUNet_preprocessed": str(root)}
    refused = run_cli(*args, env=env)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert f"Dataset991_Pool/{case}: unreadable" in lines[0] and "--skip-bad-cases" in lines[0]
    assert not out.exists()
    run_cli(*args, "--skip-bad-cases", env=env, check=True)
    assert f"note: left out (--skip-bad-cases): Dataset991_Pool/{case}" in log_of(out)
    assert load_checkpoint(out / "checkpoint_final.pth")["pretrain"]["datasets"][1]["num_cases"] == 2



def failing_reads(monkeypatch, fails) -> list[str]:
    """Make the run's case reads fail as a truncated file does where ``fails(identifier, reads so far)``; returns
    the identifiers read, in order."""
    crops, calls = pretrain_data.PretrainCrops, []
    real = crops._nnunet_dataset

    def flaky(self, s):
        dataset = real(self, s)

        class Flaky:
            def load_case(self, identifier):
                calls.append(identifier)
                if fails(identifier, calls):
                    raise OSError("blosc2 decompression error: truncated chunk")
                return dataset.load_case(identifier)

        return Flaky()

    monkeypatch.setattr(crops, "_nnunet_dataset", flaky)
    return calls

def test_a_case_that_breaks_during_the_run_stops_it_in_one_line_and_the_run_resumes_exactly(private_root, tmp_path,
                                                                                          monkeypatch):
    """Item 3 of epoch 2 fails to read: the run stops naming the case, after a checkpoint of the last finished step
    (epoch 2, iteration 1); resumed, it ends with exactly the weights of a run that never failed."""
    def config(out):
        return PretrainConfig(datasets=["990"], output_dir=str(out), epochs=3, iters_per_epoch=3, **TINY)

    PretrainRun(config(tmp_path / "straight")).run()
    crops, real = pretrain_data.PretrainCrops, pretrain_data.PretrainCrops._nnunet_dataset
    # the 9th case read (item 8: epoch 2, iteration 2 of 3) fails as a truncated file does
    calls = failing_reads(monkeypatch, lambda identifier, calls: len(calls) == 9)
    out = tmp_path / "broken"
    with pytest.raises(pretrain_data.CaseReadError) as e:
        PretrainRun(config(out)).run()
    message = str(e.value)
    assert "\n" not in message and f"cannot read Dataset990_HiEndTest/{calls[-1]}" in message
    assert "truncated chunk" in message and f"--resume -o {out} --skip-bad-cases" in message
    state = load_checkpoint(out / "checkpoint_latest.pth")["train_state"]
    assert (state["epoch"], state["iteration"]) == (1, 1) and set(state["partial_losses"]) == {"loss"}
    assert not (out / "checkpoint_final.pth").exists()

    monkeypatch.setattr(crops, "_nnunet_dataset", real)  # the case reads again (preprocessed anew)
    from pretrain.train import pretrain_from_flags

    pretrain_from_flags({"output_dir": str(out)}, "resume")
    assert "resumed from" in log_of(out) and "after epoch 1, iteration 1" in log_of(out)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint_final.pth")
    b = load_checkpoint(out / "checkpoint_final.pth")
    assert a["pretrain"]["history"]["loss"] == pytest.approx(b["pretrain"]["history"]["loss"], rel=1e-6)
    for k in a["weights"]:
        torch.testing.assert_close(a["weights"][k], b["weights"][k], rtol=1e-5, atol=1e-6, msg=k)


# ------------------------------------------------------------------------------------------------------ the lock


def test_a_case_that_stays_broken_is_left_out_by_the_advised_resume_with_skip_bad_cases(private_root, tmp_path,
                                                                                      monkeypatch, capsys):
    """The check before the run passes a case that fails to load in epoch 2 (the check reads less of it), and keeps
    failing: the advice, '--resume -o OUT --skip-bad-cases', followed as printed, finishes the run without it."""
    import shlex

    from pretrain.cli import main as pretrain_main

    broken = []

    def fails(identifier, calls):  # the case of the 5th read, from then on every time
        if len(calls) == 5 and not broken:
            broken.append(identifier)
        return identifier in broken

    failing_reads(monkeypatch, fails)
    out = tmp_path / "run"
    with pytest.raises(pretrain_data.CaseReadError) as e:
        PretrainRun(PretrainConfig(datasets=["990"], output_dir=str(out), epochs=3, iters_per_epoch=3, **TINY)).run()
    command = shlex.split(str(e.value).split("continue without it: ", 1)[1])
    assert command[0] == "nnUNetv2_hiendmae_pretrain" and "--skip-bad-cases" in command
    pretrain_main(command[1:])  # as printed; the case still fails to load
    case = f"Dataset990_HiEndTest/{broken[0]}"
    assert f"note: left out (--skip-bad-cases): {case}: could not be read during the run" in log_of(out)
    pretrain = load_checkpoint(out / "checkpoint_final.pth")["pretrain"]
    assert pretrain["epochs_done"] == 3 and pretrain["datasets"][0]["num_cases"] == 5
    assert json.loads((out / pretrain_data.UNREADABLE).read_text()) == [case]

def test_the_lock_is_taken_over_from_a_process_that_is_gone_and_refused_while_its_holder_lives(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    (tmp_path / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid, "started": "yesterday"}))
    with RunLock(tmp_path) as lock:
        assert lock.note == f"took over the lock of a run that is gone (pid {dead_pid}, started yesterday)"
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
        with pytest.raises(UserError, match=f"in use by another pretraining \\(pid {os.getpid()} on this host"):
            RunLock(tmp_path).__enter__()
    assert not (tmp_path / LOCK).exists()  # released
    (tmp_path / LOCK).write_text(json.dumps({"host": "node-17", "pid": dead_pid, "started": "today"}))
    with pytest.raises(UserError, match=f"pid {dead_pid} on host node-17, started today.*delete"):
        RunLock(tmp_path).__enter__()


def test_a_second_run_in_the_same_folder_is_refused_while_the_first_lives(preprocessed_dataset, tmp_path):
    out = tmp_path / "run"
    args = ["-o", str(out), "--arch", "vit_tiny", "--patch-size", "16", "32", "32", "--batch-size", "2",
            "--crops-per-volume", "2", "--num-workers", "0", "--device", "cpu", "--no-progress-bar",
            "--checkpoint-minutes", "0", "--epochs", "50", "--iters-per-epoch", "20"]
    first = subprocess.Popen([console_script("nnUNetv2_hiendmae_pretrain"), "-d", "990", *args],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (out / "checkpoint_latest.pth").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended too soon"
        second = run_cli("nnUNetv2_hiendmae_pretrain", "--auto-resume", "-d", "990", *args)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1 and f"pid {first.pid} on this host" in lines[0], lines
    finally:
        kill_tree(first)
    done = load_checkpoint(out / "checkpoint_latest.pth")["train_state"]["epoch"]
    taken = run_cli("nnUNetv2_hiendmae_pretrain", "--resume", "-o", str(out), "--epochs", str(done + 1), check=True)
    assert f"took over the lock of a run that is gone (pid {first.pid}" in taken.stdout + log_of(out)
    assert not (out / LOCK).exists()


# ------------------------------------------------------------------------------------------- normalisation differs

def test_datasets_preprocessed_differently_are_named_at_the_start(private_root, tmp_path):
    root, copies = private_root
    plans_file = copies["pool"] / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["foreground_intensity_properties_per_channel"]["0"]["mean"] += 300.0  # another CT pool's statistics
    plans_file.write_text(json.dumps(plans))
    out = tmp_path / "run"
    PretrainRun(PretrainConfig(datasets=["990", "991"], output_dir=str(out), epochs=1, iters_per_epoch=1,
                               **TINY)).run()
    log = log_of(out)
    assert "note: Dataset991_Pool is preprocessed differently from Dataset990_HiEndTest (channel 0 CT mean" in log
    assert "fine-tuning plans take those" in log and "Dataset990_HiEndTest is preprocessed differently" not in log
