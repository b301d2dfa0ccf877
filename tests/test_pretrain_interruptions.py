"""Interrupted pretrainings keep their work: Ctrl-C or SIGTERM saves the last finished step, releases the lock and
says in one line how to continue; a checkpoint the disk refuses stops the run in one line (also in its log), keeping
the previous one; a run resumed on a pool that grew says so and fingerprints the new scans."""
from __future__ import annotations

import errno
import io
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import time

import pytest
import torch
from conftest import console_script, copy_preprocessed_dataset, pretrain_args, run_cli

from nnunetv2_hiendmae.checkpoint import load_checkpoint
from nnunetv2_hiendmae.errors import Interrupted, cli_entry
from nnunetv2_hiendmae.fileio import atomic_write
from pretrain import train
from pretrain.config import PretrainConfig
from pretrain.lock import LOCK
from pretrain.train import CheckpointNotWritten, PretrainRun, pretrain_from_flags


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
        os.killpg(proc.pid, signum)
        code = proc.wait(timeout=300)
    return code, stderr.read_text()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_the_last_step_releases_the_lock_and_says_how_to_continue(
        preprocessed_dataset, tmp_path, signum):
    out = tmp_path / "run"
    # a loader worker, as real runs have: the signal reaches it too, and it must not die with a traceback of its own
    args = pretrain_args(preprocessed_dataset, out, 2, 4, "--checkpoint-minutes", "60", "--num-workers", "1")
    code, stderr = start_and_signal(args, out, signum, tmp_path)
    lines = stderr.strip().splitlines()
    assert code == 128 + signum and len(lines) == 1, stderr
    name = signal.Signals(signum).name
    assert lines[0].startswith(f"interrupted: {name} at epoch ") and "stopped after the last finished step" in lines[0]
    assert not (out / LOCK).exists() and not (out / "checkpoint_final.pth").exists()
    state = load_checkpoint(out / "checkpoint_latest.pth")["train_state"]  # no periodic one was due for 60 minutes
    assert state["epoch"] * 4 + state["iteration"] >= 4  # at least the first epoch is kept
    assert f"{out / 'checkpoint_latest.pth'} holds " in lines[0]
    assert f"stopped: {lines[0].removeprefix('interrupted: ')}" in log_of(out)

    command = shlex.split(lines[0].split("continue with: ", 1)[1])  # the advice, followed as printed
    resumed = run_cli(*command, check=True)
    assert f"resumed from {out / 'checkpoint_latest.pth'}" in resumed.stdout
    assert len(load_checkpoint(out / "checkpoint_final.pth")["pretrain"]["history"]["loss"]) == 2


def slow_after_a_signal(real, signum: int, calls: list, finished: list):
    """``real`` (the held-out loss or the probe) that, at its second call (epoch 2's), sends this process ``signum``,
    then works 5 s before it runs, unless cut short: ``finished`` says whether it got to the end."""
    def slow_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signum)
            for _ in range(100):  # 5 s, unless cut short
                time.sleep(0.05)
            finished.append(1)
        return real(*args, **kwargs)
    return slow_in_epoch_2


def evaluated_run(ds, out, epochs: int, **extra) -> PretrainConfig:
    """A tiny in-process run of 2 iterations per epoch, probed (and with ``extra``, scored on held-out cases) after
    every epoch."""
    return PretrainConfig(datasets=[str(ds["id"])], output_dir=str(out), arch="vit_tiny", patch_size=[16, 32, 32],
                          batch_size=2, method_settings={"crops_per_volume": 1}, epochs=epochs, iters_per_epoch=2,
                          num_workers=0, device="cpu", progress_bar=False, checkpoint_minutes=60,
                          probe_dataset=str(ds["id"]), probe_every=1, recon_every=100, **extra)


