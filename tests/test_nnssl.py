"""nnssl checkpoints in probe, embed, plan and study; our checkpoints in nnU-Net's loaders (docs/interop.md).

The nnssl checkpoint is built here with nnssl's key layout and adaptation-plan fields, from dynamic-network-
architectures' modules (nnssl itself is not installable from PyPI): a tiny Primus (embed 48, depth 3, 2 heads, 8^3
tokens, 32^3 pretraining patch) given explicit Primus arguments, as nnU-Net master's ``PretrainedTrainer_Primusx``
reads them, and a narrow ResEnc (ResEnc-L's six stages and strides, 4 to 14 channels, one block per stage) given
explicit ``ResidualEncoderUNet`` arguments, as nnssl's ``DynamicArchitecturePlans`` states them.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import pydoc
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TRAIN_ENV, cli_error, run_cli, write_checkpoint
from dynamic_network_architectures.architectures.primus import _PRIMUS_CONFIGS, Primus
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.eva import Eva
from dynamic_network_architectures.building_blocks.patch_encode_decode import LayerNormNd, PatchDecode, PatchEmbed
from einops import rearrange
from torch import nn

from nnunetv2_hiendmae import export, nnssl, probe_cli
from nnunetv2_hiendmae.checkpoint import load_checkpoint, make_checkpoint, save_atomic
from nnunetv2_hiendmae.encoders import build_encoder
from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.plans import build_plan, normalisation, parser, to_dataset_axes
from nnunetv2_hiendmae.plans import main as plan_main
from nnunetv2_hiendmae.presets import encoder_config
from nnunetv2_hiendmae.resenc import ResEncFeatures, feature_stage, resolve_classes, total_strides
from pretrain import embed_cli
from pretrain.trained_encoder import load_trained_encoder

# rotary dim 48 / 2 / 1.5 = 16; depth unlike the head count, so that a swap of the two shows
TINY = {"embed_dim": 48, "encoder_eva_depth": 3, "encoder_eva_numheads": 2}
PATCH = [32, 32, 32]  # pretraining patch: a 4^3 token grid
SPACING = [2.5, 1.25, 1.5]  # no two alike: an axis mix-up shows
TRANSPOSE = [2, 0, 1]


class EvaMAELayout(nn.Module):
    """The module names of nnssl's ``EvaMAE`` (``src/nnssl/architectures/evaMAE_module.py``), the network of its
    Primus MAE trainers: ``down_projection`` (PatchEmbed), ``eva`` (the encoder), ``up_projection`` (PatchDecode),
    ``decoder`` (a second Eva) and a ``mask_token`` parameter; built from dynamic-network-architectures' blocks with
    ``BaseEvaMAETrainer``'s settings (LayerScale 0.1, ``scale_attn_inner``)."""

    def __init__(self, channels: int = 1):
        super().__init__()
        grid = tuple(p // 8 for p in PATCH)
        kwargs = dict(ref_feat_shape=grid, init_values=0.1, scale_attn_inner=True, mlp_ratio=8 / 3)
        self.down_projection = PatchEmbed((8, 8, 8), channels, TINY["embed_dim"])
        self.eva = Eva(embed_dim=TINY["embed_dim"], depth=TINY["encoder_eva_depth"],
                       num_heads=TINY["encoder_eva_numheads"], **kwargs)
        self.up_projection = PatchDecode((8, 8, 8), TINY["embed_dim"], 1, norm=LayerNormNd, activation=nn.GELU)
        self.decoder = Eva(embed_dim=TINY["embed_dim"], depth=1, num_heads=2, **kwargs)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, TINY["embed_dim"]))
        with torch.no_grad():  # off the constant initial values (LayerScale, biases, position embedding)
            for p in self.parameters():
                p.add_(0.05 * torch.randn_like(p))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, E]``: the encoder's normed tokens as a Primus computes them at the pretraining patch."""
        return self.eva(rearrange(self.down_projection(x), "b c w h d -> b (w h d) c"))[0]


def adaptation_plan(arch: dict | None = None, **changes) -> dict:
    """``AdaptationPlan.serialize()`` (MIC-DKFZ/nnssl ``src/nnssl/adaptation_planning/adaptation_plan.py``), field by
    field, with the values nnssl's Primus trainers give them
    (``src/nnssl/training/nnsslTrainer/masked_image_modeling/BaseEvaMAETrainer.py``,
    ``build_architecture_and_adaptation_plan``)."""
    configuration = {  # ConfigurationPlan (src/nnssl/experiment_planning/experiment_planners/plan.py)
        "data_identifier": "nnsslPlans_onemmiso", "preprocessor_name": "DefaultPreprocessor",
        "spacing_style": "onemmiso",
        "normalization_schemes": ["ZScoreNormalization"],  # what nnssl's planner always writes
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_mask": "resample_data_or_seg_to_shape",
        "resampling_fn_mask_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        # save_checkpoint turns numpy arrays into tensors (AbstractTrainer._convert_numpy)
        "spacing": torch.tensor(SPACING, dtype=torch.float64), "patch_size": list(PATCH)}
    plan = {
        # ArchitecturePlans.serialize(): the explicit-arguments flavour PretrainedTrainer_Primusx reads (nnU-Net
        # master, nnunetv2/training/nnUNetTrainer/pretraining/thrp_primusx_finetuning.py)
        "architecture_plans": arch or {"arch_class_name": "PrimusX", "arch_kwargs": {
            **TINY, "patch_embed_size": [8, 8, 8], "scale_attn_inner": True, "init_values": 0.1},
            "arch_kwargs_requiring_import": []},
        "pretrain_plan": {  # Plan (plan.py)
            "dataset_name": "Dataset745_OpenMind", "plans_name": "nnsslPlans",
            "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "image_reader_writer": "SimpleITKIO",
            "transpose_forward": TRANSPOSE, "transpose_backward": [1, 2, 0],
            "configurations": {"onemmiso": configuration}, "experiment_planner_used": "ExperimentPlanner"},
        "pretrain_num_input_channels": 1,
        "recommended_downstream_patchsize": list(PATCH),  # BaseEvaMAETrainer: (160, 160, 160)
        "key_to_encoder": "eva", "key_to_stem": "down_projection", "keys_to_in_proj": ["down_projection.proj"],
        "key_to_lpe": "eva.pos_embed"}
    plan.update(changes)
    return plan


