"""The pretraining's rules that need no data, with their values: the learning-rate schedule counted in epochs, each
method's reference recipe (MAE's rate scaled with the views per step over all ranks), what a resume may change, how
many cases are held out, the command's parsing, which datasets are named as preprocessed differently, and why a
preprocessed case cannot be trained on."""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict

import numpy as np
import pytest

from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.preprocessed import PreprocessedData
from pretrain.cli import parse
from pretrain.config import PretrainConfig
from pretrain.data import case_problem, normalisation_differences
from pretrain.heldout import held_out_count
from pretrain.methods import MaskedCropsSettings
from pretrain.train import LRSchedule, resumed_config

BASE = dict(datasets=["990"], output_dir="old", arch="vit_tiny", patch_size=[32, 32, 32])


# ----------------------------------------------------------------------------------------------- the schedule

def test_lr_warms_up_linearly_then_follows_a_half_cosine_to_zero_counted_in_epochs():
    schedule = LRSchedule(1e-3, 2, 10)
    assert [schedule(t) for t in (0, 0.5, 1, 2)] == pytest.approx([0, 2.5e-4, 5e-4, 1e-3])
    assert schedule(4) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 8)))
    assert schedule(6) == pytest.approx(5e-4)  # half-way through the cosine
    assert schedule(10) == pytest.approx(0, abs=1e-15) and schedule(12) == pytest.approx(0, abs=1e-15)
    assert LRSchedule(1e-3, 0, 10)(0) == pytest.approx(1e-3)  # no warm-up: the peak at once


# ------------------------------------------------------------------------------------------------- the recipes