@pytest.mark.parametrize("cut", ["held-out loss", "probe"])
def test_a_stop_during_the_evaluation_cuts_it_short_and_saves_the_finished_epoch(
        preprocessed_dataset, tmp_path, monkeypatch, cut):
    """SIGTERM while the held-out loss or the probe of epoch 2 runs (work that can outlast the grace period before a
    scheduler's SIGKILL) ends that work at once: what it did not measure is NaN in the epoch's history, and the run
    saves the two finished epochs at its next step."""
    from nnunetv2_hiendmae import probe
    from pretrain.heldout import HeldOutLoss

    calls, finished = [], []
    owner, name = (probe, "probe_score") if cut == "probe" else (HeldOutLoss, "__call__")
    monkeypatch.setattr(owner, name, slow_after_a_signal(getattr(owner, name), signal.SIGTERM, calls, finished))
    out = tmp_path / "run"
    with pytest.raises(Interrupted) as e:
        PretrainRun(evaluated_run(preprocessed_dataset, out, 3, val_cases="2")).run()
    assert not finished and e.value.exit_code == 128 + signal.SIGTERM
    assert str(e.value).startswith(f"SIGTERM at epoch 3, iteration 1 of 2: stopped after the last finished step; "
                                   f"{out / 'checkpoint_latest.pth'} holds 2 finished epoch(s)")
    ckpt = load_checkpoint(out / "checkpoint_latest.pth")
    assert (ckpt["train_state"]["epoch"], ckpt["train_state"]["iteration"]) == (2, 0)
    history = ckpt["pretrain"]["history"]
    val, dice = history["val_loss"], history["probe_dice"]
    assert len(history["loss"]) == len(val) == len(dice) == 2 and val[0] == val[0] and dice[0] == dice[0]
    assert dice[1] != dice[1] and (val[1] != val[1]) is (cut == "held-out loss")  # the probe is left out either way
    assert (f"SIGTERM: the {cut} of epoch 2 was cut short and is left out with the rest of the epoch's evaluation; "
            "the run stops at its next step") in log_of(out)


def test_a_stop_during_the_last_epoch_s_evaluation_cuts_it_short_and_the_run_ends_as_it_would_have(
        preprocessed_dataset, tmp_path, monkeypatch):
    """Ctrl-C while the probe of the last epoch runs cuts it short as in any other epoch, and the log names the signal;
    no step is left to stop at, so the run ends as it would have: checkpoint_final.pth holds both epochs, the probe of
    the last one left out (NaN), and the lock is released."""
    from nnunetv2_hiendmae import probe

    calls, finished = [], []
    monkeypatch.setattr(probe, "probe_score", slow_after_a_signal(probe.probe_score, signal.SIGINT, calls, finished))
    out = tmp_path / "run"
    assert PretrainRun(evaluated_run(preprocessed_dataset, out, 2)).run() == out / "checkpoint_final.pth"
    assert len(calls) == 2 and not finished and not (out / LOCK).exists()
    dice = load_checkpoint(out / "checkpoint_final.pth")["pretrain"]["history"]["probe_dice"]
    assert len(dice) == 2 and dice[0] == dice[0] and dice[1] != dice[1]
    assert ("SIGINT: the probe of epoch 2 was cut short and is left out with the rest of the epoch's evaluation; "
            "the run ends, as it was its last epoch") in log_of(out)
    assert f"done: {out / 'checkpoint_final.pth'}" in log_of(out)


def test_the_ranks_other_than_0_exit_with_the_signal_s_code_and_print_nothing(capsys):
    """Under torchrun every rank stops; rank 0 says how to continue, the others exit as it does, quietly."""
    @cli_entry
    def rank(quiet: bool) -> None:
        raise Interrupted("SIGTERM at epoch 2, iteration 3 of 4: ...", signal.SIGTERM, quiet=quiet)

    for quiet, said in ((False, "interrupted: SIGTERM at epoch 2, iteration 3 of 4: ...\n"), (True, "")):
        with pytest.raises(SystemExit) as e:
            rank(quiet)
        assert e.value.code == 128 + signal.SIGTERM and capsys.readouterr().err == said



