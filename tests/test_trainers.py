"""The fine-tuning trainers: found by nnU-Net through the ext shim, load (or refuse) the pretrained encoder, and work
with the real ``nnUNetv2_train`` (incl. ``--c`` and ``--val``) and ``nnUNetv2_predict`` on CPU.
"""
from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import CROP, TRAIN_ENV, make_trainer, run_cli, write_checkpoint

from nnunetv2_hiendmae import trainers, variants
from nnunetv2_hiendmae.checkpoint import encoder_state_dict
from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.ext import ext_path, ext_trainer_hint
from nnunetv2_hiendmae.plans import main as plan_main
from nnunetv2_hiendmae.trainers import nnUNetTrainerHiEndMAE_scratch_smoke, nnUNetTrainerHiEndMAE_smoke
from nnunetv2_hiendmae.vit import interpolate_pos_embed

CFG = "3d_fullres"
# For nnU-Net's training/predict subprocesses only: 0 DA workers crashes nnU-Net's planning.


@pytest.fixture(scope="module")
def setup(preprocessed_dataset, tmp_path_factory) -> dict:
    """A learned-pos-embed checkpoint and plans from it (dataset spacing: shares the base data, so no preprocessing;
    the patch differs from the crop, so the position embedding is adapted), plus from-scratch plans."""
    folder, tmp = preprocessed_dataset["preprocessed"], tmp_path_factory.mktemp("trainers")
    ckpt = write_checkpoint(tmp / "pre.pth", folder, pos_embed="learned")
    for argv in (["-pt", str(ckpt), "-o", "T_tr"], ["--arch", "vit_tiny", "-o", "T_tr_scratch"]):
        plan_main(["-d", "990", *argv])
    return {"folder": folder, "ckpt": ckpt, "tmp": tmp}


def log_text(trainer) -> str:
    return Path(trainer.log_file).read_text()


