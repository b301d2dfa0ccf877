"""``nnUNetv2_hiendmae_pretrain`` end to end on a tiny nnU-Net-preprocessed dataset (CPU)."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys

import pytest
import torch
from conftest import (
    SLOW_RANK_ZERO,
    assert_resumed,
    cli_error,
    console_script,
    kill_after_epoch,
    make_trainer,
    pretrain_args,
    run_cli,
    start_paused,
)

from nnunetv2_hiendmae.checkpoint import FORMAT, encoder_state_dict, load_checkpoint, save_atomic
from nnunetv2_hiendmae.errors import UserError
from pretrain import methods
from pretrain.lock import LOCK


@pytest.fixture(scope="module")
def trained(preprocessed_dataset, tmp_path_factory):
    """A few hundred CPU steps of vit_tiny on datasets 990 + 991 (8 x 40)."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    proc = run_cli(*pretrain_args(preprocessed_dataset, out, 8, 40, "--lr", "1e-3", "--recon-every", "4"), check=True)
    return out, proc


def test_loss_clearly_decreases(trained):
    out, _ = trained
    history = load_checkpoint(out / "checkpoint_final.pth")["pretrain"]["history"]
    assert len(history["loss"]) == 8
    # 1.0 = predicting each patch's mean; voxel noise keeps the floor high on such small crops (the last 3 of 8
    # epochs average 8-9 % below the first), and the per-epoch loss of 40 small batches fluctuates by ~2%, so every
    # one of the last epochs must beat the first and their mean must beat it clearly (a bound on one epoch alone
    # would be a coin flip on the random stream)
    first, last = history["loss"][0], history["loss"][-3:]
    assert max(last) < first and sum(last) / 3 < 0.96 * first, history["loss"]
    assert all(v > 0 for v in history["crops_per_s"])
    assert history["lr"][0] > history["lr"][-1] >= 0  # cosine decay after the warm-up epoch


def test_outputs_and_checkpoint_metadata(trained, preprocessed_dataset):
    out, proc = trained
    for name in ("checkpoint_latest.pth", "checkpoint_final.pth", "progress.png", "reconstruction_epoch_0001.png",
                 "reconstruction_epoch_0004.png", "reconstruction_epoch_0008.png"):
        assert (out / name).is_file(), name
    logs = list(out.glob("training_log_*.txt"))
    assert len(logs) == 1 and "epoch 8/8" in logs[0].read_text()
    assert "checkpoint_final.pth" in proc.stdout

    ckpt = torch.load(out / "checkpoint_final.pth", weights_only=True)
    assert ckpt["format"] == FORMAT and ckpt["method"] == "hiend_mae" and "train_state" not in ckpt
    assert ckpt["encoder"]["arch"] == "vit_tiny" and ckpt["encoder"]["in_channels"] == 1
    meta = ckpt["pretrain"]
    assert [d["name"] for d in meta["datasets"]] == [preprocessed_dataset["name"],
                                                     preprocessed_dataset["unlabelled_name"]]
    import json

    plans = json.loads((preprocessed_dataset["preprocessed"] / "nnUNetPlans.json").read_text())
    assert meta["spacing"] == pytest.approx(plans["configurations"]["3d_fullres"]["spacing"])
    assert meta["normalization_schemes"] == ["CTNormalization"]
    assert meta["foreground_intensity_properties_per_channel"]["0"]["std"] == pytest.approx(
        plans["foreground_intensity_properties_per_channel"]["0"]["std"])
    assert meta["patch_size"] == [16, 32, 32] and meta["token_size"] == [16, 16, 16]
    from nnunetv2_hiendmae.leakage import dataset_fingerprints

    raw = dataset_fingerprints(preprocessed_dataset["name"], "imagesTr", 1)
    pool = json.loads((preprocessed_dataset["unlabelled_preprocessed"] / "content_fingerprints.json").read_text())
    assert meta["case_fingerprints"] == {**{f"{preprocessed_dataset['name']}/{c}": fp for c, fp in raw.items()},
                                         **{f"{preprocessed_dataset['unlabelled_name']}/{c}": fp
                                            for c, fp in pool.items()}}
    assert ckpt["model"]["settings"] == {"mask_ratio": 0.75, "crops_per_volume": 4}
    assert meta["epochs_done"] == 8 and meta["plans"] == "nnUNetPlans" and meta["configuration"] == "3d_fullres"
    assert ckpt["model"]["decoder"]["embed_dim"] == 48
    enc = encoder_state_dict(ckpt)
    assert "patch_embed.proj.weight" in enc and "blocks.3.mlp.fc2.bias" in enc
    latest = torch.load(out / "checkpoint_latest.pth", weights_only=True)
    assert latest["train_state"]["epoch"] == 8 and latest["train_state"]["global_step"] == 8 * 40