def test_a_second_ctrl_c_stops_a_lone_run_at_once_but_torchruns_forwarded_repeat_is_one_request(tmp_path, monkeypatch):
    """Alone, the second signal raises at once; under a process group the same signal again within SAME_REQUEST_S
    (a scheduler's, then torchrun's forwarded copy) is the first request; a later one or another signal stops at
    once."""
    import torch.distributed as dist

    from pretrain import stop as stop_module

    clock = [100.0]
    monkeypatch.setattr(stop_module.time, "monotonic", lambda: clock[0])
    alone = stop_module.StopSignals()
    alone._note(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        alone._note(signal.SIGINT, None)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for second, after, stops in ((signal.SIGTERM, 1.5, False), (signal.SIGTERM, 2.5, True),
                                     (signal.SIGINT, 0.5, True)):
            ranked = stop_module.StopSignals()
            ranked._note(signal.SIGTERM, None)
            clock[0] += after
            if stops:
                with pytest.raises(KeyboardInterrupt):
                    ranked._note(second, None)
            else:
                ranked._note(second, None)
                assert ranked.requested == signal.SIGTERM and ranked.agreed() == signal.SIGTERM
    finally:
        dist.destroy_process_group()


def test_cut_short_ends_its_block_at_a_request_made_before_or_inside_it_and_only_there():
    """A request made before the block ends it at its start; one inside it, at once; outside the block a request is
    only noted (the training stops at its next step), and after it was cut short, a second signal still stops at
    once."""
    from pretrain.stop import StopRequested, StopSignals

    stop, ran = StopSignals(), []
    with stop.cut_short():
        ran.append("before")
    stop._note(signal.SIGTERM, None)  # between the held-out loss and the probe, say
    assert stop.requested == signal.SIGTERM
    with pytest.raises(StopRequested), stop.cut_short():
        ran.append("after the request")
    assert ran == ["before"]

    inside = StopSignals()
    with pytest.raises(StopRequested), inside.cut_short():
        inside._note(signal.SIGINT, None)
        ran.append("after the signal")
    assert ran == ["before"] and inside.requested == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        inside._note(signal.SIGINT, None)

    guarded = StopSignals()  # a request that lands in a library's ``except Exception`` is not taken for its error
    with pytest.raises(StopRequested), guarded.cut_short():
        try:
            guarded._note(signal.SIGTERM, None)
        except Exception:
            pass
        ran.append("after the library's own error")
    assert ran == ["before"]


def test_a_signal_right_after_cut_short_looked_for_an_earlier_request_still_ends_its_block():
    """A signal that lands between cut_short's look for an earlier request and the start of its block ends the block,
    as one a moment earlier or later would, instead of letting it run to its end."""
    from pretrain.stop import StopRequested, StopSignals

    class LandsRightAfterTheLook(StopSignals):
        looked = False

        @property
        def requested(self):
            value = self.__dict__["_requested"]
            if not self.looked:  # cut_short's look: the signal lands right after it
                self.looked = True
                self._note(signal.SIGTERM, None)
            return value

        @requested.setter
        def requested(self, value):
            self.__dict__["_requested"] = value

    stop, ran = LandsRightAfterTheLook(), []
    with pytest.raises(StopRequested), stop.cut_short():
        ran.append("the block")
    assert ran == [] and stop.requested == signal.SIGTERM and not stop._cutting


def test_the_ranks_agree_on_any_rank_s_signal_sigterm_before_sigint_on_the_group_they_are_given(monkeypatch):
    """Every rank stops when any of them was asked to, by that rank's signal (SIGTERM over SIGINT, whatever the order
    of the ranks), on the process group it is given; a process alone stops by its own."""
    import torch.distributed as dist

    from pretrain import stop as stop_module

    def with_another_rank(theirs, asked):
        def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None):
            assert group is asked
            both = torch.stack([tensor, torch.tensor([int(theirs or 0)])])
            reduce = {dist.ReduceOp.MAX: torch.amax, dist.ReduceOp.MIN: torch.amin, dist.ReduceOp.SUM: torch.sum}
            tensor.copy_(reduce[op](both, 0))
        return all_reduce

    alone = stop_module.StopSignals()
    assert alone.agreed() is None
    alone._note(signal.SIGINT, None)
    assert alone.agreed() == signal.SIGINT

    monkeypatch.setattr(stop_module.dist, "is_initialized", lambda: True)
    for asked in (object(), None):  # a gloo group of its own (a run on GPUs), or the whole run's
        int_, term = signal.SIGINT, signal.SIGTERM
        for ours, theirs, agreed in ((None, None, None), (None, int_, int_), (int_, None, int_), (int_, int_, int_),
                                     (term, int_, term), (int_, term, term)):
            monkeypatch.setattr(stop_module.dist, "all_reduce", with_another_rank(theirs, asked))
            rank = stop_module.StopSignals()
            rank.requested = ours
            assert rank.agreed(asked) == agreed and rank.requested == ours


