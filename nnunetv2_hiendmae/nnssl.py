"""nnssl's checkpoints read as ours, and a Primus checkpoint of ours written in nnssl's format.

**nnssl's format** (MIC-DKFZ/nnssl, ``src/nnssl/training/nnsslTrainer/AbstractTrainer.py``, ``save_checkpoint``): a
``torch.save`` dict with ``network_weights`` (the whole pretraining network's state dict) and
``nnssl_adaptation_plan`` (``AdaptationPlan.serialize()``, ``src/nnssl/adaptation_planning/adaptation_plan.py``);
besides them, optional ``trainer_name``, ``init_args``, ``current_epoch`` and, in newer releases, ``citations``. The
adaptation plan holds ``architecture_plans`` (``arch_class_name``: ``PrimusS/B/M/L``, ``ResEncL``, ...;
``arch_kwargs``), ``pretrain_plan`` (nnssl's ``Plan``, ``src/nnssl/experiment_planning/experiment_planners/plan.py``:
``transpose_forward`` and ``configurations``, each with ``spacing``, ``patch_size``, ``normalization_schemes``,
``use_mask_for_norm`` and the resampling functions), ``pretrain_num_input_channels``,
``recommended_downstream_patchsize``, ``key_to_encoder``, ``key_to_stem``, ``keys_to_in_proj`` and ``key_to_lpe``
(state-dict prefixes). nnU-Net master reads the same fields (``nnunetv2/experiment_planning/like_nnssl.py``,
``nnunetv2/training/nnUNetTrainer/pretraining/pretrainedTrainer.py``) and additionally a ``pretrain_patch_size``
inside the plan, which overrides the pretraining patch.

**Reading** (:func:`from_nnssl`): a Primus checkpoint (a named preset, ``PrimusS/B/M/L`` as dynamic-network-
architectures defines them, or explicit Primus arguments as nnU-Net master's ``PretrainedTrainer_Primusx`` reads them)
becomes a checkpoint dict in our layout (:mod:`nnunetv2_hiendmae.checkpoint`), in memory: the encoder weights
(``down_projection.*`` and ``eva.*`` under the plan's prefixes) are the :class:`~nnunetv2_hiendmae.primus.PrimusEncoder`
state dict unchanged, and the ``pretrain`` block is the pretraining plan's preprocessing. nnssl is not imported: it is
read as plain data. A ResEnc checkpoint (``ResEncL``/``NoSkipResEncL``, nnssl's ``architecture_registry.py``, or a
``ResidualEncoderUNet`` with explicit ``DynamicArchitecturePlans`` arguments) is read the same way for the commands
that only run the encoder (``cnn=True``: the probe and the embeddings), its weights (``stem.*``, ``stages.*`` under
the plan's prefixes) those of :class:`~nnunetv2_hiendmae.resenc.ResEncFeatures`; fine-tuning, which builds a ViT or
Primus network, refuses it in one line, as it refuses every other CNN.

**Writing** (:func:`to_nnssl`): a Primus checkpoint (ours, or one read from nnssl) becomes the full
``Primus`` state dict (encoder from the checkpoint, the decoder ``up_projection`` freshly initialised, the
``mask_token`` buffer zero) and an adaptation plan with every field above, which nnU-Net master's
``nnUNetv2_preprocess_like_nnssl`` and ``PretrainedTrainer_Primusx`` read without this plugin. A plain-ViT checkpoint
has no such form (:data:`VIT_REFUSAL`).
"""
from __future__ import annotations

import inspect
import math
import os
from collections.abc import Sequence

import torch

from nnunetv2_hiendmae.checkpoint import encoder_state_dict, make_checkpoint
from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.leakage import pretraining_datasets
from nnunetv2_hiendmae.presets import ENCODERS, PRESETS, encoder_kind, token_size_3d
from nnunetv2_hiendmae.resenc import RESENC_L, resenc_config, resolve_classes, total_strides

