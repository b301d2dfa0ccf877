"""The run's set-up, one step at a time (pretrain/build.py): placement, data, signals, model."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from nnunetv2_hiendmae.errors import UserError
from pretrain import build
from pretrain.config import PretrainConfig


def config(tmp_path, **kw) -> PretrainConfig:
    settings = dict(datasets=["990", "991"], output_dir=str(tmp_path / "run"), arch="vit_tiny", patch_size=[16, 32, 32],
                    batch_size=2, method_settings={"crops_per_volume": 2}, num_workers=0, device="cpu",
                    progress_bar=False)
    return PretrainConfig(**{**settings, **kw})


def test_placement_is_rank_0_of_the_planned_ranks_on_the_cpu_without_a_process_group(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "3")  # ignored when the ranks are only planned (--estimate)
    place = build.build_placement(config(tmp_path), planned_ranks=4)
    assert (place.rank, place.world_size, place.device.type, place.precision) == (0, 4, "cpu", "fp32")
    assert place.is_main and not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert build.build_placement(config(tmp_path, precision="bf16")).precision == "bf16"
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda but no CUDA GPU is visible"):
            build.build_placement(config(tmp_path, device="cuda"))


def test_data_holds_out_cases_lays_out_the_epoch_over_the_ranks_and_keeps_a_resumed_runs_choice(
        preprocessed_dataset, tmp_path):
    cfg = config(tmp_path, val_cases="2")
    one = build.build_data(cfg, build.Placement(0, 1, torch.device("cpu"), "fp32"), {})
    trained = {f"{s.dataset_name}/{c}" for s in one.sources for c in s.identifiers}
    held = {f"{s.dataset_name}/{c}" for s in one.val_sources for c in s.identifiers}
    assert len(one.val_cases) == 2 and held == set(one.val_cases) and not trained & held
    assert one.num_cases == len(trained) == 7 and one.iters == math.ceil(7 / 2)
    assert len(one.crops) == one.iters * cfg.batch_size
    assert one.crops.dtype == torch.float32 and one.dtype == "float32"
    assert one.loader_memory.workers == 0  # --num-workers 0: the batches are read in the training process
    assert one.meta["in_channels"] == 1 and one.probe_split is None
    # rank 1 of 3 at bf16: its own items, float16 crops, an epoch of ceil(7 / (2 x 3)) iterations
    other = build.build_data(cfg, build.Placement(1, 3, torch.device("cpu"), "bf16"), {})
    assert other.iters == 2 and other.crops.rank == 1
    assert other.crops.dtype == torch.float16 and other.dtype == "float16"
    # a resume keeps the cases its run held out, whatever --val-cases draws now
    kept = sorted(trained)[:3]
    resumed = build.build_data(cfg, build.Placement(0, 1, torch.device("cpu"), "fp32"), {"val_cases": kept})
    assert resumed.val_cases == kept and resumed.num_cases == 6
    # --probe-dataset: its split is checked against the pretraining data's channel count (1 here, of 2 datasets)
    probed = build.build_data(config(tmp_path, val_cases="2", probe_dataset=str(preprocessed_dataset["id"])),
                              build.Placement(0, 1, torch.device("cpu"), "fp32"), {})
    assert probed.probe_split.dataset_name == preprocessed_dataset["name"] and probed.probe_split.channels == 1


def test_signals_but_the_fingerprints_are_rank_0s_and_a_resume_keeps_the_stored_ones(preprocessed_dataset, tmp_path,
                                                                           monkeypatch):
    cfg = config(tmp_path, val_cases="2")
    place = build.Placement(0, 1, torch.device("cpu"), "fp32")
    data = build.build_data(cfg, place, {})
    signals = build.build_signals(cfg, place, data, {})
    other = build.build_signals(cfg, build.Placement(1, 2, torch.device("cpu"), "fp32"), data, {})
    assert other == build.Signals(fingerprints=signals.fingerprints)  # no process group: rank 1 reads them all
    assert signals.held_out is not None and signals.probe is None
    assert set(signals.fingerprints) == {f"{s.dataset_name}/{c}" for s in [*data.sources, *data.val_sources]
                                         for c in s.identifiers}
    assert signals.probe_leakage == []
    # a resume keeps what its checkpoint recorded and reads only the cases it lacks
    monkeypatch.setattr(build, "pretraining_fingerprints", lambda *a, **k: pytest.fail("fingerprints read again"))
    stored = {**signals.fingerprints, "Dataset999_Gone/x": "0123"}
    assert build.build_signals(cfg, place, data, {"case_fingerprints": stored}).fingerprints == stored
    no_held_out = build.build_data(config(tmp_path, val_cases="0"), place, {})
    assert build.build_signals(cfg, place, no_held_out, {"case_fingerprints": stored}).held_out is None


def test_model_starts_from_the_seeds_weights_on_every_rank_and_draws_its_own_masks(tmp_path):
    cfg = config(tmp_path, method_settings={"crops_per_volume": 2})
    rank0 = build.build_model(cfg, build.Placement(0, 2, torch.device("cpu"), "fp32"), in_channels=2)
    after0 = torch.rand(3)
    rank1 = build.build_model(cfg, build.Placement(1, 2, torch.device("cpu"), "fp16"), in_channels=2)
    after1 = torch.rand(3)
    for (name, a), b in zip(rank0.model.state_dict().items(), rank1.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(after0, after1)  # per-rank generator after the weights are made
    assert rank0.encoder_cfg["in_channels"] == 2 and rank0.model.encoder.in_channels == 2
    assert rank0.ddp is rank0.model and rank0.compiled is rank0.model  # no process group, no --compile on the CPU
    assert rank0.scaler is None and isinstance(rank1.scaler, torch.amp.GradScaler)
    bf16 = build.build_model(cfg, build.Placement(0, 1, torch.device("cpu"), "bf16"), in_channels=2)
    assert bf16.scaler is None  # bf16 has fp32's exponent range: only fp16 scales its loss
    decay = {g["weight_decay"] for g in rank0.optimizer.param_groups}
    assert decay == {0.0, cfg.weight_decay} and rank0.optimizer.defaults["betas"] == (0.9, 0.95)
    assert sum(len(g["params"]) for g in rank0.optimizer.param_groups) == len(list(rank0.model.parameters()))