def test_the_resume_command_starts_the_run_as_it_was_started(monkeypatch, tmp_path):
    """Alone: the command; under torchrun on one node: torchrun --standalone on its number of ranks; on several nodes:
    the same number of ranks on every node, with the run's rendezvous flags."""
    from nnunetv2_hiendmae.commands import executable

    alone = f"nnUNetv2_hiendmae_pretrain --resume -o {tmp_path}"
    program = f"{executable('nnUNetv2_hiendmae_pretrain')} --resume -o {tmp_path}"
    for env, command in (({}, alone), ({"WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}, alone),
                         ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"},
                          f"torchrun --standalone --nproc_per_node=2 {program}"),
                         ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"},
                          f"on every node, torchrun with the run's rendezvous flags and --nproc_per_node=4, then "
                          f"{program}")):
        for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert train.resume_command(tmp_path) == command
        if env.get("WORLD_SIZE") != "8":  # a command as printed, pasted into a shell, names the run's folder
            spaced = tmp_path / "my runs" / "run 1"
            assert shlex.split(train.resume_command(spaced))[-2:] == ["-o", str(spaced)]


class RankZerosWord:
    """``dist.broadcast`` of whether rank 0 wrote the stopped step, between two ranks: on rank 0 (``is_main``) the
    value sent is recorded in ``told``, the other rank receives ``written``; every call records its group too."""

    def __init__(self, told: list):
        self.told, self.is_main, self.written = told, True, True

    def __call__(self, tensor, src, group=None):
        assert src == 0
        if self.is_main:
            self.told.append(int(tensor.item()))
        else:
            tensor.fill_(int(self.written))
        self.told.append(group)


def one_of_two_ranks(is_main: bool, out, group, wait=lambda: None, rng_states=lambda: ["rng 0", "rng 1"]):
    """The part of a :class:`PretrainRun` on one of 2 ranks that a stop reaches (``_stop_interrupted``, ``_save_step``,
    ``_mean_over_ranks``), 4 iterations per epoch, its background writer waited for by ``wait``; its checkpoint is a
    dict of what it was given."""
    from types import SimpleNamespace

    rank = SimpleNamespace(
        is_main=is_main, world_size=2, out=out, stop_group=group, data=SimpleNamespace(iters=4),
        writer=SimpleNamespace(wait=wait), _rng_states=rng_states,
        _checkpoint=lambda epoch, rng, iteration, partial: dict(epoch=epoch, rng=rng, it=iteration, partial=partial))
    rank._save_step = lambda *a: PretrainRun._save_step(rank, *a)
    rank._mean_over_ranks = lambda values: PretrainRun._mean_over_ranks(rank, values)
    return rank