KEYS = ("network_weights", "nnssl_adaptation_plan")  # what makes a torch file an nnssl checkpoint
# nnssl's named Primus presets (ArchitecturePlans.arch_class_name) and ours of the same dimensions (dynamic-network-
# architectures' _PRIMUS_CONFIGS, 8^3 tokens, LayerScale 0.1, scaled inner attention: its PrimusS/B/M/L defaults)
NAMED_PRIMUS = {"PrimusS": "primus_s", "PrimusB": "primus_b", "PrimusM": "primus_m", "PrimusL": "primus_l"}
NAMED_INIT_VALUES = 0.1
# the explicit-arguments Primus as nnU-Net master's PretrainedTrainer_Primusx.build_network_architecture reads it
EXPLICIT_PRIMUS = "PrimusX"
EXPLICIT_KWARGS = ("embed_dim", "patch_embed_size", "encoder_eva_depth", "encoder_eva_numheads", "scale_attn_inner",
                   "init_values")
# nnssl's ResEnc encoders: by name (get_res_enc_l and get_noskip_res_enc_l build the same encoder), or
# ResidualEncoderUNet with DynamicArchitecturePlans' arguments (adaptation_plan.py), of which these are the decoder's
NAMED_RESENC = {"ResEncL": RESENC_L, "NoSkipResEncL": RESENC_L}
EXPLICIT_RESENC = "ResidualEncoderUNet"
RESENC_CLASSES = (*NAMED_RESENC, EXPLICIT_RESENC)
DECODER_KWARGS = ("n_conv_per_stage_decoder", "num_classes", "deep_supervision")
RESENC_STEM_WEIGHT = "stem.convs.0.conv.weight"
CNN_CLASSES = (*RESENC_CLASSES, "PlainConvUNet")
MLP_RATIO = 8 / 3  # Primus's SwiGLU hidden size (dynamic-network-architectures' default mlp_ratio 4 * 2 / 3)
Z_SCORE = "ZScoreNormalization"
# Primus's modules and what nnU-Net master's loader reads about them (dna primus.py: key_to_encoder etc.)
KEY_TO_ENCODER, KEY_TO_STEM, KEYS_TO_IN_PROJ, KEY_TO_LPE = "eva", "down_projection", ["down_projection.proj"], \
    "eva.pos_embed"
VIT_REFUSAL = ("a plain-ViT checkpoint has no nnssl form: nnU-Net master's nnssl loader would leave its CLS token and "
               "final norm at random on our network, so only nnunetv2_hiendmae fine-tunes it (nnUNetv2_hiendmae_plan, "
               "or --format pretrained_weights for nnU-Net's own -pretrained_weights); see docs/interop.md")


def is_nnssl_checkpoint(obj: object) -> bool:
    """Whether a loaded torch file is an nnssl checkpoint (a dict with :data:`KEYS`)."""
    return isinstance(obj, dict) and all(k in obj for k in KEYS)


