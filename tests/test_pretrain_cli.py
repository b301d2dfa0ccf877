"""``nnUNetv2_hiendmae_pretrain`` end to end on a tiny nnU-Net-preprocessed dataset (CPU)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import console_script, run_cli
from nnunetv2_hiendmae.checkpoint import FORMAT, encoder_state_dict, load_checkpoint, save_atomic

TINY = ["--arch", "vit_tiny", "--patch-size", "16", "32", "32", "--batch-size", "2", "--crops-per-volume", "4",
        "--num-workers", "0", "--device", "cpu", "--no-progress-bar", "--warmup-epochs", "1"]


def pretrain_args(ds, out, epochs, iters, *extra):
    return ["nnUNetv2_hiendmae_pretrain", "-d", str(ds["id"]), str(ds["unlabelled_id"]), "-o", str(out), *TINY,
            "--epochs", str(epochs), "--iters-per-epoch", str(iters), *extra]


@pytest.fixture(scope="module")
def trained(preprocessed_dataset, tmp_path_factory):
    """A few hundred CPU steps of vit_tiny on datasets 990 + 991."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    proc = run_cli(*pretrain_args(preprocessed_dataset, out, 12, 40, "--lr", "1e-3", "--recon-every", "4"), check=True)
    return out, proc


def test_loss_clearly_decreases(trained):
    out, _ = trained
    history = load_checkpoint(out / "checkpoint_final.pth")["pretrain"]["history"]
    assert len(history["loss"]) == 12
    # 1.0 = predicting each patch's mean; voxel noise keeps the floor high on such small crops, and the per-epoch
    # loss of 40 small batches fluctuates by ~2%, so the last epochs must beat the first clearly, not marginally
    first, last = history["loss"][0], history["loss"][-3:]
    assert min(last) < 0.93 * first and sum(last) / 3 < 0.96 * first, history["loss"]
    assert all(v > 0 for v in history["crops_per_s"])
    assert history["lr"][0] > history["lr"][-1] >= 0  # cosine decay after the warm-up epoch


def test_outputs_and_checkpoint_metadata(trained, preprocessed_dataset):
    out, proc = trained
    for name in ("checkpoint_latest.pth", "checkpoint_final.pth", "progress.png", "reconstruction_epoch_0001.png",
                 "reconstruction_epoch_0004.png", "reconstruction_epoch_0012.png"):
        assert (out / name).is_file(), name
    logs = list(out.glob("training_log_*.txt"))
    assert len(logs) == 1 and "epoch 12/12" in logs[0].read_text()
    assert "checkpoint_final.pth" in proc.stdout

    ckpt = torch.load(out / "checkpoint_final.pth", weights_only=True)
    assert ckpt["format"] == FORMAT and ckpt["method"] == "hiendmae" and "train_state" not in ckpt
    assert ckpt["encoder"]["arch"] == "vit_tiny" and ckpt["encoder"]["in_channels"] == 1
    meta = ckpt["pretrain"]
    assert [d["name"] for d in meta["datasets"]] == [preprocessed_dataset["name"], preprocessed_dataset["unlabelled_name"]]
    import json

    plans = json.loads((preprocessed_dataset["preprocessed"] / "nnUNetPlans.json").read_text())
    assert meta["spacing"] == pytest.approx(plans["configurations"]["3d_fullres"]["spacing"])
    assert meta["normalization_schemes"] == ["CTNormalization"]
    assert meta["foreground_intensity_properties_per_channel"]["0"]["std"] == pytest.approx(
        plans["foreground_intensity_properties_per_channel"]["0"]["std"])
    assert meta["crop_size"] == [16, 32, 32] and meta["token_size"] == [16, 16, 16] and meta["mask_ratio"] == 0.75
    assert meta["epochs_done"] == 12 and meta["plans"] == "nnUNetPlans" and meta["configuration"] == "3d_fullres"
    assert ckpt["model"]["decoder"]["embed_dim"] == 48
    enc = encoder_state_dict(ckpt)
    assert "patch_embed.proj.weight" in enc and "blocks.3.mlp.fc2.bias" in enc
    latest = torch.load(out / "checkpoint_latest.pth", weights_only=True)
    assert latest["train_state"]["epoch"] == 12 and latest["train_state"]["global_step"] == 12 * 40