@pytest.mark.slow
@pytest.mark.parametrize("method", list(methods.METHODS))
def test_every_method_resumes_exactly_and_fine_tunes(method, preprocessed_dataset, tmp_path):
    """Each method: checkpoints, a run killed mid-way and resumed with its stored settings ends with exactly the
    weights of an uninterrupted run (GL-MAE's teacher included), and a final checkpoint that nnUNetv2_hiendmae_plan
    and nnUNetTrainerHiEndMAE take unchanged (they read only the encoder)."""
    from nnunetv2_hiendmae.plans import main as plan_main
    from nnunetv2_hiendmae.trainers import nnUNetTrainerHiEndMAE_smoke

    args = lambda out: pretrain_args(preprocessed_dataset, out, 3, 3, method=method)  # noqa: E731
    straight = tmp_path / "straight"
    run_cli(*args(straight), check=True)
    final = load_checkpoint(straight / "checkpoint_final.pth")
    assert final["method"] == method and len(final["pretrain"]["history"]["loss"]) == 3
    losses = {k for k in final["pretrain"]["history"] if k not in ("lr", "crops_per_s", "epoch_time")}
    assert "loss" in losses and len(final["pretrain"]["history"]["loss"]) == 3  # components: tests/test_methods.py
    if method == "gl_mae":
        assert any(k.startswith("teacher_encoder.") for k in final["weights"])

    out = tmp_path / "killed"
    killed_at = kill_after_epoch([console_script(args(out)[0]), *args(out)[1:]], out, 1)
    assert 1 <= killed_at < 3
    resumed = run_cli("nnUNetv2_hiendmae_pretrain", "--resume", "-o", str(out), check=True)  # its stored settings
    assert_resumed(out, killed_at, resumed, straight)

    folder = preprocessed_dataset["preprocessed"]
    plan_main(["-d", str(preprocessed_dataset["id"]), "-pt", str(straight / "checkpoint_final.pth"),
               "-o", f"T_method_{method}", "--spacing", "dataset", "--normalization", "dataset"])
    trainer = make_trainer(nnUNetTrainerHiEndMAE_smoke, folder, f"T_method_{method}")
    trainer.initialize()
    loaded = trainer.network.encoder.state_dict()
    assert encoder_state_dict(final).keys() == loaded.keys()
    assert all(torch.equal(loaded[k], v) for k, v in encoder_state_dict(final).items())