def _plain(value: object) -> object:
    """The adaptation plan as plain data: nnssl's ``save_checkpoint`` turns numpy arrays into tensors
    (``AbstractTrainer._convert_numpy``), so a spacing or patch may arrive as a tensor."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _plan_entry(plan: dict, key: str, path: object):
    if key not in plan:
        raise UserError(f"nnssl checkpoint {path}: its nnssl_adaptation_plan has no {key}")
    return plan[key]


def pretrain_configuration(plan: dict, path: object = "") -> tuple[str, dict]:
    """``(name, configuration)``: the pretraining plan's first configuration, the one nnU-Net master's
    ``preprocess_like_nnssl`` reads (``spacing``, ``patch_size``, ``normalization_schemes``, ...)."""
    configs = _plan_entry(plan, "pretrain_plan", path).get("configurations") or {}
    if not isinstance(configs, dict) or not configs:
        raise UserError(f"nnssl checkpoint {path}: its pretrain_plan has no configurations")
    name = next(iter(configs))
    return name, configs[name]


def _primus_dimensions(plan: dict, path: object) -> tuple[str, dict]:
    """``(arch, {embed_dim, depth, num_heads, token_size, init_values})`` of the plan's architecture."""
    arch = _plan_entry(plan, "architecture_plans", path)
    name = arch.get("arch_class_name") if isinstance(arch, dict) else None
    kwargs = arch.get("arch_kwargs") if isinstance(arch, dict) else None
    if isinstance(kwargs, dict) and all(k in kwargs for k in EXPLICIT_KWARGS):
        if not bool(kwargs["scale_attn_inner"]):
            raise UserError(f"nnssl checkpoint {path}: a Primus without scale_attn_inner is not supported (our "
                            "Primus encoder always normalises inside attention, as nnssl's Primus trainers do)")
        init = kwargs["init_values"]
        init = init[0] if isinstance(init, (list, tuple)) else init  # as PretrainedTrainer_Primusx reads it
        return EXPLICIT_PRIMUS, {"embed_dim": int(kwargs["embed_dim"]), "depth": int(kwargs["encoder_eva_depth"]),
                                 "num_heads": int(kwargs["encoder_eva_numheads"]),
                                 "token_size": list(token_size_3d(kwargs["patch_embed_size"])),
                                 "init_values": None if init is None else float(init)}
    if name in NAMED_PRIMUS:
        preset = PRESETS[NAMED_PRIMUS[name]]
        return NAMED_PRIMUS[name], {"embed_dim": preset["embed_dim"], "depth": preset["depth"],
                                    "num_heads": preset["num_heads"], "token_size": [preset["token_size"]] * 3,
                                    "init_values": NAMED_INIT_VALUES}
    if name in CNN_CLASSES:
        refused = ("fine-tuning here takes the Primus family (PrimusS/B/M/L or explicit Primus arguments) only"
                   if name in RESENC_CLASSES else "it is not read")
        raise UserError(f"nnssl checkpoint {path} holds a {name} (a CNN): {refused}; nnUNetv2_hiendmae_probe and "
                        f"_embed read a ResEnc's feature maps ({', '.join(RESENC_CLASSES)})")
    raise UserError(f"nnssl checkpoint {path}: unknown architecture {name!r} (read: {', '.join(NAMED_PRIMUS)} or "
                    f"explicit Primus arguments {', '.join(EXPLICIT_KWARGS)})")


def _prefix(key: str) -> str:
    return key if key.endswith(".") else f"{key}."


def _encoder_weights(network: dict, plan: dict, stem_as: str, encoder_as: str,
                     path: object) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``({stem_as* | encoder_as*: tensor}, modules not read)``: the stem and the encoder under the plan's
    ``key_to_stem`` and ``key_to_encoder`` prefixes (Primus: ``down_projection`` and ``eva`` for nnssl's MAE trainers,
    ``encoder.``-prefixed for its contrastive ones; ResEnc: ``encoder.stem`` and ``encoder.stages``), renamed, with
    ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) removed; and the module name of every other key (the
    pretraining decoder, ...): its first name, or under the parent that the stem and the encoder share
    (``encoder.`` of a contrastive trainer) its first two, so that the note never names the encoder's parent."""
    stem, encoder = _prefix(_plan_entry(plan, "key_to_stem", path)), _prefix(_plan_entry(plan, "key_to_encoder", path))
    parent = os.path.commonprefix([stem, encoder]).rpartition(".")[0]  # "encoder" of encoder.eva, encoder.down_...
    weights, unread = {}, set()
    for key, value in network.items():
        key = key.removeprefix("module.").removeprefix("_orig_mod.")
        for prefix, ours in ((stem, stem_as), (encoder, encoder_as)):
            if key.startswith(prefix) and isinstance(value, torch.Tensor):
                weights[ours + key[len(prefix):]] = value
                break
        else:
            depth = parent.count(".") + 2 if parent and key.startswith(f"{parent}.") else 1
            unread.add(".".join(key.split(".")[:depth]))
    return weights, sorted(unread)