def test_ext_discovery_through_the_shim(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    monkeypatch.setenv("nnUNet_extTrainer", str(ext_path()))
    assert ext_trainer_hint() is None
    for name in trainers.__all__:
        cls = recursive_find_trainer_class_by_name(name)
        assert cls is getattr(trainers, name), name  # ours, not a built-in of the same name, not a second copy
        assert cls.__module__ == "nnunetv2_hiendmae.trainers"
        assert pickle.loads(pickle.dumps(cls)) is cls
    assert "hiendmae_ext_trainers" not in sys.modules  # nnU-Net dropped the shim; the classes stay importable
    assert {"nnUNetTrainerHiEndMAE_smoke", "nnUNetTrainerHiEndMAE_scratch_demo", "nnUNetTrainerHiEndMAEBaseline_demo",
            "nnUNetTrainerHiEndMAE_scratch_250epochs"} <= set(trainers.__all__)


def test_ext_hint_when_unset(monkeypatch):
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    assert "export nnUNet_extTrainer=$(nnUNetv2_hiendmae_ext_path)" in ext_trainer_hint()


def test_schedules_are_data():
    assert (variants.SMOKE.epochs, variants.SMOKE.warmup()) == (2, 1)
    assert variants.Schedule(epochs=1000).warmup() == 50 and variants.Schedule(epochs=100).warmup() == 10
    assert trainers.nnUNetTrainerHiEndMAEBaseline_demo.schedule == trainers.nnUNetTrainerHiEndMAE_demo.schedule


def test_initialize_loads_the_pretrained_encoder(setup):
    trainer = make_trainer(nnUNetTrainerHiEndMAE_smoke, setup["folder"], "T_tr")
    assert type(pickle.loads(pickle.dumps(trainer))) is nnUNetTrainerHiEndMAE_smoke
    trainer.initialize()
    ckpt = torch.load(setup["ckpt"], weights_only=True)
    source, loaded = encoder_state_dict(ckpt), trainer.network.encoder.state_dict()
    assert source.keys() == loaded.keys()
    grid = trainer.network.encoder.pos_embed_grid
    assert grid != tuple(c // 16 for c in CROP)  # the patch is not the crop: the embedding had to be moved
    for key, value in source.items():
        expected = interpolate_pos_embed(value, [c // 16 for c in CROP], grid) if key == "pos_embed" else value
        assert torch.equal(loaded[key], expected), key
    log = log_text(trainer)
    assert f"{len(source)} tensors loaded, 1 adapted (pos_embed" in log and str(setup["ckpt"]) in log


@pytest.mark.parametrize("cls", [trainers.nnUNetTrainerHiEndMAE_recompute,
                                 trainers.nnUNetTrainerHiEndMAE_scratch_recompute])
def test_recompute_variants_train_the_same_network_with_less_kept(setup, cls):
    """The variants change one thing: the built network recomputes its full-resolution blocks; a training step runs."""
    trainer = make_trainer(cls, setup["folder"], "T_tr")
    trainer.initialize()
    assert trainer.network.recompute_full_resolution and cls.__mro__[1].recompute_full_resolution is False
    built = cls.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 2, False)
    assert built.recompute_full_resolution  # as nnUNetv2_predict builds it (from the class)
    assert cls.load_pretrained is cls.__mro__[1].load_pretrained
    shape = (trainer.batch_size, 1, *trainer.configuration_manager.patch_size)
    batch = {"data": torch.randn(shape), "target": torch.randint(0, 2, (shape[0], 1, *shape[2:])).float()}
    before = trainer.network.out.seg_layers[0].weight.detach().clone()
    loss = trainer.train_step(batch)["loss"]
    assert np.isfinite(loss) and not torch.equal(before, trainer.network.out.seg_layers[0].weight)


def test_recipe_layerwise_lr_and_no_decay_groups(setup):
    trainer = make_trainer(nnUNetTrainerHiEndMAE_smoke, setup["folder"], "T_tr")
    trainer.initialize()
    depth, lr, decay = trainer.network.encoder.depth, trainer.initial_lr, trainer.layer_decay
    assert (lr, trainer.weight_decay, trainer.enable_deep_supervision, trainer.grad_scaler) == (1e-4, 0.05, False, None)
    trainer.lr_scheduler.step(0)  # warm-up of 1 epoch: full lr at epoch 0
    group_of = {id(p): g for g in trainer.optimizer.param_groups for p in g["params"]}
    named = dict(trainer.network.named_parameters())
    assert group_of[id(named["encoder.patch_embed.proj.weight"])]["lr"] == pytest.approx(lr * decay ** (depth + 1))
    assert group_of[id(named["encoder.blocks.0.attn.qkv.weight"])]["lr"] == pytest.approx(lr * decay ** depth)
    assert group_of[id(named["out.seg_layers.0.weight"])]["lr"] == pytest.approx(lr)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr)  # what nnU-Net logs
    for name in ("encoder.cls_token", "encoder.pos_embed", "encoder.norm.weight", "encoder.blocks.0.attn.qkv.bias"):
        assert group_of[id(named[name])]["weight_decay"] == 0.0, name
    assert group_of[id(named["encoder.blocks.0.attn.qkv.weight"])]["weight_decay"] == 0.05
    optimizer = trainer.optimizer
    trainer.current_epoch = 1
    trainer.on_train_epoch_start()  # warm-up over: poly decay on the same optimiser
    assert trainer.optimizer is optimizer and trainer.training_stage == "train"


@pytest.mark.parametrize("clip", [1e-3, 0.05])
def test_a_training_step_clips_the_gradient_norm(setup, clip):
    """The recipe's clipping (norm 1 by default) is applied to the gradients the optimiser steps with."""
    trainer = make_trainer(nnUNetTrainerHiEndMAE_smoke, setup["folder"], "T_tr")
    trainer.initialize()
    trainer.grad_clip = clip
    shape = (trainer.batch_size, 1, *trainer.configuration_manager.patch_size)
    torch.manual_seed(0)
    batch = {"data": 5 * torch.randn(shape), "target": torch.randint(0, 4, (shape[0], 1, *shape[2:])).float()}
    trainer.train_step(batch)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.network.parameters()
                                                 if p.grad is not None]))
    assert norm.item() == pytest.approx(clip, rel=1e-3)