@pytest.mark.slow
def test_torchrun_two_ranks_shard_data_mask_differently_and_resume(preprocessed_dataset, tmp_path):
    """DDP on CPU (gloo): two ranks, one log and one checkpoint (rank 0), per-rank RNG state. A run killed after
    epoch 2 (or 3), resumed, stopped by Ctrl-C in the middle of the next epoch (the terminal's SIGINT to torchrun's
    process group, which torchrun forwards to the ranks) and resumed again by the command it printed, ends exactly as
    the uninterrupted run: both ranks stop after the same step, rank 0 alone saves it and says so in one line."""
    def cmd(out, *extra, program=(console_script("nnUNetv2_hiendmae_pretrain"),)):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *program,
                *pretrain_args(preprocessed_dataset, out, 4, 4, *extra)[1:]]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    proc = subprocess.run(cmd(straight), capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(straight.glob("training_log_*.txt"))) == 1
    final = load_checkpoint(straight / "checkpoint_final.pth")
    assert final["pretrain"]["world_size"] == 2 and len(final["pretrain"]["history"]["loss"]) == 4
    rng = load_checkpoint(straight / "checkpoint_latest.pth")["train_state"]["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])

    out = tmp_path / "killed"
    killed_at = kill_after_epoch(cmd(out), out, 2)
    assert 2 <= killed_at < 4
    ctrl_c = start_paused(cmd(out, "--resume", program=(str(SLOW_RANK_ZERO), "0")), 4 * killed_at + 2, tmp_path, env,
                          start_new_session=True)
    os.killpg(ctrl_c.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    stderr = ctrl_c.communicate(timeout=300)[1]
    ours = [line for line in stderr.splitlines() if "interrupted" in line or "KeyboardInterrupt" in line]
    assert len(ours) == 1 and ours[0].startswith(f"interrupted: SIGINT at epoch {killed_at + 1}, iteration 3 of 4: "
                                                 "stopped after the last finished step; "), stderr[-3000:]
    assert stderr.count("Traceback") == 1 and stderr.rstrip().endswith("got signal: 2"), stderr[-3000:]  # torchrun's
    assert not (out / LOCK).exists()
    state = load_checkpoint(out / "checkpoint_latest.pth")["train_state"]
    assert (state["epoch"], state["iteration"]) == (killed_at, 2)

    command = shlex.split(ours[0].split("continue with: ", 1)[1])  # as printed: the same 2 ranks
    assert command[:3] == ["torchrun", "--standalone", "--nproc_per_node=2"]
    resumed = subprocess.run([*cmd(out)[:3], *command[1:]], capture_output=True, text=True, timeout=900, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_resumed(out, killed_at, resumed, straight)
    log = "".join(p.read_text() for p in out.glob("training_log_*.txt"))
    assert f"resumed from {out / 'checkpoint_latest.pth'} after epoch {killed_at}, iteration 2" in log


def test_a_checkpoint_in_the_middle_of_an_epoch_resumes_on_more_ranks(preprocessed_dataset, tmp_path):
    """Stopped in the middle of an epoch of 5 iterations of 2 volumes (an unreadable case), re-queued on 2 ranks (3
    iterations of 2 x 2 volumes): the position is counted in volumes. After 4 iterations (8 volumes) it goes on from
    iteration 2 of 3, after 2 (4 volumes) from iteration 1, each with the loss sums of the iterations it keeps; after
    1 (2 volumes, less than an iteration) the epoch starts again."""
    from pretrain.config import PretrainConfig
    from pretrain.train import PretrainRun

    out = tmp_path / "run"
    cfg = PretrainConfig(datasets=[str(preprocessed_dataset["id"]), str(preprocessed_dataset["unlabelled_id"])],
                         output_dir=str(out), arch="vit_tiny", patch_size=[16, 32, 32], batch_size=2, epochs=3,
                         method_settings={"crops_per_volume": 1}, num_workers=0, device="cpu", progress_bar=False)
    one = PretrainRun(cfg)
    out.mkdir()
    for iteration, expected, t in ((4, (1, 2, {"loss": 1.0}), 1 + 2 / 3), (2, (1, 1, {"loss": 0.5}), 1 + 1 / 3),
                                   (1, (1, 0, {}), 1.0)):
        ckpt = one._checkpoint(1, one._rng_states(), iteration=iteration, partial={"loss": 0.5 * iteration})
        two = PretrainRun(cfg, resume_from=ckpt, planned_ranks=2)
        assert (one.data.iters, two.data.iters) == (5, 3)
        two._restore(ckpt)
        assert (two.start_epoch, two.start_iteration, two.partial) == expected and two.t == pytest.approx(t)
    log = "".join(p.read_text() for p in out.glob("training_log_*.txt"))
    assert "1 -> 2 rank(s): 2 -> 4 volumes per iteration over all ranks, 5 -> 3 iterations per epoch" in log


def test_a_run_that_diverged_continues_with_a_lower_lr_as_the_message_says(preprocessed_dataset, tmp_path,
                                                                         monkeypatch):
    """The advice printed at a non-finite loss works as printed: --resume with a lower --lr finishes the run."""
    from pretrain import cli, train
    from pretrain.methods import hiend_mae

    forward = hiend_mae.HiEndMAE.forward
    runs = []
    real_run = train.PretrainRun

    class Tracked(real_run):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            runs.append(self)

    def diverges_above_1e_3(self, views):  # a loss that explodes whenever the learning rate is above 1e-3
        losses = forward(self, views)
        lr = runs[-1].optimizer.param_groups[0]["lr"]
        return {**losses, "loss": losses["loss"] * (float("nan") if lr > 1e-3 else 1.0)}

    monkeypatch.setattr(hiend_mae.HiEndMAE, "forward", diverges_above_1e_3)
    monkeypatch.setattr(train, "PretrainRun", Tracked)
    out = tmp_path / "nan"
    argv = pretrain_args(preprocessed_dataset, out, 4, 2, "--lr", "1e-2", "--warmup-epochs", "10")[1:]
    with pytest.raises(train.NonFiniteLoss) as e:
        train.pretrain_from_flags(*cli.parse(argv))
    assert "epoch 2, iteration 2" in str(e.value) and f"--resume -o {out} --lr 0.005" in str(e.value)
    train.pretrain_from_flags(*cli.parse(["--resume", "-o", str(out), "--lr", "1e-3"]))
    final = load_checkpoint(out / "checkpoint_final.pth")
    assert final["pretrain"]["epochs_done"] == 4 and final["pretrain"]["lr"] == 1e-3
    assert all(lr <= 1e-3 for lr in final["pretrain"]["history"]["lr"])
    log = "".join(p.read_text() for p in out.glob("training_log_*.txt"))
    assert "--lr 0.01 -> 0.001: the learning-rate schedule is re-planned" in log


def test_each_step_follows_the_schedule_and_a_resume_changes_grad_clip_and_precision(preprocessed_dataset, tmp_path,
                                                                                    monkeypatch):
    """Every optimiser step takes the learning rate of the point the run has reached (in epochs) and tells the model
    how far the run is; --grad-clip and --precision given on --resume apply from the next epoch on (the gradient
    the optimiser steps with is clipped, the forward runs under bf16 autocast)."""
    from pretrain import train
    from pretrain.methods.hiend_mae import HiEndMAE
    from pretrain.methods.masked import MaskedAutoencoder

    steps, progress, autocast_seen = [], [], []
    adamw_step, forward = torch.optim.AdamW.step, HiEndMAE.forward

    def step(self, *args, **kwargs):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        steps.append((self.param_groups[0]["lr"], torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads])).item()))
        return adamw_step(self, *args, **kwargs)

    def recorded_forward(self, views):
        autocast_seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return forward(self, views)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    monkeypatch.setattr(HiEndMAE, "forward", recorded_forward)
    monkeypatch.setattr(MaskedAutoencoder, "step_done", lambda self, p: progress.append(p))
    out = tmp_path / "run"
    cfg = train.PretrainConfig(datasets=[str(preprocessed_dataset["id"])], output_dir=str(out), arch="vit_tiny",
                               patch_size=[16, 32, 32], batch_size=2, epochs=2, method_settings={"crops_per_volume": 1},
                               iters_per_epoch=2, warmup_epochs=1, lr=1e-4, num_workers=0, device="cpu",
                               progress_bar=False, checkpoint_minutes=0, recon_every=100)
    train.PretrainRun(cfg).run()
    # t = 0, 0.5 (warm-up), 1, 1.5 (cosine over the second epoch): 0, lr/2, lr, lr/2
    assert [lr for lr, _ in steps] == pytest.approx([0, 5e-5, 1e-4, 5e-5]) and progress == [0.25, 0.5, 0.75, 1.0]
    assert min(norm for _, norm in steps) > 1e-2 and autocast_seen == [None] * 4  # not clipped, fp32
    steps.clear(), progress.clear(), autocast_seen.clear()

    train.pretrain_from_flags({"output_dir": str(out), "epochs": 3, "grad_clip": 1e-3, "precision": "bf16"}, "resume")
    replanned = train.LRSchedule(1e-4, 1, 3)
    assert [lr for lr, _ in steps] == pytest.approx([replanned(2), replanned(2.5)]) and replanned(2.5) > 0
    assert progress == pytest.approx([2.5 / 3, 1.0])
    assert all(norm <= 1e-3 * (1 + 1e-4) for _, norm in steps)
    assert autocast_seen == [torch.bfloat16] * 2
    log = "".join(p.read_text() for p in out.glob("training_log_*.txt"))
    assert "--grad-clip None -> 0.001 from epoch 3 on" in log and "--precision auto -> bf16 from epoch 3 on" in log