def pretrain_patch(plan: dict, path: object = "") -> list[int]:
    """The pretraining patch (voxels, the plan's transposed axes): ``pretrain_patch_size`` where nnssl's plan has one
    (nnU-Net master's loader prefers it), else the first configuration's ``patch_size``."""
    given = plan.get("pretrain_patch_size") or pretrain_configuration(plan, path)[1].get("patch_size")
    if not given:
        raise UserError(f"nnssl checkpoint {path}: its pretrain_plan records no patch_size")
    return [int(p) for p in given]


def _token_grid(tokens: int, patch: Sequence[int], token: Sequence[int], path: object) -> list[int]:
    """The learned position embedding's grid: the pretraining patch's token grid, which must have as many tokens as
    the stored embedding has rows (nnU-Net master resizes the embedding from that grid too)."""
    grid = [p // t for p, t in zip(patch, token)]
    if math.prod(grid) != tokens or any(p % t for p, t in zip(patch, token)):
        raise UserError(f"nnssl checkpoint {path}: eva.pos_embed has {tokens} rows, but the pretraining patch "
                        f"{list(patch)} has {math.prod(grid)} tokens of {list(token)}")
    return grid


def _pretrain_block(ckpt: dict, plan: dict, channels: int, patch: list[int], unread: list[str], path: object) -> dict:
    """Our checkpoint's ``pretrain`` block from nnssl's pretraining plan (module docstring); ``unread``: the modules of
    ``network_weights`` that are not the encoder's, for the note."""
    name, config = pretrain_configuration(plan, path)
    pretrain_plan = plan["pretrain_plan"]
    schemes = [str(s) for s in config.get("normalization_schemes") or [Z_SCORE] * channels]
    needs_statistics = [s for s in schemes if s != Z_SCORE and s != "NoNormalization"]
    # a file written by to_nnssl carries our CT statistics beside nnssl's fields
    statistics = (ckpt.get("nnunetv2_hiendmae") or {}).get("foreground_intensity_properties_per_channel")
    if needs_statistics and not statistics:
        raise UserError(f"nnssl checkpoint {path}: its pretraining normalised with {needs_statistics[0]}, whose "
                        "intensity statistics nnssl does not record")
    spacing = config.get("spacing")
    return {
        "source": "nnssl",
        "datasets": [],  # nnssl's dataset names are not nnU-Net datasets: the leakage guard checks none by name
        "nnssl_dataset": pretrain_plan.get("dataset_name"),
        "plans": pretrain_plan.get("plans_name"), "configuration": name,
        "spacing": None if spacing is None or None in spacing else [float(s) for s in spacing],
        "transpose_forward": [int(a) for a in pretrain_plan.get("transpose_forward") or range(3)],
        "normalization_schemes": schemes,
        "use_mask_for_norm": [bool(m) for m in config.get("use_mask_for_norm") or [False] * len(schemes)],
        "foreground_intensity_properties_per_channel": statistics or {str(c): {} for c in range(len(schemes))},
        "image_reader_writer": pretrain_plan.get("image_reader_writer"),
        "resampling_fn_data": config.get("resampling_fn_data"),
        "in_channels": channels, "patch_size": patch,
        "epochs_done": ckpt.get("current_epoch"),
        "case_fingerprints": None,  # nnssl records no case list: the leakage guard says it cannot check
        "nnssl_trainer": ckpt.get("trainer_name"),
        "nnssl_pretrain_plan": pretrain_plan,
        "nnssl_unread": unread,
    }


def from_nnssl(ckpt: dict, path: object = "", cnn: bool = False) -> dict:
    """An nnssl Primus checkpoint (module docstring) as a checkpoint dict in our layout
    (:func:`~nnunetv2_hiendmae.checkpoint.make_checkpoint`): encoder configuration of kind ``primus`` (8^3 or the
    plan's tokens, the learned position embedding on the pretraining token grid), weights ``encoder.down_projection.*``
    and ``encoder.eva.*``, method ``nnssl <trainer_name>``, and a ``pretrain`` block with the pretraining plan's
    spacing, ``transpose_forward``, normalisation and patch (``source: nnssl``, no case fingerprints). With ``cnn``,
    a ResEnc checkpoint too (:func:`_from_resenc`).

    Raises :class:`~nnunetv2_hiendmae.errors.UserError` for a plan without the fields read, a CNN (without ``cnn``) or
    unknown architecture, weights without the Primus stem or position embedding, or a normalisation that needs
    intensity statistics. Whether the weights fit the configuration is checked where the encoder is built (strict
    load)."""
    plan = _plain(ckpt["nnssl_adaptation_plan"])
    if not isinstance(plan, dict):
        raise UserError(f"nnssl checkpoint {path}: its nnssl_adaptation_plan is not a dict")
    arch_plans = _plan_entry(plan, "architecture_plans", path)
    name = arch_plans.get("arch_class_name") if isinstance(arch_plans, dict) else None
    if cnn and name in RESENC_CLASSES:
        return _from_resenc(ckpt, plan, name, path)
    arch, dims = _primus_dimensions(plan, path)
    weights, unread = _encoder_weights(ckpt["network_weights"], plan, "down_projection.", "eva.", path)
    if "down_projection.proj.weight" not in weights or "eva.pos_embed" not in weights:
        raise UserError(f"nnssl checkpoint {path}: no Primus stem ({plan['key_to_stem']}.proj.weight) and learned "
                        f"position embedding ({plan['key_to_encoder']}.pos_embed) in its network_weights")
    stem, pos = weights["down_projection.proj.weight"], weights["eva.pos_embed"]
    channels = int(stem.shape[1])
    patch = pretrain_patch(plan, path)
    grid = _token_grid(int(pos.shape[1]), patch, dims["token_size"], path)
    config = {"arch": arch, "kind": "primus", "embed_dim": dims["embed_dim"], "depth": dims["depth"],
              "num_heads": dims["num_heads"], "token_size": dims["token_size"], "mlp_ratio": MLP_RATIO,
              "init_values": dims["init_values"], "drop_path_rate": ENCODERS["primus"]["defaults"]["drop_path_rate"],
              "in_channels": channels, "pos_embed": "learned", "pos_embed_grid": grid}
    pretrain = _pretrain_block(ckpt, plan, channels, [g * t for g, t in zip(grid, dims["token_size"])], unread, path)
    return _ours(ckpt, weights, config, pretrain)


def _ours(ckpt: dict, weights: dict[str, torch.Tensor], config: dict, pretrain: dict) -> dict:
    """Our checkpoint dict of an encoder read from nnssl, its method named after nnssl's trainer."""
    trainer = ckpt.get("trainer_name")
    return make_checkpoint({f"encoder.{k}": v for k, v in weights.items()}, config, {}, pretrain,
                           method=f"nnssl {trainer}" if trainer else "nnssl")


def _resenc_kwargs(plan: dict, name: str, path: object) -> dict:
    """``ResidualEncoder``'s arguments (but ``input_channels``) of a ResEnc plan: nnssl's ResEnc-L for a named one,
    else the plan's ``arch_kwargs`` without the decoder's."""
    from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder

    given = NAMED_RESENC.get(name) or plan["architecture_plans"].get("arch_kwargs")
    if not isinstance(given, dict):
        raise UserError(f"nnssl checkpoint {path}: a {name} without arch_kwargs")
    kwargs = {k: v for k, v in given.items() if k not in DECODER_KWARGS}
    known = set(inspect.signature(ResidualEncoder).parameters) - {"input_channels", "return_skips"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise UserError(f"nnssl checkpoint {path}: {name} arguments that dynamic-network-architectures' "
                        f"ResidualEncoder does not take: {', '.join(unknown)}")
    if "strides" not in kwargs or "n_stages" not in kwargs:
        raise UserError(f"nnssl checkpoint {path}: a {name} without strides and n_stages in its arch_kwargs")
    try:
        resolve_classes(kwargs)
    except ValueError as e:
        raise UserError(f"nnssl checkpoint {path}: {e}") from None
    return kwargs


def _from_resenc(ckpt: dict, plan: dict, name: str, path: object) -> dict:
    """An nnssl ResEnc checkpoint as a checkpoint dict in our layout: encoder configuration of kind ``resenc``
    (:class:`~nnunetv2_hiendmae.resenc.ResEncFeatures`: ``ResidualEncoder``'s arguments and the feature stage whose
    stride is closest to 16, :func:`~nnunetv2_hiendmae.resenc.feature_stage`), weights ``encoder.stem.*`` and
    ``encoder.stages.*``, and the ``pretrain`` block of a Primus. UserError for arguments ``ResidualEncoder`` does not
    take or classes outside torch.nn and dynamic-network-architectures, weights without the ResEnc stem, or a
    pretraining patch that is not a multiple of the feature map's stride (its windows must tile the feature map)."""
    kwargs = _resenc_kwargs(plan, name, path)
    weights, unread = _encoder_weights(ckpt["network_weights"], plan, "stem.", "stages.", path)
    if RESENC_STEM_WEIGHT not in weights:
        raise UserError(f"nnssl checkpoint {path}: no ResEnc stem ({plan['key_to_stem']}.convs.0.conv.weight) in its "
                        "network_weights")
    channels = int(weights[RESENC_STEM_WEIGHT].shape[1])
    config = resenc_config(name, kwargs, channels)
    stage = config["feature_stage"]
    token = total_strides(kwargs["strides"], int(kwargs["n_stages"]))[stage]
    patch = pretrain_patch(plan, path)
    if any(p % t for p, t in zip(patch, token)):
        raise UserError(f"nnssl checkpoint {path}: its pretraining patch {patch} is not a multiple of the stride "
                        f"{list(token)} of the feature map read (stage {stage})")
    widths = kwargs.get("features_per_stage")
    pretrain = _pretrain_block(ckpt, plan, channels, patch, unread, path)
    pretrain["nnssl_features"] = (f"the feature map of stage {stage} of {kwargs['n_stages']} (stride "
                                  f"{'x'.join(map(str, token))}, "
                                  f"{widths if isinstance(widths, int) else widths[stage]} channels)")
    return _ours(ckpt, weights, config, pretrain)


def preprocessing_note(pretrain: dict) -> str | None:
    """One line on a checkpoint read from nnssl (None for any other), for the commands to report: the pretraining
    preprocessing (spacing, axis order, normalisation and patch from its ``pretrain_plan``), the feature map read of
    a CNN, and the modules of ``network_weights`` not read."""
    if pretrain.get("source") != "nnssl":
        return None
    spacing = pretrain.get("spacing")
    features = f"; features: {pretrain['nnssl_features']}" if pretrain.get("nnssl_features") else ""
    unread = f"; not read: {', '.join(pretrain['nnssl_unread'])}" if pretrain.get("nnssl_unread") else ""
    return (f"nnssl checkpoint ({pretrain.get('nnssl_trainer') or 'trainer not recorded'}, pretrain_plan "
            f"{pretrain.get('plans')}/{pretrain.get('configuration')} of {pretrain.get('nnssl_dataset')}): "
            f"pretraining spacing {spacing if spacing is not None else 'not resampled'}, transpose_forward "
            f"{pretrain.get('transpose_forward')}, normalisation {', '.join(pretrain['normalization_schemes'])}, "
            f"patch {pretrain.get('patch_size')}{features}{unread}")


# ------------------------------------------------------------------------------------------------- writing

def _named_preset(config: dict) -> str | None:
    """nnssl's name of the encoder when it is exactly one of the named Primus presets, else None."""
    for name, ours in NAMED_PRIMUS.items():
        preset = PRESETS[ours]
        same = (int(config["embed_dim"]) == preset["embed_dim"] and int(config["depth"]) == preset["depth"]
                and int(config["num_heads"]) == preset["num_heads"]
                and token_size_3d(config["token_size"]) == token_size_3d(preset["token_size"])
                and config.get("init_values") == NAMED_INIT_VALUES
                and math.isclose(float(config.get("mlp_ratio", MLP_RATIO)), MLP_RATIO))
        if same:
            return name
    return None


def architecture_plans(config: dict) -> dict:
    """nnssl's serialised ``ArchitecturePlans``: a named preset (``arch_kwargs`` None: nnU-Net master builds it by
    name, ``get_network_from_name``) when the encoder is one, else ``PrimusX`` with the arguments
    ``PretrainedTrainer_Primusx`` builds a ``Primus`` from."""
    name = _named_preset(config)
    if name is not None:
        return {"arch_class_name": name, "arch_kwargs": None, "arch_kwargs_requiring_import": None}
    if not math.isclose(float(config.get("mlp_ratio", MLP_RATIO)), MLP_RATIO):
        raise UserError(f"Primus with mlp_ratio {config['mlp_ratio']}: nnU-Net master builds every Primus with "
                        f"{MLP_RATIO:.4f}")
    kwargs = {"embed_dim": int(config["embed_dim"]), "patch_embed_size": list(token_size_3d(config["token_size"])),
              "encoder_eva_depth": int(config["depth"]), "encoder_eva_numheads": int(config["num_heads"]),
              "scale_attn_inner": True, "init_values": config.get("init_values")}
    return {"arch_class_name": EXPLICIT_PRIMUS, "arch_kwargs": kwargs, "arch_kwargs_requiring_import": []}


def _inverse(order: Sequence[int]) -> list[int]:
    return [list(order).index(i) for i in range(len(order))]


def pretrain_plan(pretrain: dict, patch: Sequence[int]) -> dict:
    """nnssl's serialised ``Plan`` (``experiment_planners/plan.py``) from our ``pretrain`` block: one configuration
    with the pretraining's spacing, normalisation, mask rule, nnU-Net's default resampling and the patch. A block
    read from nnssl gives its own plan back."""
    if isinstance(pretrain.get("nnssl_pretrain_plan"), dict):
        return pretrain["nnssl_pretrain_plan"]
    from pretrain.unlabeled import DEFAULT_RESAMPLING

    spacing = [float(s) for s in pretrain["spacing"]]
    forward = [int(a) for a in pretrain.get("transpose_forward") or range(3)]
    datasets = pretraining_datasets(pretrain)
    plans, configuration = pretrain.get("plans") or "nnUNetPlans", pretrain.get("configuration") or "3d_fullres"
    config = {"data_identifier": f"{plans}_{configuration}", "preprocessor_name": "DefaultPreprocessor",
              "spacing_style": "onemmiso" if all(math.isclose(s, 1.0) for s in spacing) else "median",
              "normalization_schemes": list(pretrain["normalization_schemes"]),
              "use_mask_for_norm": [bool(m) for m in pretrain.get("use_mask_for_norm")
                                    or [False] * len(pretrain["normalization_schemes"])],
              "resampling_fn_data": DEFAULT_RESAMPLING["resampling_fn_data"],
              "resampling_fn_data_kwargs": dict(DEFAULT_RESAMPLING["resampling_fn_data_kwargs"]),
              "resampling_fn_mask": DEFAULT_RESAMPLING["resampling_fn_seg"],
              "resampling_fn_mask_kwargs": dict(DEFAULT_RESAMPLING["resampling_fn_seg_kwargs"]),
              "spacing": spacing, "patch_size": [int(p) for p in patch]}
    return {"dataset_name": "+".join(datasets) or "unknown", "plans_name": plans,
            "original_median_spacing_after_transp": spacing,
            "image_reader_writer": pretrain.get("image_reader_writer") or "SimpleITKIO",
            "transpose_forward": forward, "transpose_backward": _inverse(forward),
            "configurations": {configuration: config}, "experiment_planner_used": "nnunetv2_hiendmae"}


def primus_network(config: dict, patch: Sequence[int]) -> torch.nn.Module:
    """dynamic-network-architectures' ``Primus`` (one output class) for the encoder configuration at ``patch``: the
    network whose state dict an nnssl checkpoint of ours carries."""
    from dynamic_network_architectures.architectures.primus import Primus

    return Primus(int(config["in_channels"]), int(config["embed_dim"]), token_size_3d(config["token_size"]), 1,
                  eva_depth=int(config["depth"]), eva_numheads=int(config["num_heads"]), input_shape=tuple(patch),
                  mlp_ratio=float(config.get("mlp_ratio", MLP_RATIO)), init_values=config.get("init_values"),
                  scale_attn_inner=True)


def to_nnssl(ckpt: dict, seed: int = 0) -> tuple[dict, list[str]]:
    """``(nnssl checkpoint, warnings)`` for a Primus checkpoint in our layout (module docstring): ``network_weights``
    is the ``Primus`` state dict at the pretraining patch with this checkpoint's encoder, the decoder initialised
    after ``torch.manual_seed(seed)`` (the global random state is left as it was); ``nnssl_adaptation_plan`` has
    every field of nnssl's ``AdaptationPlan``. A plain-ViT checkpoint raises UserError (:data:`VIT_REFUSAL`); a
    normalisation other than Z-score is a warning, because nnU-Net master's ``preprocess_like_nnssl`` Z-scores every
    channel."""
    config, pretrain = ckpt["encoder"], ckpt.get("pretrain") or {}
    if encoder_kind(config) != "primus":
        raise UserError(VIT_REFUSAL)
    grid = [int(g) for g in config["pos_embed_grid"]]
    patch = [g * t for g, t in zip(grid, token_size_3d(config["token_size"]))]
    if pretrain.get("spacing") is None and not isinstance(pretrain.get("nnssl_pretrain_plan"), dict):
        raise UserError("the checkpoint records no pretraining spacing: nnssl's pretrain_plan needs one")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = primus_network(config, patch)
    encoder = encoder_state_dict(ckpt)
    for name in ("down_projection", "eva"):
        part = {k[len(name) + 1:]: v for k, v in encoder.items() if k.startswith(f"{name}.")}
        try:
            network.get_submodule(name).load_state_dict(part, strict=True)
        except RuntimeError as e:
            raise UserError(f"the checkpoint's encoder does not fit a Primus of its configuration "
                            f"({' '.join(str(e).split())[:200]})") from None
    plan = {"architecture_plans": architecture_plans(config), "pretrain_plan": pretrain_plan(pretrain, patch),
            "pretrain_num_input_channels": int(config["in_channels"]), "recommended_downstream_patchsize": patch,
            "key_to_encoder": KEY_TO_ENCODER, "key_to_stem": KEY_TO_STEM, "keys_to_in_proj": list(KEYS_TO_IN_PROJ),
            "key_to_lpe": KEY_TO_LPE}
    warnings = [f"the encoder was pretrained with {s} normalisation, but nnU-Net master's "
                f"nnUNetv2_preprocess_like_nnssl normalises every channel with {Z_SCORE}: fine-tune it through "
                "nnUNetv2_hiendmae_plan to keep its own normalisation"
                for s in sorted(set(pretrain.get("normalization_schemes") or [])) if s != Z_SCORE]
    out = {"network_weights": {k: v.detach().clone() for k, v in network.state_dict().items()},
           "nnssl_adaptation_plan": plan, "trainer_name": "nnunetv2_hiendmae",
           "citations": ["Wald et al. 2025, Primus: Enforcing Attention Usage for 3D Medical Image Segmentation"],
           "nnunetv2_hiendmae": {"method": ckpt.get("method"), "encoder": dict(config),
                                 "foreground_intensity_properties_per_channel":
                                     pretrain.get("foreground_intensity_properties_per_channel")}}
    return out, warnings