def test_a_stop_on_several_ranks_saves_their_mean_loss_sums_on_rank_0_and_waits_for_it(monkeypatch, tmp_path):
    """Every rank averages the loss sums of the epoch so far over the ranks; rank 0 alone saves them, and every rank
    waits on the stop group for rank 0 to say whether it saved, before it ends: rank 0 saying how to continue, the
    others quiet. Where rank 0 cannot write the checkpoint, it says why and the others end at once, quietly, with the
    signal's exit code, instead of waiting for torchrun to end them."""
    saved, told, group = [], [], object()
    word = RankZerosWord(told)

    def all_reduce(tensor, op=train.dist.ReduceOp.SUM, group=None):  # the other rank's sums: twice ours
        assert op == train.dist.ReduceOp.SUM
        tensor += 2 * tensor

    def save(ckpt, path):
        if not word.written:
            raise train.CheckpointNotWritten(f"cannot write {path}: No space left on device")
        saved.append((ckpt, path))

    monkeypatch.setattr(train.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(train.dist, "broadcast", word)
    monkeypatch.setattr(train, "save_checkpoint", save)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for written, is_main in ((True, True), (True, False), (False, True), (False, False)):
        saved.clear(), told.clear()
        word.is_main, word.written = is_main, written
        rank = one_of_two_ranks(is_main, tmp_path, group)
        sums = {"loss": torch.tensor(3.0), "mse": torch.tensor(1.0)}
        if not written and is_main:
            with pytest.raises(train.CheckpointNotWritten, match="No space left on device"):
                PretrainRun._stop_interrupted(rank, signal.SIGINT, 1, 2, sums)
            assert told == [0, group]  # the others learn it failed
            continue
        with pytest.raises(Interrupted) as e:
            PretrainRun._stop_interrupted(rank, signal.SIGINT, 1, 2, sums)
        assert e.value.quiet is not is_main and e.value.exit_code == 128 + signal.SIGINT
        assert told == ([1, group] if is_main else [group])
        assert saved == ([(dict(epoch=1, rng=["rng 0", "rng 1"], it=2, partial={"loss": 4.5, "mse": 1.5}),
                           tmp_path / "checkpoint_latest.pth")] if is_main else [])
        if not written:
            assert str(e.value) == "rank 0 could not save the stopped step"
            continue
        assert str(e.value).startswith("SIGINT at epoch 2, iteration 3 of 4: stopped after the last finished step; "
                                       f"{tmp_path / 'checkpoint_latest.pth'} holds epoch 2 up to iteration 2; ")
        assert str(e.value).endswith(f"; continue with: {train.resume_command(tmp_path)}")


def test_a_stop_after_rank_0_s_background_write_was_refused_ends_every_rank_at_once(monkeypatch, tmp_path):
    """Where the epoch's checkpoint, written in the background on rank 0, was refused (a full disk) by the time the
    ranks stop, rank 0 says why and tells the others, which end at once, quietly, with the signal's exit code, instead
    of waiting for torchrun to end them; every rank still makes the save's collectives (the loss sums, the random
    states), and rank 0 does not write the stopped step to the disk that refused the epoch."""
    saved, told, collectives, group = [], [], [], object()
    word = RankZerosWord(told)
    word.written = False  # what the other rank receives: rank 0's word is what the test checks on rank 0

    def refused():
        raise train.CheckpointNotWritten(f"cannot write {tmp_path / 'checkpoint_latest.pth'}: No space left on "
                                         "device; the previous checkpoint_latest.pth is kept")

    monkeypatch.setattr(train.dist, "all_reduce", lambda tensor, op=None, group=None: collectives.append("sums"))
    monkeypatch.setattr(train.dist, "broadcast", word)
    monkeypatch.setattr(train, "save_checkpoint", lambda ckpt, path: saved.append(path))
    for is_main in (True, False):
        saved.clear(), told.clear(), collectives.clear()
        word.is_main = is_main
        rank = one_of_two_ranks(is_main, tmp_path, group, wait=refused if is_main else lambda: None,
                                rng_states=lambda: collectives.append("rng") or ["rng 0", "rng 1"])
        sums = {"loss": torch.tensor(3.0)}
        if is_main:
            with pytest.raises(train.CheckpointNotWritten, match="No space left on device"):
                PretrainRun._stop_interrupted(rank, signal.SIGTERM, 2, 1, sums)
            assert told == [0, group]  # the others learn it failed
        else:
            with pytest.raises(Interrupted, match="^rank 0 could not save the stopped step$") as e:
                PretrainRun._stop_interrupted(rank, signal.SIGTERM, 2, 1, sums)
            assert e.value.quiet and e.value.exit_code == 128 + signal.SIGTERM and told == [group]
        assert collectives == ["sums", "rng"] and saved == []


class FullDisk(io.RawIOBase):
    """A file on a disk that fills up after ``room`` bytes: the next write fails as the OS fails it."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)


def test_a_checkpoint_the_disk_refuses_stops_the_run_in_one_line_keeping_the_previous_one(
        preprocessed_dataset, tmp_path, monkeypatch):
    """The second checkpoint_latest.pth (after epoch 2 of 3) meets a full disk: the run stops naming the file and the
    cause, in its log too, with epoch 1's checkpoint intact, no temporary file left and the lock released; the
    printed command then finishes the run."""
    real, calls = train.save_atomic, []

    def save_atomic(obj, path):
        calls.append(path)
        if len(calls) == 1:
            return real(obj, path)
        return atomic_write(path, lambda f: torch.save(obj, FullDisk(f, 1 << 20)))

    monkeypatch.setattr(train, "save_atomic", save_atomic)
    out = tmp_path / "run"
    cfg = PretrainConfig(datasets=[str(preprocessed_dataset["id"])], output_dir=str(out), arch="vit_tiny",
                         patch_size=[16, 32, 32], batch_size=2, method_settings={"crops_per_volume": 1}, epochs=3,
                         iters_per_epoch=1, num_workers=0, device="cpu", progress_bar=False, checkpoint_minutes=0,
                         recon_every=100)
    with pytest.raises(CheckpointNotWritten) as e:
        PretrainRun(cfg).run()
    latest = out / "checkpoint_latest.pth"
    assert str(e.value) == (f"cannot write {latest}: No space left on device; the previous checkpoint_latest.pth is "
                            f"kept; once {out} has room for it, continue: nnUNetv2_hiendmae_pretrain --resume -o {out}")
    assert f"stopped: {e.value}" in log_of(out)
    assert load_checkpoint(latest)["train_state"]["epoch"] == 1
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".tmp", ".pth", ".lock")) == [latest.name]

    monkeypatch.setattr(train, "save_atomic", real)  # room again: the advice, followed
    assert shlex.split(str(e.value).split("continue: ", 1)[1]) == ["nnUNetv2_hiendmae_pretrain", "--resume", "-o",
                                                                   str(out)]
    pretrain_from_flags({"output_dir": str(out)}, "resume")
    assert load_checkpoint(out / "checkpoint_final.pth")["pretrain"]["epochs_done"] == 3


def test_a_file_too_large_for_the_system_is_one_line_and_the_run_starts_again(preprocessed_dataset, tmp_path):
    """A real refusal by the OS (a file size limit of 2 MB: EFBIG): one line on stderr naming the file and the cause,
    the same line in the log, the lock released; without the limit, the command as printed ('start the run again')
    runs."""
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))

    out = tmp_path / "run"
    args = pretrain_args(preprocessed_dataset, out, 1, 1)
    proc = subprocess.run([console_script(args[0]), *args[1:]], capture_output=True, text=True,
                          preexec_fn=limit_file_size, timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0] == (f"error: cannot write {out / 'checkpoint_latest.pth'}: File too large; no "
                        f"checkpoint_latest.pth was written; once {out} has room for it, continue: start the run again")
    assert f"stopped: {lines[0].removeprefix('error: ')}" in log_of(out)
    assert not (out / LOCK).exists() and not list(out.glob("*.tmp")) and not list(out.glob("*.pth"))
    run_cli(*args, check=True)


def test_resuming_after_scans_were_added_says_so_and_fingerprints_every_case(preprocessed_dataset, tmp_path,
                                                                              monkeypatch):
    """A pool of 3 scans gets a 4th between the run's epochs 1 and 2: the resumed run says what changed, and its
    final checkpoint holds the new scan's fingerprint (the leakage guard would otherwise miss copies of it)."""
    root = tmp_path / "preprocessed"
    pool = copy_preprocessed_dataset(preprocessed_dataset["unlabelled_preprocessed"], root, 991, "Pool")
    monkeypatch.setenv("nnUNet_preprocessed", str(root))
    out = tmp_path / "run"
    cfg = PretrainConfig(datasets=["991"], output_dir=str(out), arch="vit_tiny", patch_size=[16, 32, 32],
                         batch_size=2, method_settings={"crops_per_volume": 1}, epochs=1, iters_per_epoch=1,
                         num_workers=0, device="cpu", progress_bar=False, checkpoint_minutes=0, recon_every=100)
    PretrainRun(cfg).run()
    first = load_checkpoint(out / "checkpoint_final.pth")["pretrain"]["case_fingerprints"]
    assert len(first) == 3

    data = pool / "nnUNetPlans_3d_fullres"
    case = sorted(p.stem for p in data.glob("*.pkl"))[0]
    for suffix in (".b2nd", "_seg.b2nd", ".pkl"):  # a new scan, preprocessed as the others were
        if (data / f"{case}{suffix}").exists():
            shutil.copy(data / f"{case}{suffix}", data / f"added_scan{suffix}")
    stored = json.loads((pool / "content_fingerprints.json").read_text())
    (pool / "content_fingerprints.json").write_text(json.dumps({**stored, "added_scan": "f" * 64}))

    pretrain_from_flags({"output_dir": str(out), "epochs": 2}, "resume")
    assert ("note: the data changed since the checkpoint: Dataset991_Pool has 4 training cases, 3 when it was "
            "written; the run continues on the cases there are now") in log_of(out)
    final = load_checkpoint(out / "checkpoint_final.pth")["pretrain"]
    assert final["case_fingerprints"] == {**first, "Dataset991_Pool/added_scan": "f" * 64}
    assert final["datasets"][0]["num_cases"] == 4
