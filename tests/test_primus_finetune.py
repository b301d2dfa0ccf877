"""A Primus pretrained by the real command goes through the real commands: nnUNetv2_hiendmae_plan writes plans whose
network is dynamic-network-architectures' Primus, nnUNetv2_train loads every encoder tensor into it (reporting the
adapted position embedding), nnUNetv2_predict segments with it, nnU-Net's own ``Primus`` reads its weights, and the
fine-tuned encoder embeds; the probe ranks a Primus checkpoint against ``random:primus_tiny``."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import TRAIN_ENV, pretrain_args, run_cli
from dynamic_network_architectures.architectures.primus import Primus

from nnunetv2_hiendmae.checkpoint import encoder_state_dict, load_checkpoint
from nnunetv2_hiendmae.ext import ext_path
from nnunetv2_hiendmae.presets import PRESETS, encoder_config
from nnunetv2_hiendmae.primus_network import PrimusNetwork, dna_primus_state_dict
from pretrain.embed import embed_volume
from pretrain.trained_encoder import load_trained_encoder

CFG = "3d_fullres"
PLANS = "T_primus"


def source_keys(ckpt: dict) -> set[str]:
    return set(encoder_state_dict(ckpt))


@pytest.fixture(scope="module")
def primus_checkpoint(preprocessed_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("primus_pretrain")
    run_cli(*pretrain_args(preprocessed_dataset, out, 1, 1, "--arch", "primus_tiny", method="mae"), check=True)
    return out / "checkpoint_final.pth"


def test_a_primus_checkpoint_is_planned_trained_and_predicted_by_nnunet(preprocessed_dataset, nnunet_dirs,
                                                                        primus_checkpoint, tmp_path):
    ckpt = load_checkpoint(primus_checkpoint)
    assert ckpt["encoder"]["kind"] == "primus" and ckpt["encoder"]["pos_embed_grid"] == [2, 4, 4]
    run_cli("nnUNetv2_hiendmae_plan", "-d", "990", "-pt", str(primus_checkpoint), "-o", PLANS, check=True)
    folder = preprocessed_dataset["preprocessed"]
    cfg = json.loads((folder / f"{PLANS}.json").read_text())["configurations"][CFG]
    assert cfg["architecture"]["network_class_name"] == "nnunetv2_hiendmae.primus_network.PrimusNetwork"
    assert all(p % 8 == 0 for p in cfg["patch_size"])

    env = {"nnUNet_extTrainer": str(ext_path()), **TRAIN_ENV}
    train = ("nnUNetv2_train", "990", CFG, "0", "-tr", "nnUNetTrainerHiEndMAE_smoke", "-p", PLANS, "-device", "cpu")
    proc = run_cli(*train, env=env, check=True)
    loaded = len(encoder_state_dict(ckpt))
    assert f"pretrained encoder: {loaded} tensors loaded" in proc.stdout
    if cfg["patch_size"] != [16, 32, 32]:
        assert "eva.pos_embed: token grid (2, 4, 4) ->" in proc.stdout
    fold = nnunet_dirs["nnUNet_results"] / folder.name / f"nnUNetTrainerHiEndMAE_smoke__{PLANS}__{CFG}" / "fold_0"
    weights = torch.load(fold / "checkpoint_final.pth", weights_only=False)["network_weights"]
    p = PRESETS["primus_tiny"]
    nnunet_primus = Primus(1, p["embed_dim"], (8, 8, 8), 4, eva_depth=p["depth"], eva_numheads=p["num_heads"],
                           input_shape=tuple(cfg["patch_size"]), init_values=0.1, scale_attn_inner=True)
    nnunet_primus.load_state_dict(dna_primus_state_dict(weights), strict=True)  # dna's Primus, the decoder renamed
    fine_tuned = load_trained_encoder(fold / "checkpoint_final.pth").encoder  # what nnUNetv2_hiendmae_embed uses
    assert fine_tuned.state_dict().keys() == source_keys(ckpt)
    for key, value in fine_tuned.state_dict().items():
        assert torch.equal(value, weights[key]), key

    images, out = preprocessed_dataset["raw"] / "imagesTs", tmp_path / "pred"
    run_cli("nnUNetv2_predict", "-i", str(images), "-o", str(out), "-d", "990", "-c", CFG, "-tr",
            "nnUNetTrainerHiEndMAE_smoke", "-p", PLANS, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1",
            env=env, check=True)
    for image in sorted(images.glob("*_0000.nii.gz")):
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / image.name.replace("_0000", ""))))
        assert seg.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(image))).shape
        assert set(np.unique(seg)) <= {0, 1, 2, 3}


def test_every_encoder_tensor_loads_into_the_primus_network_with_the_two_adaptations():
    """A 1-channel checkpoint of a (2, 4, 4) grid into a 2-channel network of a (2, 4, 6) grid: the stem is repeated
    and divided by 2, the position embedding resized; every other tensor is copied exactly; the decoder is untouched."""
    from nnunetv2_hiendmae.encoders import build_encoder
    from nnunetv2_hiendmae.plans import plans_encoder_config
    from nnunetv2_hiendmae.presets import encoder_config
    from nnunetv2_hiendmae.vit import interpolate_pos_embed
    from nnunetv2_hiendmae.weights import load_pretrained_encoder

    config = encoder_config("primus_tiny", 1, pos_embed_grid=(2, 4, 4))
    torch.manual_seed(0)
    source = build_encoder(config).state_dict()
    source = {k: v + 0.1 * torch.randn_like(v) for k, v in source.items()}  # off the initial constants
    net = PrimusNetwork(2, 3, (16, 32, 48), plans_encoder_config(config))
    decoder = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("up_projection")}
    weights = {f"encoder.{k}": v for k, v in source.items()}
    report = load_pretrained_encoder(net, {"encoder": config, "weights": weights})
    assert len(report.loaded) == len(source) and len(report.adapted) == 2
    state = net.state_dict()
    for key, value in source.items():
        if key == "down_projection.proj.weight":
            torch.testing.assert_close(state[key], value.repeat(1, 2, 1, 1, 1) / 2)
        elif key == "eva.pos_embed":
            torch.testing.assert_close(state[key], interpolate_pos_embed(value, (2, 4, 4), (2, 4, 6)))
        else:
            assert torch.equal(state[key], value), key
    assert all(torch.equal(state[k], v) for k, v in decoder.items())
    assert set(net.no_weight_decay()) <= set(dict(net.named_parameters()))


def tiny_primus(channels: int, classes: int, seed: int) -> PrimusNetwork:
    """A ``primus_tiny`` PrimusNetwork for a (16, 16, 24) patch, initialised after ``torch.manual_seed(seed)``."""
    from nnunetv2_hiendmae.plans import plans_encoder_config

    torch.manual_seed(seed)
    config = plans_encoder_config(encoder_config("primus_tiny", channels, pos_embed_grid=(2, 2, 3)))
    return PrimusNetwork(channels, classes, (16, 16, 24), config)


def perturbed(state: dict, seed: int) -> dict:
    """Every tensor moved off its initial constants (LayerScale 0.1, zero biases and mask token)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in state.items()}