def test_scratch_trainer_starts_from_random_weights(setup):
    trainer = make_trainer(nnUNetTrainerHiEndMAE_scratch_smoke, setup["folder"], "T_tr")
    trainer.initialize()
    source = encoder_state_dict(torch.load(setup["ckpt"], weights_only=True))
    loaded = trainer.network.encoder.state_dict()
    assert not torch.equal(loaded["blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"])
    assert "random initialisation" in log_text(trainer)
    assert len({g["lr"] for g in trainer.optimizer.param_groups}) == 1  # no layer decay without pretraining


def test_refuses_a_missing_or_changed_checkpoint(setup):
    mutable = setup["tmp"] / "mutable.pth"
    shutil.copy(setup["ckpt"], mutable)
    plan_main(["-d", "990", "-pt", str(mutable), "-o", "T_tr_mutable"])
    write_checkpoint(mutable, setup["folder"], pos_embed="learned", seed=1)  # same path, other weights
    trainer = make_trainer(nnUNetTrainerHiEndMAE_smoke, setup["folder"], "T_tr_mutable")
    with pytest.raises(UserError, match="changed since the plans were written"):
        trainer.initialize()
    assert trainer.network is None  # refused before anything was built: never silently from scratch
    mutable.unlink()
    with pytest.raises(UserError, match="checkpoint not found"):
        make_trainer(nnUNetTrainerHiEndMAE_smoke, setup["folder"], "T_tr_mutable").initialize()


def test_refuses_a_checkpoint_that_does_not_fit(setup):
    plans = json.loads((setup["folder"] / "T_tr.json").read_text())
    plans["configurations"][CFG]["architecture"]["arch_kwargs"]["encoder"]["depth"] = 2  # plans edited by hand
    (setup["folder"] / "T_tr_misfit.json").write_text(json.dumps({**plans, "plans_name": "T_tr_misfit"}))
    with pytest.raises(UserError, match="does not match the network: depth"):
        make_trainer(nnUNetTrainerHiEndMAE_smoke, setup["folder"], "T_tr_misfit").initialize()


def test_pretrained_trainer_needs_a_checkpoint_in_the_plans(setup):
    with pytest.raises(UserError, match=r"-tr nnUNetTrainerHiEndMAE_scratch_smoke, or .* -pt CHECKPOINT"):
        make_trainer(nnUNetTrainerHiEndMAE_smoke, setup["folder"], "T_tr_scratch").initialize()
    with pytest.raises(UserError, match=r"not written by nnUNetv2_hiendmae_plan"):
        make_trainer(nnUNetTrainerHiEndMAE_smoke, setup["folder"], "nnUNetPlans").initialize()
    with pytest.raises(UserError, match=r"describe .*PlainConvUNet, not one of nnunetv2_hiendmae.network.HiEndUNETR"):
        make_trainer(nnUNetTrainerHiEndMAE_scratch_smoke, setup["folder"], "nnUNetPlans").initialize()


def test_load_checkpoint_accepts_a_dict_and_restores_the_stage(setup):
    """--c from a loaded dict: the epoch, its optimiser stage, the weights, and in fp16 (a GPU without native bf16)
    the loss scale the GradScaler had reached, as nnU-Net's own load_checkpoint restores it."""
    trainer = make_trainer(nnUNetTrainerHiEndMAE_smoke, setup["folder"], "T_tr")
    trainer.initialize()
    trainer.current_epoch = 1  # saved as "1 epoch done": past the 1-epoch warm-up
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=7)
    path = setup["tmp"] / "nnunet_checkpoint.pth"
    trainer.save_checkpoint(str(path))
    resumed = make_trainer(nnUNetTrainerHiEndMAE_smoke, setup["folder"], "T_tr")
    resumed.grad_scaler = torch.amp.GradScaler("cpu")  # fp16's, at its default 65,536
    resumed.load_checkpoint(torch.load(path, weights_only=False))
    assert resumed.grad_scaler.get_scale() == 512.0 and resumed.grad_scaler.get_growth_interval() == 7
    assert resumed.current_epoch == 2 and resumed.training_stage == "train"
    assert "weights come from the nnU-Net checkpoint" in log_text(resumed)
    for key, value in trainer.network.state_dict().items():
        assert torch.equal(resumed.network.state_dict()[key], value), key