def write_nnssl_checkpoint(path, prefix: str = "", seed: int = 0, plan: dict | None = None) -> tuple:
    """``(path, network)``: what nnssl's ``AbstractTrainer.save_checkpoint`` writes. ``prefix`` ``encoder.``: the
    layout of nnssl's contrastive Primus trainers (``vocoEvaTrainer.py``: ``encoder.eva``)."""
    torch.manual_seed(seed)
    network = EvaMAELayout().eval()
    weights = {f"{prefix}{k}": v for k, v in network.state_dict().items()}
    plan = plan or adaptation_plan()
    if prefix:
        plan = {**plan, "key_to_encoder": f"{prefix}eva", "key_to_stem": f"{prefix}down_projection"}
    torch.save({"network_weights": weights, "optimizer_state": {}, "grad_scaler_state": None, "logging": {},
                "_best_ema": None, "current_epoch": 7, "init_args": {"fold": 0}, "trainer_name": "BaseEvaMAETrainer",
                "nnssl_adaptation_plan": plan}, path)
    return path, network


@pytest.fixture(scope="module")
def nnssl_ckpt(tmp_path_factory) -> tuple:
    return write_nnssl_checkpoint(tmp_path_factory.mktemp("nnssl") / "checkpoint_final.pth")


# ResidualEncoderUNet's arguments as nnssl's DynamicArchitecturePlans.serialize() writes them (adaptation_plan.py; the
# form BaseMAETrainer.py's NonResEncL_BaseMAETrainer_Test gives them): ResEnc-L's stages and strides, narrow, every
# stage of another width, so that reading the wrong stage shows
RESENC = {
    "n_stages": 6, "features_per_stage": [4, 6, 8, 10, 12, 14], "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 6, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "n_blocks_per_stage": [1] * 6,
    "n_conv_per_stage_decoder": [1] * 5, "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
EXPLICIT_RESENC = {"arch_class_name": "ResidualEncoderUNet", "arch_kwargs": RESENC,
                   "arch_kwargs_requiring_import": ["conv_op", "norm_op", "nonlin"]}
# what nnssl's "ResEncL" names: get_res_enc_l (src/nnssl/architectures/architecture_registry.py)
RESENC_L = {**RESENC, "features_per_stage": [32, 64, 128, 256, 320, 320], "n_blocks_per_stage": [1, 3, 4, 6, 6, 6]}


def resenc_plan(arch: dict) -> dict:
    """The adaptation plan of nnssl's ResEnc trainers (``BaseMAETrainer.build_architecture_and_adaptation_plan``):
    stem and stages under ``encoder.``, no position embedding."""
    return adaptation_plan(arch, key_to_encoder="encoder.stages", key_to_stem="encoder.stem",
                           keys_to_in_proj=["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"],
                           key_to_lpe=None)


def resenc_network(kwargs: dict, channels: int = 1) -> ResidualEncoderUNet:
    """The network nnssl's ``get_network_from_plans`` builds from them: dna's ResidualEncoderUNet, classes imported
    by name."""
    classes = {k: pydoc.locate(kwargs[k]) for k in EXPLICIT_RESENC["arch_kwargs_requiring_import"]}
    return ResidualEncoderUNet(input_channels=channels, num_classes=2, deep_supervision=False,
                               **{**kwargs, **classes})


def write_resenc_checkpoint(path) -> tuple:
    """``(path, network)``: what nnssl's ``save_checkpoint`` writes for the narrow ResEnc, weights moved off their
    initial values."""
    torch.manual_seed(0)
    network = resenc_network(RESENC)
    network.apply(network.initialize)  # nnssl's get_network_from_plans
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save({"network_weights": network.state_dict(), "current_epoch": 3, "trainer_name":
                "NonResEncL_BaseMAETrainer_Test", "nnssl_adaptation_plan": resenc_plan(EXPLICIT_RESENC)}, path)
    return path, network.eval()


# ------------------------------------------------------------------------------------------------------- reading

@pytest.mark.parametrize("prefix", ["", "encoder."], ids=["MAE layout", "contrastive layout"])
def test_an_nnssl_primus_reads_as_its_encoder_with_its_preprocessing(prefix, tmp_path):
    path, network = write_nnssl_checkpoint(tmp_path / "c.pth", prefix)
    trained = load_trained_encoder(path)
    x = torch.randn(2, 1, *PATCH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(trained.encoder(x)[0], network.tokens(x), rtol=1e-5, atol=2e-5)
    s = trained.settings
    assert (s.spacing, s.transpose_forward, s.normalization_schemes, s.use_mask_for_norm, s.patch_size) == \
        (SPACING, TRANSPOSE, ["ZScoreNormalization"], [False], PATCH)
    assert s.source.startswith("nnssl checkpoint") and "nnssl BaseEvaMAETrainer" in trained.description
    assert "spacing [2.5, 1.25, 1.5], transpose_forward [2, 0, 1], normalisation ZScoreNormalization" in \
        trained.notes[0]
    # the modules beside the encoder, named as deep as the encoder's own prefix
    assert trained.notes[0].endswith(f"patch [32, 32, 32]; not read: {prefix}decoder, {prefix}mask_token, "
                                     f"{prefix}up_projection")


def test_the_pretrain_patch_size_override_and_the_named_presets_are_read():
    """nnU-Net master's loader takes a plan's ``pretrain_patch_size`` before the configuration's patch; the named
    presets are dynamic-network-architectures' _PRIMUS_CONFIGS with 8^3 tokens."""
    assert nnssl.pretrain_patch(adaptation_plan(pretrain_patch_size=[64, 32, 16])) == [64, 32, 16]
    assert nnssl.pretrain_patch(adaptation_plan()) == PATCH
    for size, conf in _PRIMUS_CONFIGS.items():
        name = f"Primus{size}"
        arch, dims = nnssl._primus_dimensions(adaptation_plan({"arch_class_name": name, "arch_kwargs": None}), "")
        assert (dims["embed_dim"], dims["depth"], dims["num_heads"], dims["token_size"], dims["init_values"]) == \
            (conf["embed_dim"], conf["eva_depth"], conf["eva_numheads"], [8, 8, 8], 0.1)
        # and written back under the same name, without arguments (nnU-Net master builds it by name)
        config = {**encoder_config(arch, pos_embed_grid=[4, 4, 4]), "in_channels": 1}
        assert nnssl.architecture_plans(config) == {"arch_class_name": name, "arch_kwargs": None,
                                                    "arch_kwargs_requiring_import": None}


def test_an_nnssl_resenc_gives_its_stride_16_feature_map_as_tokens_with_its_preprocessing(tmp_path):
    """The feature map of stage 4 (stride 16) of dna's network with the checkpoint's weights, voxel for token, in the
    probe's and the embeddings' own functions."""
    from nnunetv2_hiendmae.probe import token_grid
    from pretrain.embed import embed_volume

    path, network = write_resenc_checkpoint(tmp_path / "c.pth")
    trained = load_trained_encoder(path)
    encoder = trained.encoder
    assert (encoder.token_size, encoder.embed_dim) == ((16, 16, 16), 12)
    x = torch.randn(2, 1, 32, 48, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        skips = network.encoder(x)  # the feature maps of the 6 stages, as ResidualEncoderUNet's encoder returns them
        expected = skips[4]  # [2, 12, 2, 3, 4]
        torch.testing.assert_close(token_grid(encoder, x), expected)
        _, maps = encoder(x)  # the maps of the stages up to the one read
    assert len(maps) == 5
    for m, skip in zip(maps, skips):
        torch.testing.assert_close(m, skip)
    with torch.no_grad():
        tokens, cls = embed_volume(encoder, x[0], [32, 48, 64], 0.5, 1)
    torch.testing.assert_close(tokens, expected[0])
    torch.testing.assert_close(cls, expected[0].mean((1, 2, 3)))  # no CLS: global average pooling
    s = trained.settings
    assert (s.spacing, s.transpose_forward, s.normalization_schemes, s.use_mask_for_norm, s.patch_size) == \
        (SPACING, TRANSPOSE, ["ZScoreNormalization"], [False], PATCH)
    assert trained.description == "ResidualEncoderUNet encoder pretrained with nnssl NonResEncL_BaseMAETrainer_Test"
    assert trained.notes[0].endswith("patch [32, 32, 32]; features: the feature map of stage 4 of 6 (stride "
                                     "16x16x16, 12 channels); not read: decoder")


def test_an_nnssl_resenc_of_two_channels_reads_as_an_encoder_of_two_channels(tmp_path):
    """A ResEnc pretrained on two channels (CT and PET, say): the encoder read takes two channels, as its stem's
    weights do, and gives the feature map of stage 4 of dna's network with the checkpoint's weights."""
    from nnunetv2_hiendmae.probe import token_grid

    torch.manual_seed(0)
    network = resenc_network(RESENC, channels=2).eval()
    plan = resenc_plan(EXPLICIT_RESENC)
    configuration = plan["pretrain_plan"]["configurations"]["onemmiso"]
    configuration.update(normalization_schemes=["ZScoreNormalization"] * 2, use_mask_for_norm=[False] * 2)
    plan["pretrain_num_input_channels"] = 2
    torch.save({"network_weights": network.state_dict(), "current_epoch": 3, "trainer_name":
                "NonResEncL_BaseMAETrainer_Test", "nnssl_adaptation_plan": plan}, tmp_path / "c.pth")
    trained = load_trained_encoder(tmp_path / "c.pth")
    assert trained.encoder.in_channels == 2 and trained.settings.normalization_schemes == ["ZScoreNormalization"] * 2
    x = torch.randn(1, 2, 32, 48, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(token_grid(trained.encoder, x), network.encoder(x)[4])


@pytest.mark.parametrize("name", ["ResEncL", "NoSkipResEncL"])
def test_the_named_resenc_l_is_nnssls_resenc_l_encoder(name):
    """nnssl's ResEnc-L checkpoint (its BaseMAETrainer's plan, named ``ResEncL``; ``NoSkipResEncL``'s encoder is the
    same): every ``encoder.`` weight is read and fits our encoder key for key, shape for shape; the decoder is not
    read. Built on the meta device: the layout is checked without allocating ResEnc-L's 100 M parameters."""
    ckpt = {"trainer_name": "BaseMAETrainer", "nnssl_adaptation_plan": resenc_plan(
        {"arch_class_name": name, "arch_kwargs": None, "arch_kwargs_requiring_import": None})}
    with torch.device("meta"):
        network = resenc_network(RESENC_L)
        weights = ckpt["network_weights"] = network.state_dict()
        ours = nnssl.from_nnssl(ckpt, "", cnn=True)
        encoder = build_encoder(ours["encoder"])
    # the same modules with the same settings (norm eps and affine, nonlinearity, kernels, strides), not only shapes
    assert (repr(encoder.stem), repr(encoder.stages)) == (repr(network.encoder.stem), repr(network.encoder.stages))
    assert {k: v.shape for k, v in ours["weights"].items()} == \
        {k: v.shape for k, v in weights.items() if k.startswith("encoder.")}
    assert {k: v.shape for k, v in encoder.state_dict().items()} == \
        {k.removeprefix("encoder."): v.shape for k, v in ours["weights"].items()}
    assert (encoder.feature_stage, encoder.token_size, encoder.embed_dim) == (4, (16, 16, 16), 320)
    assert ours["pretrain"]["nnssl_unread"] == ["decoder"]
    with pytest.raises(UserError, match=rf"holds a {name} \(a CNN\): fine-tuning here takes the Primus family .*"
                                        "nnUNetv2_hiendmae_probe and _embed read a ResEnc's feature maps"):
        nnssl.from_nnssl(ckpt, "")  # as plan, study and export read it


def test_the_feature_stage_is_the_one_whose_stride_is_closest_to_16():
    """Total strides per axis from every form of ResidualEncoder's ``strides`` (one int, an int per stage, a triple
    per stage); the stage by the geometric mean of its stride on a log scale, the deeper of two as close."""
    assert total_strides(2, 3) == [(2, 2, 2), (4, 4, 4), (8, 8, 8)]
    assert total_strides([1, 2, 2, 2, 2, 2], 6)[4] == (16, 16, 16)
    assert total_strides([[1, 1, 1], [1, 2, 3], [2, 2, 1]], 3) == [(1, 1, 1), (1, 2, 3), (2, 4, 3)]
    assert feature_stage(RESENC["strides"], 6) == 4
    # stage 3 is (4, 8, 8), mean 6.3; stage 4 (8, 16, 16), mean 12.7; stage 5 (16, 32, 32), mean 25.4
    assert feature_stage([[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]], 6) == 4
    assert feature_stage([1, 2, 2, 2, 4], 5) == 4  # strides 8 and 32 are as close to 16: the deeper


def test_a_resenc_names_only_torch_nn_and_dna_module_classes_and_an_existing_stage():
    from dynamic_network_architectures.building_blocks.residual import BottleneckD

    resolved = resolve_classes({"block": "dynamic_network_architectures.building_blocks.residual.BottleneckD",
                                "nonlin": nn.GELU, "dropout_op": None, "n_stages": 2})
    assert resolved == {"block": BottleneckD, "nonlin": nn.GELU, "dropout_op": None, "n_stages": 2}
    for name in ("torch.nn.parameter.Parameter", "torch.nn.functional.relu", "torch.nn.NoSuchModule"):
        with pytest.raises(ValueError, match="is not a torch.nn or dynamic-network-architectures module class"):
            resolve_classes({"nonlin": name})
    kwargs = {k: v for k, v in RESENC.items() if k != "n_conv_per_stage_decoder"}
    assert ResEncFeatures(1, kwargs, 5).embed_dim == 14
    for stage in (-1, 6):
        with pytest.raises(ValueError, match=f"feature_stage {stage} of an encoder with 6 stages"):
            ResEncFeatures(1, kwargs, stage)


def test_resenc_plans_that_do_not_give_the_encoder_read_are_refused():
    """Arguments ResidualEncoder does not take, no strides, a pretraining patch that is not whole feature-map voxels;
    and, for fine-tuning (without ``cnn``), an explicit ResidualEncoderUNet is refused as ResEnc-L is."""
    weights = resenc_network(RESENC).state_dict()
    with_decoder = {**RESENC, "num_classes": 3, "deep_supervision": True}  # the decoder's arguments are left out
    plan = resenc_plan({**EXPLICIT_RESENC, "arch_kwargs": with_decoder})
    read = nnssl.from_nnssl({"network_weights": weights, "nnssl_adaptation_plan": plan}, "", cnn=True)
    assert read["encoder"]["encoder_kwargs"] == {k: v for k, v in RESENC.items() if k != "n_conv_per_stage_decoder"}
    cases = [({**RESENC, "pool": "max"}, {}, "ResidualEncoder does not take: pool"),
             ({k: v for k, v in RESENC.items() if k != "strides"}, {}, "without strides and n_stages"),
             (RESENC, {"pretrain_patch_size": [48, 40, 32]},
              "pretraining patch [48, 40, 32] is not a multiple of the stride [16, 16, 16] of the feature map read "
              "(stage 4)")]
    for kwargs, changes, needle in cases:
        plan = {**resenc_plan({**EXPLICIT_RESENC, "arch_kwargs": kwargs}), **changes}
        with pytest.raises(UserError, match=re.escape(needle)):
            nnssl.from_nnssl({"network_weights": weights, "nnssl_adaptation_plan": plan}, "", cnn=True)
    with pytest.raises(UserError, match=r"holds a ResidualEncoderUNet \(a CNN\): fine-tuning here takes the Primus"):
        nnssl.from_nnssl({"network_weights": weights, "nnssl_adaptation_plan": resenc_plan(EXPLICIT_RESENC)}, "")


def test_plan_gives_every_channel_the_nnssl_pretrainings_normalisation_and_mask_rule():
    """Channel for channel where the pretraining had as many, else its first channel's for every channel; the
    dataset's own schemes and mask rule are not kept."""
    ds = SimpleNamespace(num_channels=2, base_cfg={"normalization_schemes": ["CTNormalization"] * 2,
                                                   "use_mask_for_norm": [False, False]},
                         base={"foreground_intensity_properties_per_channel": {"0": {"mean": 1.5}, "1": {"mean": 2.5}}})
    for schemes, masks, expected in (
            (["ZScoreNormalization", "NoNormalization"], [True, False],
             (["ZScoreNormalization", "NoNormalization"], [True, False])),
            (["NoNormalization"], [True], (["NoNormalization"] * 2, [True, True]))):
        pretrain = {"source": "nnssl", "normalization_schemes": schemes, "use_mask_for_norm": masks,
                    "foreground_intensity_properties_per_channel": {str(c): {} for c in range(len(schemes))}}
        assert normalisation(ds, pretrain, Path("c.pth"), [])[:2] == expected


def test_ddp_and_compile_prefixes_are_removed_from_the_weights():
    network = EvaMAELayout()
    ckpt = {"network_weights": {f"module._orig_mod.{k}": v for k, v in network.state_dict().items()},
            "nnssl_adaptation_plan": adaptation_plan()}
    weights = nnssl.from_nnssl(ckpt)["weights"]
    expected = {f"encoder.{k}": v for k, v in network.state_dict().items()
                if k.startswith(("down_projection.", "eva."))}
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], v) for k, v in expected.items())


def test_list_valued_init_values_are_read_as_their_first_value():
    """nnU-Net master's PretrainedTrainer_Primusx takes ``init_values[0]`` of a list."""
    arch = {"arch_class_name": "PrimusX", "arch_kwargs": {**TINY, "patch_embed_size": [8, 8, 8],
                                                          "scale_attn_inner": True, "init_values": [0.25, 0.5]}}
    assert nnssl._primus_dimensions(adaptation_plan(arch), "")[1]["init_values"] == 0.25


def test_a_pretraining_patch_that_is_not_whole_tokens_is_refused():
    """36 x 32 x 32 voxels give 4 x 4 x 4 tokens of 8 when rounded down: as many as eva.pos_embed has rows."""
    ckpt = {"network_weights": EvaMAELayout().state_dict(),
            "nnssl_adaptation_plan": adaptation_plan(pretrain_patch_size=[36, 32, 32])}
    with pytest.raises(UserError, match=r"pretraining patch \[36, 32, 32\]"):
        nnssl.from_nnssl(ckpt)


@pytest.mark.parametrize("schemes", [["NoNormalization"], ["ZScoreNormalization"]])
def test_the_mask_rule_and_normalisation_of_the_pretrain_plan_are_read(schemes):
    """NoNormalization needs no intensity statistics (as Z-score); ``use_mask_for_norm`` is the plan's, not False."""
    plan = adaptation_plan()
    config = plan["pretrain_plan"]["configurations"]["onemmiso"]
    config.update(normalization_schemes=schemes, use_mask_for_norm=[True])
    pretrain = nnssl.from_nnssl({"network_weights": EvaMAELayout().state_dict(), "nnssl_adaptation_plan": plan})[
        "pretrain"]
    assert (pretrain["normalization_schemes"], pretrain["use_mask_for_norm"]) == (schemes, [True])


def test_a_primus_m_with_another_layerscale_is_not_written_as_primus_m():
    """nnU-Net master builds a named preset with LayerScale 0.1: another init_values must travel as PrimusX."""
    for init in (0.1, 0.2, None):
        config = {**encoder_config("primus_m", pos_embed_grid=[4, 4, 4]), "init_values": init}
        arch = nnssl.architecture_plans(config)
        assert arch["arch_class_name"] == ("PrimusM" if init == 0.1 else "PrimusX"), init
        assert (arch["arch_kwargs"] or {}).get("init_values") == (None if init == 0.1 else init)


def test_unreadable_nnssl_checkpoints_are_one_line_errors(tmp_path, capsys):
    cases = {
        "plainconv": (adaptation_plan({"arch_class_name": "PlainConvUNet", "arch_kwargs": RESENC}),
                      "holds a PlainConvUNet (a CNN): it is not read"),
        "resenc_without_stem": (resenc_plan(EXPLICIT_RESENC), "no ResEnc stem (encoder.stem.convs.0.conv.weight)"),
        # a module class, but none that the plan may name: only torch.nn and dna classes are looked up
        "resenc_foreign_class": (resenc_plan({**EXPLICIT_RESENC, "arch_kwargs": {
            **RESENC, "nonlin": "nnunetv2_hiendmae.vit.ViTEncoder3D"}}),
            "nonlin 'nnunetv2_hiendmae.vit.ViTEncoder3D' is not a torch.nn or dynamic-network-architectures module"),
        "no_attn_norm": (adaptation_plan({"arch_class_name": "PrimusX", "arch_kwargs": {
            **TINY, "patch_embed_size": [8, 8, 8], "scale_attn_inner": False, "init_values": 0.1}}),
            "without scale_attn_inner"),
        "wrong_prefix": (adaptation_plan(key_to_encoder="encoder.eva"), "no Primus stem"),
        "wrong_patch": (adaptation_plan(pretrain_patch_size=[32, 32, 64]), "eva.pos_embed has 64 rows"),
        "no_keys": ({k: v for k, v in adaptation_plan().items() if k != "key_to_stem"}, "has no key_to_stem"),
    }
    out = tmp_path / "out"
    for name, (plan, needle) in cases.items():
        path, _ = write_nnssl_checkpoint(tmp_path / f"{name}.pth", plan=plan)
        code, err, _ = cli_error(embed_cli.main, ["-pt", str(path), "-d", "990", "-o", str(out)], capsys)
        assert code == 2 and len(err) == 1 and needle in err[0], (name, err)
        assert not out.exists()


# ---------------------------------------------------------------------------------------- probe, embed, plan

def test_probe_and_embed_take_an_nnssl_checkpoint_and_say_the_guard_cannot_check(preprocessed_dataset, nnssl_ckpt,
                                                                                tmp_path, capsys):
    path, network = nnssl_ckpt
    out = tmp_path / "probe"
    probe_cli.main(["-d", "990", "-pt", str(path), "-o", str(out), "-device", "cpu", "--max-cases", "2",
                    "--crops-per-case", "2"])
    said = capsys.readouterr().out
    assert f"note: {path}: nnssl checkpoint (BaseEvaMAETrainer, pretrain_plan nnsslPlans/onemmiso" in said
    guard = "nnssl records no list of its pretraining cases (this checkpoint names only its pretraining dataset, " \
            "Dataset745_OpenMind)"
    assert guard in said and guard in (out / "probe.md").read_text()
    row = next(csv.DictReader((out / "probe.csv").open()))
    assert (row["method"], row["epochs"], row["patch size"]) == ("nnssl BaseEvaMAETrainer", "7", "32x32x32")

    embedded = tmp_path / "embed"
    embed_cli.main(["-pt", str(path), "-d", "990", "-o", str(embedded), "--tokens", "-np", "0"])
    assert "note: nnssl checkpoint (BaseEvaMAETrainer" in capsys.readouterr().out
    with np.load(embedded / "case_000.npz") as z:
        tokens, mean = z["tokens"], z["mean"]
    assert tokens.shape[0] == 48 and mean.shape == (48,) and np.isfinite(tokens).all()


def test_probe_and_embed_take_an_nnssl_resenc_and_plan_refuses_it(preprocessed_dataset, tmp_path, capsys):
    path, _ = write_resenc_checkpoint(tmp_path / "resenc.pth")
    out = tmp_path / "probe"
    probe_cli.main(["-d", "990", "-pt", str(path), "-o", str(out), "-device", "cpu", "--max-cases", "2",
                    "--crops-per-case", "2"])
    assert "features: the feature map of stage 4 of 6 (stride 16x16x16, 12 channels); not read: decoder" in \
        capsys.readouterr().out
    row = next(csv.DictReader((out / "probe.csv").open()))
    assert (row["method"], row["epochs"], row["patch size"]) == ("nnssl NonResEncL_BaseMAETrainer_Test", "3",
                                                                  "32x32x32")
    assert 0 <= float(row["mean fg Dice"]) <= 1

    embedded = tmp_path / "embed"
    embed_cli.main(["-pt", str(path), "-d", "990", "-o", str(embedded), "--tokens", "-np", "0"])
    with np.load(embedded / "case_000.npz") as z:
        tokens, mean, cls = z["tokens"], z["mean"], z["cls"]
    assert tokens.shape[0] == 12 and mean.shape == cls.shape == (12,) and np.isfinite(tokens).all()

    code, err, _ = cli_error(plan_main, ["-d", "990", "-pt", str(path), "-o", "T_resenc"], capsys)
    assert code == 2 and len(err) == 1 and "holds a ResidualEncoderUNet (a CNN)" in err[0]
    assert "nnUNetv2_hiendmae_probe and _embed read a ResEnc's feature maps" in err[0]
    assert not (preprocessed_dataset["preprocessed"] / "T_resenc.json").exists()


def test_plan_takes_the_mask_rule_of_the_pretrain_plan(preprocessed_dataset, tmp_path):
    plan = adaptation_plan()
    plan["pretrain_plan"]["configurations"]["onemmiso"]["use_mask_for_norm"] = [True]
    path, _ = write_nnssl_checkpoint(tmp_path / "masked.pth", plan=plan)
    args = parser().parse_args(["-d", "990", "-pt", str(path), "-o", "T_nnssl_mask"])
    assert build_plan(args).plans["configurations"]["3d_fullres"]["use_mask_for_norm"] == [True]
    dataset = json.loads((preprocessed_dataset["preprocessed"] / "nnUNetPlans.json").read_text())
    assert dataset["configurations"]["3d_fullres"]["use_mask_for_norm"] == [False]  # so it is the checkpoint's


def test_plan_follows_the_pretrain_plan(preprocessed_dataset, nnssl_ckpt):
    path, _ = nnssl_ckpt
    plan = build_plan(parser().parse_args(["-d", "990", "-pt", str(path), "-o", "T_nnssl_plan"]))
    cfg = plan.plans["configurations"]["3d_fullres"]
    tf = plan.dataset.base["transpose_forward"]
    assert cfg["spacing"] == to_dataset_axes(SPACING, TRANSPOSE, tf)
    assert cfg["normalization_schemes"] == ["ZScoreNormalization"] and cfg["use_mask_for_norm"] == [False]
    assert cfg["architecture"]["network_class_name"] == "nnunetv2_hiendmae.primus_network.PrimusNetwork"
    assert cfg["architecture"]["arch_kwargs"]["encoder"]["pos_embed_grid"] == [4, 4, 4]
    info = plan.plans["pretrain_info"]
    assert (info["arch"], info["method"], info["checkpoint"]) == ("PrimusX", "nnssl BaseEvaMAETrainer", str(path))
    assert any(n.startswith("nnssl checkpoint (BaseEvaMAETrainer") for n in plan.notes)
    assert any(n.startswith("nnssl records no list") for n in plan.notes)
    assert not any("records no content fingerprints" in n for n in plan.notes)  # the nnssl note, not both
    assert any("ZScoreNormalization on every channel" in n for n in plan.notes)


# ------------------------------------------------------------------------------------------------------- export

def primus_checkpoint(path, schemes=("CTNormalization",)):
    """A primus_tiny checkpoint of ours (pretraining patch 32^3) with moved-off weights."""
    from nnunetv2_hiendmae.presets import ct_window_statistics

    config = encoder_config("primus_tiny", 1, pos_embed_grid=[4, 4, 4])
    torch.manual_seed(3)
    encoder = build_encoder(config)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pretrain = {"datasets": ["Dataset990_HiEndTest"], "plans": "nnUNetPlans", "configuration": "3d_fullres",
                "spacing": [1.5, 2.0, 2.5], "transpose_forward": [1, 2, 0], "normalization_schemes": list(schemes),
                "use_mask_for_norm": [False],
                "foreground_intensity_properties_per_channel": {"0": ct_window_statistics(-175, 250)},
                "patch_size": PATCH}
    weights = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    save_atomic(make_checkpoint(weights, config, {}, pretrain, method="mae"), path)
    return path, encoder


@pytest.mark.parametrize("kind", ["vit", "nnssl"])
def test_pretrained_weights_export_loads_through_nnunet_2_8_1(kind, preprocessed_dataset, nnssl_ckpt, tmp_path,
                                                             capsys):
    """Every key of our network, checked by nnU-Net 2.8.1's own load_pretrained_weights, then compared: everything
    but the segmentation head (``.seg_layers.``: the ViT's 1x1x1 convolution, Primus's whole decoder; nnU-Net never
    transfers it) is the file's, the encoder the checkpoint's. The network is built with another seed, so a key left
    out would show."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    folder = preprocessed_dataset["preprocessed"]
    # seed 7: not the export's default seed 0, which would draw the same ViT as the checkpoint's
    ckpt = nnssl_ckpt[0] if kind == "nnssl" else write_checkpoint(tmp_path / "vit.pth", folder, seed=7)
    patch = PATCH if kind == "nnssl" else [32, 64, 64]
    name = f"T_export_{kind}"
    plan_main(["-d", "990", "-pt", str(ckpt), "-o", name, "--patch-size", *map(str, patch), "--spacing", "dataset",
               "--normalization", "dataset"])
    out = tmp_path / "weights.pth"
    export.main(["-pt", str(ckpt), "--format", "pretrained_weights", "-d", "990", "-p", name, "-o", str(out)])
    assert f"-tr nnUNetTrainerHiEndMAE_scratch -pretrained_weights {out}" in capsys.readouterr().out
    network, _ = export.network_for_plans("990", name, "3d_fullres", seed=123)  # another decoder init
    head = {k: v.clone() for k, v in network.state_dict().items() if ".seg_layers." in k}  # Primus: its decoder
    load_pretrained_weights(network, str(out))
    saved = torch.load(out, weights_only=True)["network_weights"]
    state = network.state_dict()
    assert state.keys() == saved.keys()
    for key, value in state.items():  # the segmentation head stays the network's own (nnU-Net's rule)
        assert torch.equal(value, head[key] if key in head else saved[key]), key
    source = load_checkpoint(ckpt)
    for key, value in network.encoder.state_dict().items():
        assert torch.equal(value, source["weights"][f"encoder.{key}"]), key


def test_nnssl_export_meets_nnssls_and_nnunet_masters_contract(tmp_path, capsys):
    """Field by field what nnU-Net master's like_nnssl.preprocess_like_nnssl and PretrainedTrainer(_Primusx) read,
    with nnssl's AdaptationPlan types; the weights are dna Primus's, the encoder ours; and we read it back."""
    ckpt, encoder = primus_checkpoint(tmp_path / "ours.pth")
    out = tmp_path / "exports" / "nnssl.pth"  # its folder is created
    export.main(["-pt", str(ckpt), "--format", "nnssl", "-o", str(out)])
    said = capsys.readouterr()
    assert "pretrained with CTNormalization normalisation, but nnU-Net master's" in said.err
    saved = torch.load(out, weights_only=True)
    plan = saved["nnssl_adaptation_plan"]
    assert set(plan) == {"architecture_plans", "pretrain_plan", "pretrain_num_input_channels",
                         "recommended_downstream_patchsize", "key_to_encoder", "key_to_stem", "keys_to_in_proj",
                         "key_to_lpe"}  # AdaptationPlan's fields
    assert plan["architecture_plans"] == {"arch_class_name": "PrimusX", "arch_kwargs": {
        "embed_dim": 48, "patch_embed_size": [8, 8, 8], "encoder_eva_depth": 4, "encoder_eva_numheads": 4,
        "scale_attn_inner": True, "init_values": 0.1}, "arch_kwargs_requiring_import": []}
    assert (plan["key_to_encoder"], plan["key_to_stem"], plan["keys_to_in_proj"], plan["key_to_lpe"]) == \
        ("eva", "down_projection", ["down_projection.proj"], "eva.pos_embed")
    assert plan["pretrain_num_input_channels"] == 1 and plan["recommended_downstream_patchsize"] == PATCH
    pre = plan["pretrain_plan"]
    assert set(pre) == {"dataset_name", "plans_name", "original_median_spacing_after_transp", "image_reader_writer",
                        "transpose_forward", "transpose_backward", "configurations", "experiment_planner_used"}
    assert (pre["transpose_forward"], pre["transpose_backward"]) == ([1, 2, 0], [2, 0, 1])
    first = list(pre["configurations"].values())[0]  # what preprocess_like_nnssl takes
    assert set(first) == {"data_identifier", "preprocessor_name", "spacing_style", "normalization_schemes",
                          "use_mask_for_norm", "resampling_fn_data", "resampling_fn_data_kwargs",
                          "resampling_fn_mask", "resampling_fn_mask_kwargs", "spacing", "patch_size"}
    assert (first["spacing"], first["patch_size"], first["normalization_schemes"]) == \
        ([1.5, 2.0, 2.5], PATCH, ["CTNormalization"])
    assert first["spacing_style"] in ("onemmiso", "median", "noresample")
    # the weights: dna's Primus at the pretraining patch, key for key and shape for shape
    reference = Primus(1, 48, (8, 8, 8), 1, eva_depth=4, eva_numheads=4, input_shape=tuple(PATCH), init_values=0.1,
                       scale_attn_inner=True).state_dict()
    weights = saved["network_weights"]
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    for key, value in encoder.state_dict().items():
        assert torch.equal(weights[key], value), key
    assert not weights["mask_token"].any()
    # our reader takes our writer's file: the same encoder, the same preprocessing
    back = load_checkpoint(out)
    assert back["encoder"]["pos_embed_grid"] == [4, 4, 4] and back["pretrain"]["spacing"] == [1.5, 2.0, 2.5]
    assert back["pretrain"]["foreground_intensity_properties_per_channel"]["0"]["percentile_99_5"] == 250
    for key, value in encoder.state_dict().items():
        assert torch.equal(back["weights"][f"encoder.{key}"], value), key


def test_the_nnssl_export_is_seeded_and_takes_no_plans(tmp_path, capsys):
    """--seed draws Primus's decoder (up_projection), which the checkpoint does not hold: two seeds, two decoders and
    one encoder; a seed again, the same file. -d/-p belong to the other format: refused, nothing written."""
    ckpt, _ = primus_checkpoint(tmp_path / "ours.pth")
    files = {}
    for name, seed in (("a", 0), ("b", 1), ("c", 0)):
        export.main(["-pt", str(ckpt), "--format", "nnssl", "--seed", str(seed), "-o", str(tmp_path / f"{name}.pth")])
        files[name] = torch.load(tmp_path / f"{name}.pth", weights_only=True)["network_weights"]
    capsys.readouterr()
    decoder = [k for k in files["a"] if k.startswith("up_projection.")]
    assert decoder and all(torch.equal(files["a"][k], files["c"][k]) for k in files["a"])
    assert not all(torch.equal(files["a"][k], files["b"][k]) for k in decoder)
    assert all(torch.equal(files["a"][k], files["b"][k]) for k in files["a"] if not k.startswith("up_projection."))
    for extra in (["-d", "990"], ["-p", "SomePlans"]):
        out = tmp_path / "refused.pth"
        code, err, _ = cli_error(export.main, ["-pt", str(ckpt), "--format", "nnssl", *extra, "-o", str(out)], capsys)
        assert code == 2 and "-d/-p are for --format pretrained_weights" in err[0] and not out.exists(), extra


def test_a_plain_vit_has_no_nnssl_export(preprocessed_dataset, tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "vit.pth", preprocessed_dataset["preprocessed"])
    out = tmp_path / "nnssl.pth"
    code, err, _ = cli_error(export.main, ["-pt", str(ckpt), "--format", "nnssl", "-o", str(out)], capsys)
    assert code == 2 and len(err) == 1 and "CLS token and final norm at random" in err[0] and not out.exists()
    code, err, _ = cli_error(export.main, ["-pt", str(ckpt), "--format", "pretrained_weights", "-o", str(out)],
                             capsys)
    assert code == 2 and "needs -d DATASET and -p PLANS" in err[0] and not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("nnunetv2.training.nnUNetTrainer.pretraining") is None,
                    reason="nnU-Net's pretrained fine-tuning (nnunetv2.training.nnUNetTrainer.pretraining) is on its "
                           "master branch only, in no release up to 2.8.1")
def test_nnunet_masters_pretrained_loader_takes_the_nnssl_export(tmp_path):
    from nnunetv2.training.nnUNetTrainer.pretraining.pretrainedTrainer import PretrainedTrainer

    ckpt, encoder = primus_checkpoint(tmp_path / "ours.pth", schemes=("ZScoreNormalization",))
    out = tmp_path / "nnssl.pth"
    export.main(["-pt", str(ckpt), "--format", "nnssl", "-o", str(out)])
    network = Primus(1, 48, (8, 8, 8), 3, eva_depth=4, eva_numheads=4, input_shape=tuple(PATCH), init_values=0.1,
                     scale_attn_inner=True)
    plan = torch.load(out, weights_only=True)["nnssl_adaptation_plan"]
    result = PretrainedTrainer.load_pretrained_weights(network, str(out), 1, 1, PATCH, PATCH, plan["key_to_encoder"],
                                                       plan["key_to_stem"], plan["keys_to_in_proj"],
                                                       plan["key_to_lpe"])
    network = result[0] if isinstance(result, tuple) else network
    for key, value in encoder.state_dict().items():
        assert torch.equal(network.state_dict()[key], value), key


# ------------------------------------------------------------------------------------------------------- study

@pytest.mark.slow
def test_a_smoke_study_fine_tunes_an_nnssl_checkpoint(preprocessed_dataset, nnssl_ckpt, tmp_path):
    """The study writes the plans (subprocess nnUNetv2_hiendmae_plan) and trains one frozen run through the real
    nnUNetv2_train: its final encoder is the nnssl checkpoint's, bit for bit."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_hiendmae import study as st
    from nnunetv2_hiendmae.trainers import nnUNetTrainerHiEndMAE_frozen_smoke
    from nnunetv2_hiendmae.weights import load_pretrained_encoder

    path, _ = nnssl_ckpt
    out = tmp_path / "study"
    args = ["-d", "990", "-pt", str(path), "-p", "T_nnssl_study", "-f", "1", "--budgets", "100", "--arms", "frozen",
            "--schedule", "smoke", "-device", "cpu", "-o", str(out)]
    run_cli("nnUNetv2_hiendmae_study", *args, env=TRAIN_ENV, check=True, timeout=1200)
    study = st.setup(st.build_parser().parse_args(args))
    plans = json.loads((preprocessed_dataset["preprocessed"] / "T_nnssl_study.json").read_text())
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["ZScoreNormalization"]
    manager = PlansManager(plans)
    network = nnUNetTrainerHiEndMAE_frozen_smoke.build_network_architecture(
        manager, manager.get_configuration("3d_fullres"), 1, 4, False)
    load_pretrained_encoder(network, load_checkpoint(path))
    final = study.fold_dir(study.runs[0]) / "checkpoint_final.pth"
    weights = torch.load(final, weights_only=False)["network_weights"]
    for key, value in network.encoder.state_dict().items():
        assert torch.equal(weights[key], value), key
    assert math.isfinite(float(next(csv.DictReader((out / "study_dice.csv").open()))["mean fg Dice"]))