def test_the_primus_network_is_dnas_primus_with_its_decoder_under_nnunets_head_name():
    """The same initialisation and the same output as dynamic-network-architectures' ``Primus`` with the same weights;
    the decoder, and only it, is under ``.seg_layers.``; weights in dna's layout load strictly, and ours go back to
    dna's ``Primus`` strictly through :func:`dna_primus_state_dict`."""
    ours = tiny_primus(2, 3, seed=0)
    c = ours.encoder_config
    torch.manual_seed(0)
    dna = Primus(2, c["embed_dim"], (8, 8, 8), 3, eva_depth=c["depth"], eva_numheads=c["num_heads"],
                 input_shape=(16, 16, 24), mlp_ratio=c["mlp_ratio"], drop_path_rate=c["drop_path_rate"],
                 init_values=c["init_values"], scale_attn_inner=True)
    initial = dna_primus_state_dict(ours.state_dict())
    assert list(initial) == list(dna.state_dict())
    assert all(torch.equal(v, initial[k]) for k, v in dna.state_dict().items())
    assert {k for k in ours.state_dict() if ".seg_layers." in k} == {k for k in ours.state_dict()
                                                                     if k.startswith("up_projection.")}

    weights = perturbed(dna.state_dict(), seed=1)  # dna's layout: up_projection.decode.*
    dna.load_state_dict(weights, strict=True)
    ours.load_state_dict(weights, strict=True)
    x = torch.randn(2, 2, 16, 16, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), dna.eval()(x))
    back = dna_primus_state_dict(ours.state_dict())
    assert back.keys() == weights.keys() and all(torch.equal(back[k], v) for k, v in weights.items())
    assert list(dna_primus_state_dict(weights)) == list(weights)  # a state dict in dna's layout stays as it is

    # inside another module (keys under its prefix, as when a trainer wraps the network) dna's layout is read too
    nested = torch.nn.Sequential(tiny_primus(2, 3, seed=3))
    nested.load_state_dict({f"0.{k}": v for k, v in weights.items()}, strict=True)
    assert all(torch.equal(v, back[k]) for k, v in dna_primus_state_dict(nested[0].state_dict()).items())
    # a state dict with the decoder in both layouts: ours is not overwritten, the dna-layout keys are unexpected
    ambiguous = {**ours.state_dict(), **{k: v for k, v in weights.items() if k.startswith("up_projection.")}}
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"up_projection\.decode\."):
        ours.load_state_dict(ambiguous, strict=True)


