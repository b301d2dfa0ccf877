"""Errors that tell the user what to do next: each piece of advice, followed exactly as printed, works."""
from __future__ import annotations

import json
import os
import shlex

from conftest import pretrain_args, run_cli

from nnunetv2_hiendmae.checkpoint import load_checkpoint
from pretrain.lock import LOCK


def one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_resume_without_a_run_and_a_new_run_on_a_folder_holding_one_advise_what_works(preprocessed_dataset,
                                                                                      tmp_path):
    """--resume on an empty folder: 'leave out --resume' starts the run; the same command again on the folder that now
    holds it: 'pass --resume' continues it."""
    out = tmp_path / "run"
    args = pretrain_args(preprocessed_dataset, out, 1, 1)
    line = one_error_line(run_cli(*args, "--resume"))
    assert line.endswith("check -o, or leave out --resume to start a new run")
    run_cli(*args, check=True)  # --resume left out
    assert load_checkpoint(out / "checkpoint_final.pth")["pretrain"]["epochs_done"] == 1

    longer = pretrain_args(preprocessed_dataset, out, 2, 1)
    line = one_error_line(run_cli(*longer))
    assert "pass --resume to continue it or choose another -o" in line
    resumed = run_cli(*longer, "--resume", check=True)  # the same command, with --resume
    assert "resuming with changed settings: epochs 1 -> 2" in resumed.stdout
    assert load_checkpoint(out / "checkpoint_final.pth")["pretrain"]["epochs_done"] == 2


def test_a_lock_left_by_another_host_advises_deleting_it_which_lets_the_run_start(preprocessed_dataset, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"host": "node-that-crashed", "pid": 4242, "started": "2026-01-01T00:00:00"}))
    args = pretrain_args(preprocessed_dataset, out, 1, 1)
    line = one_error_line(run_cli(*args))
    assert line.endswith(f"(if that run is gone, delete {out / LOCK})")
    path = shlex.split(line.rsplit("delete ", 1)[1].removesuffix(")"))[0]
    os.remove(path)  # as advised
    run_cli(*args, check=True)
    assert (out / "checkpoint_final.pth").is_file() and not (out / LOCK).exists()