def test_load_checkpoint_of_an_unreadable_or_foreign_file_says_what_it_is_not(setup, tmp_path):
    trainer = make_trainer(nnUNetTrainerHiEndMAE_smoke, setup["folder"], "T_tr")
    trainer.initialize()
    broken = tmp_path / "checkpoint_latest.pth"
    broken.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(UserError, match=r"is not a readable nnU-Net training checkpoint \(truncated, corrupt"):
        trainer.load_checkpoint(str(broken))
    torch.save({"weights": {}}, broken)
    with pytest.raises(UserError, match=r"not an nnU-Net training checkpoint: expected the keys network_weights"):
        trainer.load_checkpoint(str(broken))


class StagedTwenty(trainers.nnUNetTrainerHiEndMAE_staged):
    """Staged on a 20-epoch run: the encoder frozen in epochs 0-1, joining in epoch 2 with a 2-epoch warm-up."""

    schedule = variants.Schedule(epochs=20, iterations=1, val_iterations=1, warmup_epochs=2)


def batch_for(trainer, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    shape = (trainer.batch_size, 1, *trainer.configuration_manager.patch_size)
    return {"data": torch.randn(shape, generator=generator),
            "target": torch.randint(0, 2, (shape[0], 1, *shape[2:]), generator=generator).float()}


def train_epoch(trainer, epoch: int, steps: int = 1) -> None:
    """What nnU-Net's run_training does for the optimiser in one epoch, on synthetic batches seeded by the epoch."""
    trainer.current_epoch = epoch
    trainer.on_train_epoch_start()
    for i in range(steps):
        trainer.train_step(batch_for(trainer, 100 * epoch + i))


def states(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def optimised(trainer) -> set[int]:
    return {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}


def test_frozen_encoder_never_learns_and_is_not_in_the_optimiser(setup, tmp_path):
    trainer = make_trainer(trainers.nnUNetTrainerHiEndMAE_frozen_smoke, setup["folder"], "T_tr")
    trainer.initialize()
    encoder, before, head = trainer.network.encoder, states(trainer.network.encoder), states(trainer.network.out)
    for epoch in range(trainer.num_epochs):
        train_epoch(trainer, epoch, steps=2)
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())  # bit for bit
    assert not all(torch.equal(v, head[k]) for k, v in trainer.network.out.state_dict().items())  # the decoder learns
    encoder_ids = {id(p) for p in encoder.parameters()}
    assert not any(p.requires_grad for p in encoder.parameters())
    assert optimised(trainer) == {id(p) for p in trainer.network.parameters()} - encoder_ids
    assert not encoder_ids & {id(p) for p in trainer.optimizer.state}  # no AdamW state, no weight decay drift
    assert len(trainer.optimizer.state) == len(optimised(trainer))
    assert "encoder frozen" in log_text(trainer)
    # --val after the last epoch rebuilds the same decoder-only optimiser for the checkpoint's state
    path = tmp_path / "final.pth"
    trainer.current_epoch = trainer.num_epochs - 1
    trainer.save_checkpoint(str(path))
    resumed = make_trainer(trainers.nnUNetTrainerHiEndMAE_frozen_smoke, setup["folder"], "T_tr")
    resumed.load_checkpoint(str(path))
    assert len(resumed.optimizer.state) == len(optimised(resumed)) == len(optimised(trainer))


def test_staged_encoder_learns_only_after_stage_one_with_its_own_warmup(setup):
    trainer = make_trainer(StagedTwenty, setup["folder"], "T_tr")
    trainer.initialize()
    network, lr, decay = trainer.network, trainer.initial_lr, trainer.layer_decay
    encoder_ids = {id(p) for p in network.encoder.parameters()}
    before = states(network.encoder)
    for epoch in (0, 1):  # stage 1: frozen
        train_epoch(trainer, epoch)
        assert all(torch.equal(v, before[k]) for k, v in network.encoder.state_dict().items()), epoch
        assert not optimised(trainer) & encoder_ids
    head = next(iter(network.out.parameters()))
    assert int(trainer.optimizer.state[head]["step"]) == 2

    train_epoch(trainer, 2)  # stage 2: the encoder joins, at half its lr (epoch 1 of its 2-epoch warm-up)
    assert optimised(trainer) == {id(p) for p in network.parameters()}
    assert not torch.equal(network.encoder.blocks[0].attn.qkv.weight, before["blocks.0.attn.qkv.weight"])
    group_of = {id(p): g for g in trainer.optimizer.param_groups for p in g["params"]}
    block0, out = network.encoder.blocks[0].attn.qkv.weight, network.out.seg_layers[0].weight
    depth = network.encoder.depth
    assert group_of[id(out)]["lr"] == pytest.approx(lr)  # poly decay starts after the whole-net warm-up
    assert group_of[id(block0)]["lr"] == pytest.approx(lr * decay ** depth * 0.5)
    assert int(trainer.optimizer.state[out]["step"]) == 3 and int(trainer.optimizer.state[block0]["step"]) == 1
    train_epoch(trainer, 3)  # warm-up over: the encoder at its layer-decayed share of the poly lr
    poly = lr * (1 - 1 / 18) ** 0.9
    assert group_of[id(out)]["lr"] == pytest.approx(poly)
    assert group_of[id(block0)]["lr"] == pytest.approx(poly * decay ** depth)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(poly)  # what nnU-Net logs: the decoder's lr


def test_staged_resume_with_c_in_either_stage_continues_exactly(setup, tmp_path):
    """--c (load_checkpoint) at an epoch of each stage rebuilds that stage's optimiser, so the next step is the one
    the uninterrupted run takes, bit for bit."""
    run = make_trainer(StagedTwenty, setup["folder"], "T_tr")
    run.initialize()
    for epoch, stage in ((0, "stage_1"), (2, "stage_2")):
        for e in range(epoch, epoch + 1):
            train_epoch(run, e)
        path = tmp_path / f"{stage}.pth"
        run.save_checkpoint(str(path))  # as nnU-Net at the end of epoch `epoch`: it resumes at epoch + 1
        train_epoch(run, epoch + 1)
        resumed = make_trainer(StagedTwenty, setup["folder"], "T_tr")
        resumed.load_checkpoint(str(path))
        assert resumed.current_epoch == epoch + 1
        assert resumed.encoder_frozen() is (stage == "stage_1")
        train_epoch(resumed, epoch + 1)
        for key, value in states(run.network).items():
            assert torch.equal(resumed.network.state_dict()[key], value), (stage, key)
        assert [g["lr"] for g in resumed.optimizer.param_groups] == [g["lr"] for g in run.optimizer.param_groups]
        assert [len(g["params"]) for g in resumed.optimizer.param_groups] == \
            [len(g["params"]) for g in run.optimizer.param_groups]


def test_only_the_smoke_schedule_predicts_without_test_time_mirroring(setup):
    """Mirroring stays in the training augmentation of every schedule; validation and nnUNetv2_predict (which reads
    the axes from the checkpoint) skip the mirrored passes for the smoke schedule only."""
    for cls, plans, mirrored in ((trainers.nnUNetTrainerHiEndMAE_smoke, "T_tr", False),
                                 (trainers.nnUNetTrainerHiEndMAEBaseline_smoke, "nnUNetPlans", False),
                                 (trainers.nnUNetTrainerHiEndMAE_demo, "T_tr", True),
                                 (trainers.nnUNetTrainerHiEndMAE, "T_tr", True)):
        trainer = make_trainer(cls, setup["folder"], plans)
        mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3]
        assert mirror_axes == (0, 1, 2), cls.__name__
        assert trainer.inference_allowed_mirroring_axes == (mirror_axes if mirrored else None), cls.__name__