@pytest.mark.parametrize("classes, layout", [(2, "ours"), (3, "ours"), (5, "ours"), (5, "dna")])
def test_nnunets_pretrained_weights_seed_a_primus_for_any_class_count_with_the_encoder(tmp_path, classes, layout):
    """nnU-Net 2.8.1's own ``-pretrained_weights`` loader from a Primus fine-tuned for 3 classes (in our layout, or in
    dna's, as folds written before the decoder was renamed): every stem and EVA tensor is transferred, the decoder is
    the target's own, whose widths follow its class count (inner layers differ too for 2 or 5 classes)."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    source = perturbed(tiny_primus(1, 3, seed=0).state_dict(), seed=1)
    saved = dna_primus_state_dict(source) if layout == "dna" else source
    torch.save({"network_weights": saved}, tmp_path / "checkpoint_final.pth")
    seeded = tiny_primus(1, classes, seed=2)
    decoder = {k: v.clone() for k, v in seeded.state_dict().items() if k.startswith("up_projection.")}
    load_pretrained_weights(seeded, str(tmp_path / "checkpoint_final.pth"))
    state = seeded.state_dict()
    assert set(state) - set(decoder) == {k for k in source if not k.startswith("up_projection.")}
    for key, value in state.items():
        assert torch.equal(value, decoder[key] if key in decoder else source[key]), key
    if classes != 3:
        inner = [k for k in decoder if not k.startswith("up_projection.seg_layers.decode.2.")]  # not the last conv
        assert any(decoder[k].shape != source[k].shape for k in inner)


def test_the_probe_ranks_a_primus_checkpoint_against_random_primus(preprocessed_dataset, primus_checkpoint, tmp_path):
    out = tmp_path / "probe"
    run_cli("nnUNetv2_hiendmae_probe", "-d", "990", "-pt", "random:primus_tiny", str(primus_checkpoint), "-o",
            str(out), "-device", "cpu", check=True, timeout=600, env={"OMP_NUM_THREADS": "1"})
    with open(out / "probe.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["checkpoint"] for r in rows] == ["random:primus_tiny", str(primus_checkpoint)]
    assert [r["patch size"] for r in rows] == ["16x32x32"] * 2 and rows[1]["method"] == "mae"
    assert all(0 <= float(r["mean fg Dice"]) <= 1 for r in rows)


def test_an_embedding_without_cls_token_pools_each_window_by_its_mean_token():
    """One window: the ``cls`` vector of a Primus is the mean of that window's normed tokens (the token map)."""
    from nnunetv2_hiendmae.encoders import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder(encoder_config("primus_tiny", pos_embed_grid=(2, 4, 4))).eval()
    image = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens, cls = embed_volume(encoder, image, patch=(16, 32, 32), step_size=0.5, batch_size=1)
    assert tokens.shape == (48, 2, 4, 4)
    torch.testing.assert_close(cls, tokens.mean((1, 2, 3)))


def test_scratch_plans_and_the_frozen_and_budget_variants_build_primus(preprocessed_dataset, primus_checkpoint):
    """``--arch primus_tiny`` writes from-scratch plans whose network is Primus, which the scratch trainer builds
    without a checkpoint; on a pretrained Primus's plans the frozen variant keeps every encoder tensor (stem and EVA)
    out of the optimiser and loads the checkpoint's, and a label-budget variant trains on its nested subset."""
    from conftest import make_trainer

    from nnunetv2_hiendmae import trainers, variants
    from nnunetv2_hiendmae.plans import main as plan_main

    folder = preprocessed_dataset["preprocessed"]
    plan_main(["-d", "990", "--arch", "primus_tiny", "-o", "T_primus_scratch"])
    plans = json.loads((folder / "T_primus_scratch.json").read_text())
    cfg = plans["configurations"][CFG]
    assert cfg["architecture"]["network_class_name"] == "nnunetv2_hiendmae.primus_network.PrimusNetwork"
    assert plans["pretrain_info"]["checkpoint"] is None
    scratch = make_trainer(trainers.nnUNetTrainerHiEndMAE_scratch_smoke, folder, "T_primus_scratch")
    scratch.initialize()
    assert isinstance(scratch.network, PrimusNetwork)
    with torch.no_grad():
        assert scratch.network(torch.zeros(1, 1, *cfg["patch_size"])).shape == (1, 4, *cfg["patch_size"])

    plan_main(["-d", "990", "-pt", str(primus_checkpoint), "-o", "T_primus_frozen"])
    frozen = make_trainer(trainers.nnUNetTrainerHiEndMAE_frozen_smoke, folder, "T_primus_frozen")
    frozen.initialize()
    encoder = {n for n, _ in frozen.network.named_parameters() if n.startswith(("down_projection.", "eva."))}
    assert encoder and all(not p.requires_grad for n, p in frozen.network.named_parameters() if n in encoder)
    optimised = {id(p) for g in frozen.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for n, p in frozen.network.named_parameters() if n not in encoder}
    stored = encoder_state_dict(load_checkpoint(primus_checkpoint))
    loaded = frozen.network.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in stored.items() if k != "eva.pos_embed")

    budget = make_trainer(trainers.nnUNetTrainerHiEndMAE_frozen_smoke_budget50, folder, "T_primus_frozen", 1)
    train, val = budget.do_split()
    fold = json.loads((folder / "splits_final.json").read_text())[1]
    assert val == fold["val"] and train == variants.budget_cases(fold["train"], 50, 1) and len(train) == 3