def test_the_settings_a_resume_may_change_are_listed_from_one_place():
    """--help and the checkpoint docs name every setting of CHANGEABLE_ON_RESUME, as the parser spells it."""
    from pathlib import Path

    from pretrain.cli import build_parser
    from pretrain.config import CHANGEABLE_ON_RESUME

    parser, _ = build_parser()
    text = " ".join(parser.format_help().split())
    docs = (Path(__file__).resolve().parents[1] / "docs" / "checkpoint_format.md").read_text()
    flags = {a.dest: a.option_strings for a in parser._actions if a.dest in CHANGEABLE_ON_RESUME}
    assert flags.keys() == set(CHANGEABLE_ON_RESUME)
    listed = text[text.index("On --resume, only these may differ"):]
    for dest, options in flags.items():
        assert max(options, key=len) in listed, dest
        assert dest == "output_dir" or any(f"`{o}`" in docs for o in options), dest


def test_existing_run_needs_resume_and_resume_refuses_other_settings(trained, preprocessed_dataset, capsys):
    from pretrain.cli import main

    out, _ = trained
    code, lines, _ = cli_error(main, pretrain_args(preprocessed_dataset, out, 8, 40, "--lr", "1e-3")[1:], capsys)
    assert code == 2 and "--resume" in lines[-1]
    for extra, name in ((["--mask-ratio", "0.6"], "mask_ratio"), (["--method", "mae"], "method"),
                        (["--arch", "vit_b16"], "arch")):
        code, lines, _ = cli_error(main, ["--resume", "-o", str(out), *extra], capsys)
        assert code == 2 and len(lines) == 1 and name in lines[0], extra