def test_each_method_defaults_to_its_recipe_and_mae_scales_its_rate_with_the_views_per_step(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    hiend = PretrainConfig(**BASE)
    assert (hiend.lr, hiend.warmup_epochs, hiend.epochs) == (1e-4, 10, 1000)  # not scaled with 24 x 8 crops
    assert (PretrainConfig(**BASE, method="mim").lr, PretrainConfig(**BASE, method="mim").epochs) == (2e-4, 800)
    mae = dict(BASE, method="mae", batch_size=4, accum_steps=2, method_settings={"crops_per_volume": 3})
    cfg = PretrainConfig(**mae)
    assert cfg.lr == pytest.approx(1.5e-4 * 4 * 3 * 2 / 256) and (cfg.warmup_epochs, cfg.epochs) == (40, 800)
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun: the views of a step over all ranks
    assert PretrainConfig(**mae).lr == pytest.approx(1.5e-4 * 4 * 3 * 2 * 4 / 256)
    assert PretrainConfig(**BASE, method="gl_mae").lr == 1e-4
    given = PretrainConfig(**mae, lr=3e-4, warmup_epochs=1, epochs=5)
    assert (given.lr, given.warmup_epochs, given.epochs) == (3e-4, 1, 5)  # given values are used as given


def test_the_probe_runs_every_tenth_of_the_run_at_least_every_50_epochs_unless_told():
    assert [PretrainConfig(**BASE, epochs=e).probe_interval() for e in (4, 30, 100, 1000)] == [1, 3, 10, 50]
    assert PretrainConfig(**BASE, epochs=1000, probe_every=7).probe_interval() == 7


# -------------------------------------------------------------------------------------------------- the resume

def test_a_resume_may_change_how_the_run_goes_on_and_nothing_it_computes(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    stored = asdict(PretrainConfig(**BASE, method="mae", epochs=4, batch_size=2))
    cfg, changed = resumed_config(stored, {"output_dir": "new", "epochs": 6, "lr": 5e-4, "grad_clip": 1.0,
                                           "precision": "fp32", "batch_size": 2,  # given, but as stored
                                           "method_settings": {"mask_ratio": 0.75}})
    assert (cfg.output_dir, cfg.epochs, cfg.lr, cfg.grad_clip, cfg.precision) == ("new", 6, 5e-4, 1.0, "fp32")
    assert cfg.method_settings == MaskedCropsSettings(0.75, 8) and cfg.batch_size == 2
    assert stored["lr"] == pytest.approx(1.5e-4 * 2 * 8 / 256)
    assert changed == ["output_dir 'old' -> 'new'", "epochs 4 -> 6", f"lr {stored['lr']!r} -> 0.0005",
                       "grad_clip None -> 1.0", "precision 'auto' -> 'fp32'"]
    monkeypatch.setenv("WORLD_SIZE", "4")  # re-queued on more GPUs: the planned rate goes on, not re-scaled
    cfg, changed = resumed_config(stored, {"output_dir": "old"})
    assert changed == [] and cfg.lr == stored["lr"] and asdict(cfg) == stored
    for given, named in (({"batch_size": 4}, "batch_size 2 -> 4"), ({"seed": 1}, "seed 41 -> 1"),
                         ({"warmup_epochs": 3}, "warmup_epochs 40 -> 3"), ({"method": "hiend_mae"}, "method"),
                         ({"method_settings": {"mask_ratio": 0.6}}, "mask_ratio 0.75 -> 0.6")):
        with pytest.raises(UserError, match=re.escape(named)):
            resumed_config(stored, {"output_dir": "old", **given})


# ---------------------------------------------------------------------------------------------- held-out cases

def test_held_out_count_default_count_and_fraction():
    """Default: 5 % of the cases, at least 1 and at most 50, none below 10 cases; a count or a fraction (rounded up)
    as given; at least one case is left to train on."""
    assert [held_out_count(None, n) for n in (9, 10, 30, 31, 2000)] == [0, 1, 2, 2, 50]
    assert [held_out_count(v, 9) for v in ("0.34", "0.1", "3", "1", "0")] == [4, 1, 3, 1, 0]
    for bad in ("-1", "1.5", "many"):
        with pytest.raises(UserError, match="--val-cases must be a count or a fraction"):
            held_out_count(bad, 9)
    with pytest.raises(UserError, match="holds out 9 of the 9 cases"):
        held_out_count("9", 9)


# ------------------------------------------------------------------------------------------------- the command

def test_the_command_passes_on_only_what_was_given(monkeypatch):
    """Method flags become the method's settings; a new run gets the default worker count, a resume only what was
    typed (so nothing else can differ from the stored run)."""
    given, mode = parse(["-d", "1", "2", "-o", "o", "--method", "gl_mae", "--global-views", "3", "--mask-ratio", "0.6",
                         "--patch-size", "32", "32", "32"])
    assert mode == "new" and given == {"datasets": ["1", "2"], "output_dir": "o", "method": "gl_mae",
                                       "method_settings": {"global_views": 3, "mask_ratio": 0.6},
                                       "patch_size": [32, 32, 32], "num_workers": min(8, os.cpu_count() or 1)}
    assert parse(["--resume", "-o", "o", "--lr", "1e-3"]) == ({"output_dir": "o", "lr": 1e-3}, "resume")
    assert parse(["--auto-resume", "-o", "o"])[1] == "auto"
    for argv, message in ((["--resume", "--auto-resume", "-o", "o"], "exclude each other"),
                          (["-o", "o", "--json"], "--json goes with --estimate")):
        with pytest.raises(UserError, match=message):
            parse(argv)


# --------------------------------------------------------------------------------------- the data's preprocessing

def source(name: str, spacing=(1.0, 1.0, 1.0), schemes=("CTNormalization",), **intensities) -> PreprocessedData:
    ct = {"mean": 100.0, "std": 50.0, "percentile_00_5": -900.0, "percentile_99_5": 1200.0, **intensities}
    return PreprocessedData(name, "/nowhere", ["a"], {"plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
                                                       "foreground_intensity_properties_per_channel": {"0": ct}},
                            {"spacing": list(spacing), "normalization_schemes": list(schemes),
                             "use_mask_for_norm": [False]}, {"channel_names": {"0": "CT"}})


def test_datasets_preprocessed_differently_from_the_first_are_named_with_what_differs():
    notes = normalisation_differences([
        source("Dataset001_A"), source("Dataset002_Same", spacing=(1.0, 1.0, 1.0005), mean=100.05),  # within 0.1 %
        source("Dataset003_Spacing", spacing=(1.0, 1.0, 2.0)), source("Dataset004_Std", std=80.0),
        source("Dataset005_Percentile", percentile_99_5=3000.0),
        source("Dataset006_ZScore", schemes=("ZScoreNormalization",), std=80.0)])
    assert [n.split(" ", 1)[0] for n in notes] == ["Dataset003_Spacing", "Dataset004_Std", "Dataset005_Percentile",
                                                  "Dataset006_ZScore"]
    assert notes[0].startswith("Dataset003_Spacing is preprocessed differently from Dataset001_A (spacing "
                               "[1.0, 1.0, 2.0] vs [1.0, 1.0, 1.0])")
    assert "(channel 0 CT std 80 vs 50)" in notes[1] and "(channel 0 CT percentile_99_5 3000 vs 1200)" in notes[2]
    assert "(normalization_schemes ['ZScoreNormalization'] vs ['CTNormalization'])" in notes[3]  # no CT statistics


class FakeCases:
    """A dataset whose cases are arrays in memory (nnU-Net's ``load_case``: data, seg, seg_prev, properties)."""

    def __init__(self, **cases):
        self.cases = cases

    def load_case(self, identifier):
        case = self.cases[identifier]
        if isinstance(case, Exception):
            raise case
        return case


class LosesItsEnd(np.ndarray):
    """An array whose last chunk cannot be decompressed (a truncated blosc2 file)."""

    def __getitem__(self, index):
        if isinstance(index, tuple) and index and isinstance(index[0], slice) and index[0].start == -1:
            raise RuntimeError("blosc2: cannot decompress chunk")
        return super().__getitem__(index)


def test_a_case_is_refused_for_its_shape_dtype_a_lost_end_or_a_read_error():
    """The shape nnU-Net's preprocessing gives a case is its cropped shape resampled to the configuration's spacing:
    (10, 20, 30) at spacing (2, 1, 1) -> (20, 20, 30) at spacing 1."""
    src = source("Dataset001_A")
    props = {"spacing": [2.0, 1.0, 1.0], "shape_after_cropping_and_before_resampling": [10, 20, 30]}

    def case(shape=(1, 20, 20, 30), dtype=np.float32, seg_shape=(1, 20, 20, 30)):
        return np.zeros(shape, dtype), np.zeros(seg_shape, np.int16), None, props

    truncated = np.zeros((1, 20, 20, 30), np.float32).view(LosesItsEnd)
    cases = FakeCases(good=case(), no_seg=case()[:1] + (None, None, props), wrong_shape=case(shape=(1, 20, 20, 29)),
                      wrong_seg=case(seg_shape=(1, 20, 20, 29)), float64=case(dtype=np.float64),
                      truncated=(truncated, None, None, props), unreadable=OSError("truncated file"))
    assert case_problem(src, cases, "good") is None and case_problem(src, cases, "no_seg") is None
    assert case_problem(src, cases, "wrong_shape") == ("shape [1, 20, 20, 29], but its properties and the plans say "
                                                       "[1, 20, 20, 30]")
    assert case_problem(src, cases, "wrong_seg").startswith("shape [1, 20, 20, 30], but")
    assert case_problem(src, cases, "float64") == "dtype float64, not float32"
    assert case_problem(src, cases, "truncated") == "unreadable (RuntimeError: blosc2: cannot decompress chunk)"
    assert case_problem(src, cases, "unreadable") == "unreadable (OSError: truncated file)"