def test_label_budget_cases_are_the_same_for_every_trainer_and_recorded(setup):
    """Fold 1 of dataset 990 has 5 training cases: 25 % are 2 of them, 50 % are 3, and its seed draws other cases
    than fold 0's seed would (fold 0, with 4 training cases, gives 2 at every budget and cannot tell seeds apart)."""
    folder, f = setup["folder"], 1
    chosen = {}
    for budget in (25, 50):
        for cls, plans in ((f"nnUNetTrainerHiEndMAE_frozen_smoke_budget{budget}", "T_tr"),
                           (f"nnUNetTrainerHiEndMAE_scratch_recompute_demo_budget{budget}", "T_tr"),
                           (f"nnUNetTrainerHiEndMAEBaseline_smoke_budget{budget}", "nnUNetPlans"),
                           (f"nnUNetTrainerHiEndMAEBaseline_250epochs_budget{budget}", "nnUNetPlans")):
            trainer = make_trainer(getattr(trainers, cls), folder, plans, f)
            train, val = trainer.do_split()
            fold = json.loads((folder / "splits_final.json").read_text())[f]
            assert val == fold["val"] and set(train) <= set(fold["train"])  # the fold's whole validation set
            assert train == variants.budget_cases(fold["train"], budget, f) != variants.budget_cases(fold["train"],
                                                                                                   budget, 0)
            assert len(train) == {25: 2, 50: 3}[budget]
            record = json.loads((Path(trainer.output_folder) / trainers.BUDGET_FILE).read_text())
            assert (record["label_budget_percent"], record["training_cases"], record["validation_cases"]) == \
                (budget, train, val)
            assert f"Label budget {budget} %: {len(train)} of the fold's {len(fold['train'])}" in log_text(trainer)
            chosen.setdefault(budget, set()).add(tuple(train))
    assert all(len(cases) == 1 for cases in chosen.values())  # one subset per budget, whatever the trainer
    assert set(next(iter(chosen[25]))) <= set(next(iter(chosen[50])))
    full = make_trainer(trainers.nnUNetTrainerHiEndMAE_frozen_smoke, folder, "T_tr", f)  # the whole fold: no record
    assert list(full.do_split()[0]) == fold["train"]
    assert not (Path(full.output_folder) / trainers.BUDGET_FILE).exists()