def snapshot(folder) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()}


def test_resuming_a_finished_run_changes_nothing(trained, capsys):
    """Plans pin the checkpoint they were written from: a finished run resumed (by a re-queued job, say) must not
    rewrite it, nor anything else."""
    from pretrain.cli import main

    out, _ = trained
    before = snapshot(out)
    for mode in ("--resume", "--auto-resume"):
        main([mode, "-o", str(out)])
        assert "already finished" in capsys.readouterr().out, mode
        assert snapshot(out) == before, mode


def test_resume_without_a_run_is_an_error_and_writes_nothing(tmp_path, capsys):
    from pretrain.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (tmp_path / "typo", empty):
        code, lines, _ = cli_error(main, ["--resume", "-o", str(folder)], capsys)
        assert code == 2 and len(lines) == 1 and "holds no run to resume" in lines[0], lines
    assert not (tmp_path / "typo").exists() and list(empty.iterdir()) == []


def test_resume_extends_a_run_with_more_epochs(preprocessed_dataset, tmp_path):
    """--epochs on resume re-plans the cosine for the new length; the steps already done keep their learning rates."""
    from pretrain.train import LRSchedule

    out = tmp_path / "extend"
    run_cli(*pretrain_args(preprocessed_dataset, out, 3, 4), check=True)
    first = load_checkpoint(out / "checkpoint_final.pth")["pretrain"]["history"]
    assert first["lr"][-1] == pytest.approx(0.0, abs=1e-12)  # the 3-epoch cosine ended at 0
    proc = run_cli("nnUNetv2_hiendmae_pretrain", "--resume", "-o", str(out), "--epochs", "5", check=True)
    assert "epochs 3 -> 5" in proc.stdout
    assert "--epochs 3 -> 5: the learning-rate schedule is re-planned (peak 1.000e-04 after 1 warm-up epochs, 0 at " \
           "epoch 5) and followed from epoch 3 on" in proc.stdout
    history = load_checkpoint(out / "checkpoint_final.pth")["pretrain"]["history"]
    plan = LRSchedule(1e-4, 1, 5)  # lr 1e-4, 1 warm-up epoch, 5 epochs
    assert len(history["loss"]) == 5 and history["lr"][:3] == pytest.approx(first["lr"])
    assert history["lr"][3:] == pytest.approx([plan(4), plan(5)]) and history["lr"][3] > 0


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(preprocessed_dataset, tmp_path, monkeypatch):
    from pretrain import train
    from pretrain.methods import hiend_mae

    cfg = train.PretrainConfig(datasets=[str(preprocessed_dataset["id"])], output_dir=str(tmp_path / "nan"),
                               arch="vit_tiny", patch_size=[16, 32, 32], batch_size=2, epochs=3,
                               method_settings={"crops_per_volume": 2}, iters_per_epoch=3, warmup_epochs=1,
                               num_workers=0, device="cpu", progress_bar=False, checkpoint_minutes=0)
    run = train.PretrainRun(cfg)
    forward = hiend_mae.HiEndMAE.forward

    def nan_in_second_epoch(self, views):
        losses = forward(self, views)
        return {**losses, "loss": losses["loss"] * float("nan")} if run.global_step >= 3 else losses

    monkeypatch.setattr(hiend_mae.HiEndMAE, "forward", nan_in_second_epoch)
    with pytest.raises(train.NonFiniteLoss, match="non-finite loss at epoch 2, iteration 1.*last good checkpoint kept"):
        run.run()
    ckpt = load_checkpoint(tmp_path / "nan" / "checkpoint_latest.pth")
    assert ckpt["train_state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["weights"].values())
    assert not (tmp_path / "nan" / "checkpoint_final.pth").exists()


@pytest.mark.parametrize("every_s, drawn_after", [(0.0, [1, 2, 3, 4]), (1e9, [1, 4])])
def test_progress_figure_is_redrawn_at_most_every_plot_interval_and_at_the_end(preprocessed_dataset, tmp_path,
                                                                               monkeypatch, every_s, drawn_after):
    """Short epochs (a small dataset on a GPU) must not wait for matplotlib after each one."""
    from pretrain import train

    drawn = []
    monkeypatch.setattr(train, "PLOT_EVERY_S", every_s)
    monkeypatch.setattr(train, "plot_progress", lambda history, path: drawn.append(len(history["loss"])))
    cfg = train.PretrainConfig(datasets=[str(preprocessed_dataset["id"])], output_dir=str(tmp_path / "run"),
                               arch="vit_tiny", patch_size=[16, 32, 32], batch_size=2, epochs=4,
                               method_settings={"crops_per_volume": 1}, iters_per_epoch=1, warmup_epochs=1,
                               num_workers=0, device="cpu", progress_bar=False, recon_every=100,
                               checkpoint_minutes=0)  # a checkpoint after every epoch must not force a redraw
    train.PretrainRun(cfg).run()
    assert drawn == drawn_after


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
    ("bad_patch_size", "not a multiple of the token size"),
    ("flag_of_another_method", "--global-views: not a setting of method hiend_mae"),
    ("views_the_method_cannot_use", "smaller than --patch-size"),
    ("unknown_method", "invalid choice: 'byol'"),
])
def test_bad_input_gives_one_clear_line(preprocessed_dataset, tmp_path, capsys, case, expect):
    from pretrain.cli import main

    args = pretrain_args(preprocessed_dataset, tmp_path / "out", 1, 1)
    if case == "missing_dataset":
        args[2:4] = ["555"]
    elif case == "not_preprocessed":
        args += ["-p", "nnUNetResEncUNetMPlans"]
    elif case == "bad_patch_size":
        args[args.index("--patch-size") + 1] = "20"
    elif case == "flag_of_another_method":
        args += ["--global-views", "2"]
    elif case == "views_the_method_cannot_use":
        args = pretrain_args(preprocessed_dataset, tmp_path / "out", 1, 1, "--global-size", "8", "32", "32",
                             method="gl_mae")
    elif case == "unknown_method":
        args += ["--method", "byol"]
    if case == "unset":  # the installed command, once (nnU-Net reads its variables when it is imported)
        proc = run_cli(*args, env={"nnUNet_preprocessed": ""})
        code, lines = proc.returncode, proc.stderr.strip().splitlines()
    else:
        code, lines, _ = cli_error(main, args[1:], capsys)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], lines
    assert not (tmp_path / "out" / "checkpoint_latest.pth").exists()


