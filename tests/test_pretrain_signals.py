"""Is the pretraining working? The held-out loss on fixed views and masks of cases never trained on, the downstream
linear probe every N epochs with checkpoint_best.pth, both in the history and progress.png, an exact resume, and bad
input as one line before anything is written."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    assert_resumed,
    cli_error,
    console_script,
    copy_preprocessed_dataset,
    kill_after_epoch,
    pretrain_args,
    run_cli,
)

from nnunetv2_hiendmae.checkpoint import load_checkpoint
from pretrain.config import PretrainConfig
from pretrain.stop import StopRequested
from pretrain.train import PretrainRun


def signal_args(ds, out):
    return pretrain_args(ds, out, 4, 4, "--val-cases", "2", "--probe-dataset", str(ds["id"]), "--probe-every", "2")


def test_held_out_loss_and_probe_every_epoch_best_checkpoint_and_an_exact_resume(preprocessed_dataset, tmp_path):
    straight = tmp_path / "straight"
    run_cli(*signal_args(preprocessed_dataset, straight), check=True)
    final = load_checkpoint(straight / "checkpoint_final.pth")
    meta, history = final["pretrain"], final["pretrain"]["history"]
    assert len(meta["val_cases"]) == 2 and all(v == v for v in history["val_loss"])  # every epoch
    assert len(history["val_loss"]) == len(history["loss"]) == 4
    probe = history["probe_dice"]
    assert probe[0] != probe[0] and probe[2] != probe[2] and 0 <= probe[1] <= 1 and 0 <= probe[3] <= 1  # epochs 2, 4
    best = load_checkpoint(straight / "checkpoint_best.pth")
    epoch = max((1, 3), key=lambda i: probe[i]) + 1
    assert best["pretrain"]["best"]["epoch"] == epoch and best["pretrain"]["best"]["probe_dice"] == probe[epoch - 1]
    assert "train_state" not in best and best["pretrain"]["epochs_done"] == epoch
    log = "".join(p.read_text() for p in straight.glob("training_log_*.txt"))
    assert f"held out of training, scored every 1 epoch(s): 2 cases ({', '.join(meta['val_cases'])})" in log
    assert "val_loss" in log and "probe: mean foreground Dice" in log
    assert (straight / "progress.png").stat().st_size > 0

    out = tmp_path / "killed"
    args = signal_args(preprocessed_dataset, out)
    killed_at = kill_after_epoch([console_script(args[0]), *args[1:]], out, 2)
    resumed = run_cli("nnUNetv2_hiendmae_pretrain", "--resume", "-o", str(out), check=True)
    assert_resumed(out, killed_at, resumed, straight)
    again = load_checkpoint(out / "checkpoint_final.pth")["pretrain"]["history"]
    for key in ("val_loss", "probe_dice"):
        assert again[key] == pytest.approx(history[key], rel=1e-6, nan_ok=True), key


def test_held_out_cases_are_never_trained_on_and_score_the_same_twice(preprocessed_dataset, tmp_path):
    cfg = PretrainConfig(datasets=["990", "991"], output_dir=str(tmp_path / "run"), arch="vit_tiny",
                         patch_size=[16, 32, 32], batch_size=2, method_settings={"crops_per_volume": 2},
                         val_cases="0.34", num_workers=0, device="cpu", progress_bar=False)
    run = PretrainRun(cfg)
    trained = {f"{s.dataset_name}/{c}" for s in run.data.sources for c in s.identifiers}
    assert len(run.data.val_cases) == 4 and not trained & set(run.data.val_cases)  # ceil(0.34 x 9) held out of 9
    assert len(trained) == 5
    state = torch.get_rng_state()
    first = run.signals.held_out(run.model, run.device, run.precision, 2)
    assert torch.equal(torch.get_rng_state(), state)  # the training's random stream is untouched
    torch.rand(7)  # the training draws in between: the masks must not follow its stream
    assert first == run.signals.held_out(run.model, run.device, run.precision, 2)  # fixed views and masks
    assert set(first) == {"val_loss"} and first["val_loss"] > 0
    assert run.model.training
    assert set(run.signals.fingerprints) == trained | set(run.data.val_cases)  # the guard sees the held-out cases


class CropMeans(torch.nn.Module):
    """A model whose losses are the mean intensity of the batch's crops, and of each case's first crop."""

    def forward(self, views):
        self.seen_training = self.training
        return {"loss": views["crops"].mean(), "first": views["crops"][:, 0].mean()}


def test_the_held_out_losses_are_means_over_the_cases_whatever_the_batch_size(preprocessed_dataset):
    from pretrain.data import resolve_sources
    from pretrain.heldout import HeldOutLoss

    held = HeldOutLoss(resolve_sources([str(preprocessed_dataset["id"])]), {"crops": (2, (16, 32, 32))}, 0, "float32")
    assert len(held.views) == 6
    per_case = torch.stack([v["crops"].mean() for v in held.views])
    model = CropMeans().train()
    for cases_per_batch in (1, 4, 6):  # 4: batches of 4 and 2 cases
        scores = held(model, torch.device("cpu"), "fp32", cases_per_batch)
        assert scores.keys() == {"val_loss", "val_first"}
        assert scores["val_loss"] == pytest.approx(per_case.mean().item(), rel=1e-5)
        assert scores["val_first"] == pytest.approx(torch.stack([v["crops"][0].mean() for v in held.views]).mean()
                                                    .item(), rel=1e-5)
        assert not model.seen_training and model.training  # scored in eval mode, left in training mode
    state = torch.get_rng_state()
    model.forward = lambda views: (_ for _ in ()).throw(StopRequested())  # a stop request cuts it short
    with pytest.raises(StopRequested):
        held(model, torch.device("cpu"), "fp32", 2)
    assert model.training and torch.equal(torch.get_rng_state(), state)  # the training's state, as it was
    model.eval()  # a model scored in eval mode is left in eval mode, cut short or not
    with pytest.raises(StopRequested):
        held(model, torch.device("cpu"), "fp32", 2)
    assert not model.training
    del model.forward
    assert held(model, torch.device("cpu"), "fp32", 2)["val_loss"] == pytest.approx(per_case.mean().item(), rel=1e-5)
    assert not model.training


def test_checkpoint_best_keeps_the_best_probe_score_across_a_resume(preprocessed_dataset, tmp_path, monkeypatch):
    """Probe scores 0.4, 0.3, then, resumed, 0.35 and 0.4 (a tie keeps the first): checkpoint_best.pth stays the one
    of epoch 1, since the resumed run knows the best score so far from the history. The scores before the resume
    differ, so that a resumed run taking the lowest of them (0.3) would make epoch 3 the best."""
    from types import SimpleNamespace

    from nnunetv2_hiendmae import probe
    from pretrain.train import pretrain_from_flags

    scores = iter([0.4, 0.3, 0.35, 0.4])
    monkeypatch.setattr(probe, "probe_score", lambda *a, **k: SimpleNamespace(score=next(scores), seconds=0.0))
    out = tmp_path / "run"
    cfg = PretrainConfig(datasets=[str(preprocessed_dataset["id"])], output_dir=str(out), arch="vit_tiny",
                         patch_size=[16, 32, 32], batch_size=2, method_settings={"crops_per_volume": 1}, epochs=2,
                         iters_per_epoch=1, num_workers=0, device="cpu", progress_bar=False, checkpoint_minutes=0,
                         probe_dataset=str(preprocessed_dataset["id"]), probe_every=1, recon_every=100)
    PretrainRun(cfg).run()
    first = load_checkpoint(out / "checkpoint_best.pth")
    pretrain_from_flags({"output_dir": str(out), "epochs": 4}, "resume")
    best = load_checkpoint(out / "checkpoint_best.pth")
    leakage = best["pretrain"]["best"].pop("probe_leakage")  # the probe validates on cases it pretrained on
    assert leakage and "fold 0 validation" in leakage[1]
    assert best["pretrain"]["best"] == {"epoch": 1, "probe_dice": 0.4, "probe_dataset": preprocessed_dataset["name"],
                                        "probe_fold": 0}
    assert best["pretrain"]["epochs_done"] == 1 and "train_state" not in best
    for key, value in first["weights"].items():
        assert torch.equal(best["weights"][key], value), key
    history = load_checkpoint(out / "checkpoint_final.pth")["pretrain"]["history"]
    assert history["probe_dice"] == [0.4, 0.3, 0.35, 0.4]
    log = "".join(p.read_text() for p in out.glob("training_log_*.txt"))
    assert "probe: mean foreground Dice 0.3500 (the best: 0.4000" in log


@pytest.mark.parametrize("case,expect", [
    ("val_cases_larger_than_the_dataset", "--val-cases 20 holds out 20 of the 9 cases"),
    ("unknown_probe_dataset", "dataset '555' not found"),
    ("probe_fold_out_of_range", "fold 7 is out of range"),
    ("unlabelled_probe_dataset", "has no foreground labels"),
    ("probe_dataset_of_another_channel_count", "has 2 channel(s), the pretraining data 1"),
    ("val_cases_not_a_number", "--val-cases must be a count or a fraction"),
])
def test_bad_signal_input_is_one_line_and_writes_nothing(preprocessed_dataset, tmp_path, capsys, case, expect):
    from pretrain.cli import main

    out = tmp_path / "out"
    extra = {"val_cases_larger_than_the_dataset": ["--val-cases", "20"],
             "unknown_probe_dataset": ["--probe-dataset", "555"],
             "probe_fold_out_of_range": ["--probe-dataset", "990", "--probe-fold", "7"],
             "unlabelled_probe_dataset": ["--probe-dataset", str(preprocessed_dataset["unlabelled_id"])],
             "probe_dataset_of_another_channel_count": ["--probe-dataset", "994"],
             "val_cases_not_a_number": ["--val-cases", "many"]}[case]
    args = pretrain_args(preprocessed_dataset, out, 1, 1, *extra)
    if case == "probe_dataset_of_another_channel_count":  # a private tree: 990, 991, and 994 = 990 with 2 channels
        root = tmp_path / "preprocessed"
        for src, i, name in ((preprocessed_dataset["preprocessed"], 990, "HiEndTest"),
                             (preprocessed_dataset["unlabelled_preprocessed"], 991, "HiEndTestUnlabelled"),
                             (preprocessed_dataset["preprocessed"], 994, "TwoChannels")):
            copy_preprocessed_dataset(src, root, i, name)
        dataset_json = root / "Dataset994_TwoChannels" / "dataset.json"
        content = json.loads(dataset_json.read_text())
        dataset_json.write_text(json.dumps({**content, "channel_names": {"0": "CT", "1": "CT"}}))
        # the installed command (nnU-Net reads nnUNet_preprocessed when it is imported)
        proc = run_cli(*args, env={"nnUNet_preprocessed": str(root)})
        code, lines = proc.returncode, proc.stderr.strip().splitlines()
    else:
        code, lines, _ = cli_error(main, args[1:], capsys)
    assert code == 2 and len(lines) == 1 and expect in lines[0], lines
    assert not out.exists()