@pytest.mark.slow
def test_end_to_end_plan_train_resume_validate_predict(preprocessed_dataset, nnunet_dirs, setup, tmp_path,
                                                         monkeypatch):
    folder, raw = setup["folder"], preprocessed_dataset["raw"]
    env = {"nnUNet_extTrainer": str(ext_path()), **TRAIN_ENV}
    run_cli("nnUNetv2_hiendmae_plan", "-d", "990", "-pt", str(setup["ckpt"]), "-o", "T_e2e", check=True)
    train = ("nnUNetv2_train", "990", CFG, "0", "-tr", "nnUNetTrainerHiEndMAE_smoke", "-p", "T_e2e", "-device", "cpu")

    proc = run_cli(*train, env=env, check=True)
    assert "tensors loaded" in proc.stdout and "Epoch 1" in proc.stdout
    fold = nnunet_dirs["nnUNet_results"] / folder.name / f"nnUNetTrainerHiEndMAE_smoke__T_e2e__{CFG}" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()

    # Resume mid-run from checkpoint_latest after epoch 0 (nnU-Net deletes it when a run ends, so it is made from
    # the final one): --c must train epoch 1, the first after the warm-up, on the optimiser rebuilt for that stage.
    state = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    torch.save({**state, "current_epoch": 1}, fold / "checkpoint_latest.pth")
    (fold / "checkpoint_final.pth").unlink()
    resumed = run_cli(*train, "--c", env=env, check=True)
    assert "weights come from the nnU-Net checkpoint" in resumed.stdout
    assert "Optimiser stage 'train' from epoch 1" in resumed.stdout
    assert "Epoch 1" in resumed.stdout and "Epoch 0" not in resumed.stdout
    assert (fold / "checkpoint_final.pth").is_file()

    summary = fold / "validation" / "summary.json"
    summary.unlink()
    run_cli(*train, "--val", env=env, check=True)
    assert "foreground_mean" in json.loads(summary.read_text())
    best = run_cli("nnUNetv2_find_best_configuration", "990", "-c", CFG, "-tr", "nnUNetTrainerHiEndMAE_smoke", "-p",
                   "T_e2e", "-f", "0", "-np", "1", env=env, check=True)
    assert "-tr nnUNetTrainerHiEndMAE_smoke -c 3d_fullres -p T_e2e" in best.stdout

    images, out = raw / "imagesTs", tmp_path / "pred"
    predict = ("nnUNetv2_predict", "-i", str(images), "-o", str(out), "-d", "990", "-c", CFG, "-tr",
               "nnUNetTrainerHiEndMAE_smoke", "-p", "T_e2e", "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1")
    run_cli(*predict, env=env, check=True)
    for image in sorted(images.glob("*_0000.nii.gz")):
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / image.name.replace("_0000", ""))))
        assert seg.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(image))).shape
        assert set(np.unique(seg)) <= {0, 1, 2, 3}

    # Without nnUNet_extTrainer nnU-Net cannot find the trainer named in the model folder (documented behaviour).
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    failed = run_cli(*predict[:4], str(tmp_path / "pred_no_ext"), *predict[5:], env=TRAIN_ENV)
    assert failed.returncode != 0 and "Could not find requested nnunet trainer" in failed.stdout + failed.stderr


