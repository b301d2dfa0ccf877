"""Interrupted pretrainings keep their work: Ctrl-C or SIGTERM saves the last finished step, releases the lock and
says in one line how to continue; a checkpoint the disk refuses stops the run in one line (also in its log), keeping
the previous one."""
from __future__ import annotations

import shlex
import signal
import subprocess
import time

import pytest
from conftest import console_script, pretrain_args, run_cli

from nnunetv2_hiendmae.checkpoint import load_checkpoint
from pretrain.lock import LOCK


def log_of(out) -> str:
    return "".join(p.read_text() for p in out.glob("training_log_*.txt"))


def start_and_signal(args: list[str], out, signum: int, tmp_path) -> tuple[int, str]:
    """Start the command in a process group of its own, send ``signum`` to the whole group (as a terminal's Ctrl-C
    and many schedulers do) once the log shows the first epoch, and return its exit code and stderr."""
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        proc = subprocess.Popen([console_script(args[0]), *args[1:]], stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        deadline = time.time() + 600
        while proc.poll() is None and "epoch 1/" not in log_of(out) and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be interrupted; make it longer"
        import os

        os.killpg(proc.pid, signum)
        code = proc.wait(timeout=300)
    return code, stderr.read_text()


@pytest.mark.parametrize("signum,workers", [(signal.SIGINT, "1"), (signal.SIGTERM, "0")])
def test_ctrl_c_or_sigterm_saves_the_last_step_releases_the_lock_and_says_how_to_continue(
        preprocessed_dataset, tmp_path, signum, workers):
    out = tmp_path / "run"
    args = pretrain_args(preprocessed_dataset, out, 3, 6, "--checkpoint-minutes", "60", "--num-workers", workers)
    code, stderr = start_and_signal(args, out, signum, tmp_path)
    lines = stderr.strip().splitlines()
    assert code == 128 + signum and len(lines) == 1, stderr
    name = signal.Signals(signum).name
    assert lines[0].startswith(f"interrupted: {name} at epoch ") and "stopped after the last finished step" in lines[0]
    assert not (out / LOCK).exists() and not (out / "checkpoint_final.pth").exists()
    state = load_checkpoint(out / "checkpoint_latest.pth")["train_state"]  # no periodic one was due for 60 minutes
    assert state["epoch"] * 6 + state["iteration"] >= 6  # at least the first epoch is kept
    assert f"{out / 'checkpoint_latest.pth'} holds " in lines[0]
    assert f"stopped: {lines[0].removeprefix('interrupted: ')}" in log_of(out)

    command = shlex.split(lines[0].split("continue with: ", 1)[1])  # the advice, followed as printed
    resumed = run_cli(*command, check=True)
    assert f"resumed from {out / 'checkpoint_latest.pth'}" in resumed.stdout
    assert len(load_checkpoint(out / "checkpoint_final.pth")["pretrain"]["history"]["loss"]) == 3
