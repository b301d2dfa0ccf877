"""A pretraining that diverges slowly is stopped before its loss becomes NaN, with a checkpoint from before the rise
and advice that works when followed; it never ends with a checkpoint_final.pth."""
from __future__ import annotations

import re
import shlex

import pytest

from nnunetv2_hiendmae.checkpoint import load_checkpoint
from pretrain.config import PretrainConfig
from pretrain.lock import LOCK
from pretrain.train import Diverged, PretrainRun, pretrain_from_flags


def log_of(out) -> str:
    return "".join(p.read_text() for p in out.glob("training_log_*.txt"))


def rising(monkeypatch, factors: list[float]) -> None:
    """Epoch e's mean losses are the real ones times ``factors[e]``: a loss that climbs as a too high lr makes it."""
    real = PretrainRun.train_epoch

    def train_epoch(self, epoch, *args, **kwargs):
        return {k: v * factors[epoch] for k, v in real(self, epoch, *args, **kwargs).items()}

    monkeypatch.setattr(PretrainRun, "train_epoch", train_epoch)


def config(dataset, out, **changes) -> PretrainConfig:
    settings = dict(datasets=[str(dataset["id"])], output_dir=str(out), arch="vit_tiny", patch_size=[16, 32, 32],
                    batch_size=2, method_settings={"crops_per_volume": 1}, epochs=5, iters_per_epoch=1,
                    num_workers=0, device="cpu", progress_bar=False, checkpoint_minutes=0, recon_every=100,
                    lr=1e-4)
    return PretrainConfig(**{**settings, **changes})


def advised_command(message: str) -> list[str]:
    return shlex.split(message.split(": nnUNetv2_hiendmae_pretrain ", 1)[1])


def test_a_loss_climbing_far_above_the_runs_level_stops_before_nan_and_the_advice_continues_it(
        preprocessed_dataset, tmp_path, monkeypatch):
    """Losses x1, x1, x3 (a rise: epoch 2's checkpoint is kept), x40 (diverged: stop). The kept checkpoint is epoch 2's,
    no checkpoint_final.pth exists, and the printed command (--resume at half the lr) finishes the run."""
    out = tmp_path / "run"
    rising(monkeypatch, [1, 1, 3, 40, 1])
    with pytest.raises(Diverged) as e:
        PretrainRun(config(preprocessed_dataset, out)).run()
    message = str(e.value)
    assert message.startswith("the loss rose to ") and " at epoch 4, " in message and "stopped before" in message
    assert message.endswith(f"checkpoint_latest.pth holds epoch 2, from before the rise: continue it with a lower "
                            f"--lr: nnUNetv2_hiendmae_pretrain --resume -o {out} --lr 5e-05")
    kept = load_checkpoint(out / "checkpoint_latest.pth")
    assert kept["train_state"]["epoch"] == 2 and len(kept["pretrain"]["history"]["loss"]) == 2
    assert not (out / "checkpoint_final.pth").exists() and not (out / LOCK).exists()
    log = log_of(out)
    assert re.search(r"the loss is [23]\.\dx the run's lowest: checkpoint_latest.pth keeps epoch 2, from before the "
                     "rise", log)
    assert f"stopped: {message}" in log

    monkeypatch.undo()  # at the lower lr the loss stays at its level
    assert advised_command(message) == ["--resume", "-o", str(out), "--lr", "5e-05"]
    pretrain_from_flags({"output_dir": str(out), "lr": 5e-05}, "resume")
    final = load_checkpoint(out / "checkpoint_final.pth")["pretrain"]
    assert final["epochs_done"] == 5 and final["lr"] == 5e-05 and len(final["history"]["loss"]) == 5


def test_a_run_that_diverges_before_any_checkpoint_says_to_start_again_and_that_works(preprocessed_dataset, tmp_path,
                                                                                   monkeypatch):
    out = tmp_path / "run"
    rising(monkeypatch, [1, 20, 1])
    with pytest.raises(Diverged) as e:  # no periodic checkpoint was due in the first 60 minutes
        PretrainRun(config(preprocessed_dataset, out, epochs=3, checkpoint_minutes=60)).run()
    assert str(e.value).endswith("no checkpoint from before the rise was written: start the run again with a lower "
                                 "--lr (--lr 5e-05), with --checkpoint-minutes small enough to keep one")
    assert not (out / "checkpoint_latest.pth").exists() and not (out / "checkpoint_final.pth").exists()
    monkeypatch.undo()
    PretrainRun(config(preprocessed_dataset, out, epochs=3, lr=5e-05)).run()  # the same -o, as advised
    assert load_checkpoint(out / "checkpoint_final.pth")["pretrain"]["epochs_done"] == 3