def test_resume_of_a_run_from_before_the_method_registry_is_one_line(tmp_path):
    """0.1.0 stored mask_ratio and crops_per_volume among the run's settings; this version cannot continue it."""
    from pretrain.train import resumed_config

    stored = {"datasets": ["990"], "output_dir": str(tmp_path), "arch": "vit_tiny", "patch_size": [16, 32, 32],
              "mask_ratio": 0.75, "crops_per_volume": 8, "resume": False, "method_settings": {}}
    with pytest.raises(UserError, match="written by an older nnunetv2_hiendmae .* cannot be resumed"):
        resumed_config(stored, {"output_dir": str(tmp_path)})


def test_estimate_prints_what_the_run_will_cost_and_writes_nothing(preprocessed_dataset, tmp_path, capsys):
    import json

    from pretrain.cli import main

    out = tmp_path / "never"
    full = pretrain_args(preprocessed_dataset, out, 40, 1)
    args = full[:full.index("--iters-per-epoch")] + ["--estimate"]  # default iterations: cases / (batch x ranks)
    text = run_cli(*args, check=True).stdout
    for line in ("model: ", "loader: ", "limited by: the ", "time per epoch: ", "whole run: ", "peak process memory: ",
                 "one checkpoint_latest.pth: ", "preprocessed data read: ", "torch.compile: off"):
        assert line in text, line
    one = json.loads(run_cli(*args, "--json", check=True).stdout.strip().splitlines()[-1])
    two = json.loads(run_cli(*args, "--json", env={"WORLD_SIZE": "2"}, check=True).stdout.strip().splitlines()[-1])
    assert not out.exists()
    assert (one["ranks"], one["iterations_per_epoch"], two["ranks"], two["iterations_per_epoch"]) == (1, 5, 2, 3)
    for e in (one, two):
        step = max(e["model_s_per_step"], e["loader_s_per_batch"])
        assert e["epoch_s"] == pytest.approx(e["iterations_per_epoch"] * step)
        assert e["run_s"] == pytest.approx(40 * e["epoch_s"])
        assert e["device_hours"] == pytest.approx(e["run_s"] * e["ranks"] / 3600)
        assert e["model_crops_per_s"] == pytest.approx(e["crops_per_step"] / e["model_s_per_step"])
        assert e["limited_by"] == ("model" if e["model_s_per_step"] >= e["loader_s_per_batch"] else "loader")
        assert e["checkpoint_bytes"] > 4 * 2**20 and e["data_bytes"] > 0 and e["peak_memory_bytes"] > 0
    code, lines, _ = cli_error(main, [*args[1:-1], "--json"], capsys)
    assert code == 2 and "--json goes with --estimate" in lines[-1]


def test_the_estimate_of_a_resume_counts_the_epochs_left(preprocessed_dataset, tmp_path, capsys):
    import json

    from pretrain.cli import main
    from pretrain.config import PretrainConfig
    from pretrain.train import PretrainRun

    out = tmp_path / "run"
    PretrainRun(PretrainConfig(datasets=[str(preprocessed_dataset["id"])], output_dir=str(out), arch="vit_tiny",
                               patch_size=[16, 32, 32], batch_size=2, epochs=1, iters_per_epoch=1, num_workers=0,
                               method_settings={"crops_per_volume": 1}, device="cpu", progress_bar=False)).run()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    main(["--resume", "-o", str(out), "--epochs", "4", "--estimate", "--json"])
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["epochs"] == 3 and figures["run_s"] == pytest.approx(3 * figures["epoch_s"])
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing written