def test_kill_and_resume_continues_where_it_stopped(preprocessed_dataset, tmp_path):
    """A run killed mid-way and resumed ends with exactly the weights of an uninterrupted run."""
    args = lambda out, *extra: pretrain_args(preprocessed_dataset, out, 6, 30, *extra)  # noqa: E731
    run_cli(*args(tmp_path / "straight"), check=True)

    out = tmp_path / "killed"
    killed_at = kill_after_epoch([console_script(args(out)[0]), *args(out)[1:]], out, 2)
    assert 2 <= killed_at < 6

    resumed = run_cli(*args(out, "--resume"), check=True)
    assert_resumed(out, killed_at, resumed, tmp_path / "straight")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), so a kill can take the whole tree at once."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_after_epoch(cmd: list[str], out, epoch: int) -> int:
    """Start ``cmd``, SIGKILL its whole process group once ``checkpoint_latest.pth`` has ``epoch`` epochs done;
    returns the epochs done in the checkpoint left behind."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest, deadline = out / "checkpoint_latest.pth", time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and torch.load(latest, weights_only=True)["train_state"]["epoch"] >= epoch:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail("the run finished before it could be killed; make it longer")
    for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun starts its workers in sessions of their own
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoint_final.pth").exists()
    return torch.load(latest, weights_only=True)["train_state"]["epoch"]


def assert_resumed(out, killed_at: int, resumed, straight) -> None:
    """The resumed run says so and ends with the loss history and weights of the uninterrupted one."""
    log = "".join(p.read_text() for p in out.glob("training_log_*.txt"))
    assert f"resumed from {out / 'checkpoint_latest.pth'} after epoch {killed_at}" in log, resumed.stdout
    a = torch.load(straight / "checkpoint_final.pth", weights_only=True)
    b = torch.load(out / "checkpoint_final.pth", weights_only=True)
    assert a["pretrain"]["history"]["loss"] == pytest.approx(b["pretrain"]["history"]["loss"], rel=1e-6)
    for k in a["weights"]:
        torch.testing.assert_close(a["weights"][k], b["weights"][k], rtol=1e-5, atol=1e-6, msg=k)


def test_torchrun_two_ranks_shard_data_mask_differently_and_resume(preprocessed_dataset, tmp_path):
    """DDP on CPU (gloo): two ranks, one log and one checkpoint (rank 0), per-rank RNG state, exact resume."""
    def cmd(out, *extra):
        args = pretrain_args(preprocessed_dataset, out, 4, 4, *extra)
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                console_script(args[0]), *args[1:]]

    straight = tmp_path / "straight"
    proc = subprocess.run(cmd(straight), capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(straight.glob("training_log_*.txt"))) == 1
    final = load_checkpoint(straight / "checkpoint_final.pth")
    assert final["pretrain"]["world_size"] == 2 and len(final["pretrain"]["history"]["loss"]) == 4
    rng = load_checkpoint(straight / "checkpoint_latest.pth")["train_state"]["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])

    out = tmp_path / "killed"
    killed_at = kill_after_epoch(cmd(out), out, 2)
    assert 2 <= killed_at < 4
    resumed = subprocess.run(cmd(out, "--resume"), capture_output=True, text=True, timeout=900,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_resumed(out, killed_at, resumed, straight)


def test_existing_run_needs_resume_and_resume_refuses_other_settings(trained, preprocessed_dataset):
    out, _ = trained
    proc = run_cli(*pretrain_args(preprocessed_dataset, out, 12, 40, "--lr", "1e-3"))
    assert proc.returncode == 2 and "--resume" in proc.stderr
    proc = run_cli(*pretrain_args(preprocessed_dataset, out, 12, 40, "--lr", "1e-3", "--resume", "--mask-ratio", "0.6"))
    assert proc.returncode == 2 and "mask_ratio" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(preprocessed_dataset, tmp_path, monkeypatch):
    from pretrain import hiend_mae, train

    cfg = train.PretrainConfig(datasets=[str(preprocessed_dataset["id"])], output_dir=str(tmp_path / "nan"),
                               arch="vit_tiny", patch_size=[16, 32, 32], batch_size=2, crops_per_volume=2, epochs=3,
                               iters_per_epoch=3, warmup_epochs=1, num_workers=0, device="cpu", progress_bar=False)
    run = train.PretrainRun(cfg)
    forward = hiend_mae.HiEndMAE.forward

    def nan_in_second_epoch(self, x, shuffle=None):
        loss, pred, shuffle = forward(self, x, shuffle)
        return (loss * float("nan") if run.global_step >= 3 else loss), pred, shuffle

    monkeypatch.setattr(hiend_mae.HiEndMAE, "forward", nan_in_second_epoch)
    with pytest.raises(train.NonFiniteLoss, match="non-finite loss at epoch 2, iteration 1.*last good checkpoint kept"):
        run.run()
    ckpt = load_checkpoint(tmp_path / "nan" / "checkpoint_latest.pth")
    assert ckpt["train_state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["weights"].values())
    assert not (tmp_path / "nan" / "checkpoint_final.pth").exists()


def test_kill_during_checkpoint_write_keeps_previous_file(tmp_path):
    path = tmp_path / "checkpoint_latest.pth"
    save_atomic({"epoch": 1, "w": torch.ones(3)}, path)
    code = (
        "import os, torch\n"
        "from nnunetv2_hiendmae.checkpoint import save_atomic\n"
        "class Die:\n"
        "    def __reduce__(self):\n"
        "        os._exit(9)\n"
        f"save_atomic({{'epoch': 2, 'w': torch.zeros(1000), 'x': Die()}}, {str(path)!r})\n"
    )
    proc = subprocess.run([console_script("python"), "-c", code], capture_output=True)
    assert proc.returncode == 9
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert list(tmp_path.glob("checkpoint_latest.pth")) == [path]


@pytest.mark.parametrize("case,expect", [
    ("unset", "nnUNet_preprocessed"),
    ("missing_dataset", "555"),
    ("not_preprocessed", "nnUNetv2_plan_and_preprocess"),
    ("bad_crop", "not a multiple of the token size"),
])
def test_bad_input_gives_one_clear_line(preprocessed_dataset, tmp_path, case, expect):
    args = pretrain_args(preprocessed_dataset, tmp_path / "out", 1, 1)
    env = None
    if case == "unset":
        env = {"nnUNet_preprocessed": ""}
    elif case == "missing_dataset":
        args[2:4] = ["555"]
    elif case == "not_preprocessed":
        args += ["-p", "nnUNetResEncUNetMPlans"]
    elif case == "bad_crop":
        args[args.index("--patch-size") + 1] = "20"
    proc = run_cli(*args, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], proc.stderr
    assert not (tmp_path / "out" / "checkpoint_latest.pth").exists()