def test_nnunets_pretrained_weights_transfer_all_but_the_head_to_another_class_count(tmp_path):
    """nnU-Net's own ``-pretrained_weights`` loader (``load_pretrained_weights``) seeds a network for a dataset with
    fewer classes from a fine-tuned one: every weight but the segmentation head (``.seg_layers.``) is transferred."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    from nnunetv2_hiendmae.network import HiEndUNETR
    from nnunetv2_hiendmae.presets import encoder_config

    torch.manual_seed(0)
    fine_tuned = HiEndUNETR(1, 4, (32, 32, 32), encoder_config("vit_tiny"), feature_size=4)
    torch.save({"network_weights": fine_tuned.state_dict()}, tmp_path / "checkpoint_final.pth")
    torch.manual_seed(1)
    seeded = HiEndUNETR(1, 2, (32, 32, 32), encoder_config("vit_tiny"), feature_size=4)
    head = {k: v.clone() for k, v in seeded.state_dict().items() if ".seg_layers." in k}
    load_pretrained_weights(seeded, str(tmp_path / "checkpoint_final.pth"))
    source = fine_tuned.state_dict()
    for key, value in seeded.state_dict().items():
        expected = head[key] if key in head else source[key]
        assert torch.equal(value, expected), key
    assert set(head) == {"out.seg_layers.0.weight", "out.seg_layers.0.bias"}


def test_a_pretraining_checkpoint_given_to_pretrained_weights_is_one_line(setup):
    """nnU-Net users reach for -pretrained_weights first; with a pretraining checkpoint the command says what to run
    instead of ending in nnU-Net's KeyError."""
    env = {"nnUNet_extTrainer": str(ext_path()), **TRAIN_ENV}
    proc = run_cli("nnUNetv2_train", "990", CFG, "0", "-tr", "nnUNetTrainerHiEndMAE_smoke", "-p", "T_tr", "-device",
                   "cpu", "-pretrained_weights", str(setup["ckpt"]), env=env)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: -pretrained_weights {setup['ckpt']} is a nnunetv2_hiendmae pretraining checkpoint")
    assert "nnUNetv2_hiendmae_plan -d DATASET -pt" in last


def test_an_fp16_step_scales_the_loss_and_clips_the_unscaled_gradient(setup):
    """Fine-tuning in fp16 (a GPU without native bf16) goes through nnU-Net's GradScaler: the loss is scaled (the
    scale grows after a finite step), and the clipping sees the true gradient, unscaled first (clipping the scaled
    one would leave a norm 1,024 times too small)."""
    trainer = make_trainer(nnUNetTrainerHiEndMAE_smoke, setup["folder"], "T_tr")
    trainer.initialize()
    trainer.grad_clip = 1e-3
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    trainer.train_step(batch_for(trainer, 7))
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.network.parameters()
                                                 if p.grad is not None]))
    assert norm.item() == pytest.approx(1e-3, rel=1e-3) and trainer.grad_scaler.get_scale() == 2048.0
