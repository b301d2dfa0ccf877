"""nnU-Net trainers that fine-tune the Hi-End-MAE ViT (as :class:`~nnunetv2_hiendmae.network.HiEndUNETR`) or a
pretrained Primus (as dynamic-network-architectures' ``Primus``,
:class:`~nnunetv2_hiendmae.primus_network.PrimusNetwork`): the plans' network class says which.

Found by ``nnUNetv2_train``/``nnUNetv2_predict`` through ``nnUNet_extTrainer`` (see :mod:`nnunetv2_hiendmae.ext`).
Every name starts with ``nnUNetTrainerHiEndMAE`` so it can never shadow, or be shadowed by, a built-in trainer.

Recipe (one place, :class:`nnUNetTrainerHiEndMAE`): AdamW (betas 0.9/0.999 as the reference fine-tuning, weight
decay 0.05 except biases, norms, CLS token and positional embedding), peak lr 1e-4, linear warm-up then poly decay
with nnU-Net's own schedulers (same optimiser kept across the switch, as nnUNetTrainer_warmup), layer-wise lr decay
0.75 over the encoder, gradient clipping at norm 1, autocast on CUDA (bf16 where the GPU has it natively, else fp16
with nnU-Net's GradScaler; validation, like ``nnUNetv2_predict``, in nnU-Net's fp16 autocast), no deep supervision.
The variants are generated from the tables of :mod:`nnunetv2_hiendmae.variants` (fine-tuning x memory x schedule x
label budget), each a module-level subclass that changes one thing: the initialisation (``load_pretrained``), which
epochs the encoder is frozen in (``freezing``), ``recompute_full_resolution``, the ``schedule`` or the
``label_budget``.
"""
from __future__ import annotations

import pydoc
import shlex
from dataclasses import replace
from pathlib import Path

import torch
from nnunetv2.training.lr_scheduler.warmup import Lin_incr_LRScheduler, PolyLRScheduler_offset
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.lr_schedule.nnUNetTrainer_warmup import nnUNetTrainer_warmup
from nnunetv2.training.nnUNetTrainer.variants.training_length import nnUNetTrainer_Xepochs
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2_hiendmae import variants
from nnunetv2_hiendmae.checkpoint import read_torch_file
from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.fileio import atomic_write_json
from nnunetv2_hiendmae.optim import param_groups, split_param_groups
from nnunetv2_hiendmae.precision import autocast, resolve_precision
from nnunetv2_hiendmae.presets import NETWORK_CLASSES
from nnunetv2_hiendmae.variants import DEFAULT, Freezing, Schedule
from nnunetv2_hiendmae.weights import load_pretrained_encoder, verify_checkpoint

BUDGET_FILE = "label_budget.json"  # in fold_<f>: the cases of a label budget
NNUNET_CHECKPOINT_KEYS = ("network_weights", "optimizer_state", "current_epoch", "logging", "_best_ema", "init_args")


class _Scheduled:
    """Mixin: apply the class's :class:`Schedule` after nnU-Net's ``__init__`` has set its defaults."""

    schedule: Schedule = DEFAULT

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.schedule.epochs
        self.num_iterations_per_epoch = self.schedule.iterations
        self.num_val_iterations_per_epoch = self.schedule.val_iterations

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """nnU-Net's, then the schedule's test-time mirroring (saved in the checkpoint, so nnUNetv2_predict follows)."""
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.schedule.test_time_mirroring:
            self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, mirror_axes


def bare_module(network: nn.Module) -> nn.Module:
    """The network without DDP / torch.compile wrappers (whose parameter names carry prefixes)."""
    if isinstance(network, DDP):
        network = network.module
    return network._orig_mod if isinstance(network, OptimizedModule) else network


class _LabelBudget:
    """Mixin: train on a label budget, ``label_budget`` percent of the fold's training cases
    (:func:`~nnunetv2_hiendmae.variants.budget_cases`: nested, seeded, the same cases for every trainer of a fold),
    validate on the fold's whole validation set. The cases go to the training log and to ``fold_<f>/label_budget.json``.
    """

    label_budget: int = variants.FULL_BUDGET

    def do_split(self) -> tuple[list[str], list[str]]:
        train, val = super().do_split()
        train, val = [str(k) for k in train], [str(k) for k in val]
        cases = variants.budget_cases(train, self.label_budget, self.fold)
        self.print_to_log_file(f"Label budget {self.label_budget} %: {len(cases)} of the fold's {len(train)} training "
                               f"cases ({', '.join(cases)}); validation on all {len(val)} of its validation cases")
        if self.local_rank == 0:
            atomic_write_json(Path(self.output_folder) / BUDGET_FILE, {
                "label_budget_percent": self.label_budget, "fold": self.fold, "training_cases": cases,
                "fold_training_cases": len(train), "validation_cases": val,
                "rule": f"ceil({self.label_budget}/100 x {len(train)}), at least 2, first cases of a RandomState("
                        f"{variants.BUDGET_SEED} + fold) permutation of the sorted training cases (nested budgets)"})
        return cases, val


class _LayerScaled:
    """Scheduler mixin: nnU-Net's schedulers give every group the same lr; scale each by its ``lr_scale``, and ramp a
    group that joined later (``warmup_from``: its first epoch) linearly over its ``warmup_epochs``."""

    def step(self, current_step: int | None = None) -> None:
        super().step(current_step)
        epoch = self.ctr - 1 if current_step is None or current_step == -1 else current_step
        for group in self.optimizer.param_groups:
            ramp = 1.0
            if "warmup_from" in group:
                ramp = min(1.0, max(0.0, (epoch - group["warmup_from"] + 1) / group["warmup_epochs"]))
            group["lr"] *= group.get("lr_scale", 1.0) * ramp


class LayerScaledWarmup(_LayerScaled, Lin_incr_LRScheduler):
    pass


class LayerScaledPoly(_LayerScaled, PolyLRScheduler_offset):
    pass


class nnUNetTrainerHiEndMAE(_Scheduled, nnUNetTrainer_warmup):
    """Fine-tunes the pretrained encoder named in the plans' ``pretrain_info`` (from ``nnUNetv2_hiendmae_plan``)."""

    load_pretrained: bool = True
    layer_decay: float = 0.75
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    recompute_full_resolution: bool = False  # see HiEndUNETR: less activation memory for more FLOPs
    freezing: Freezing = Freezing()  # the encoder learns in every epoch

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-4  # the reference fine-tuning lr (nnU-Net's 1e-2 is for SGD on CNNs)
        self.weight_decay = 0.05
        self.warmup_duration_whole_net = self.schedule.warmup()
        self.enable_deep_supervision = False
        if resolve_precision(self.device) != "fp16":  # bf16 and fp32 need no loss scaling
            self.grad_scaler = None
        self._weights_from_checkpoint = False  # set by load_checkpoint: --c / --val bring their own weights
        self._optimised_frozen: bool | None = None  # whether the optimiser was built with the encoder frozen
        if self.is_ddp and self.freezing.unfreeze_epoch(self.num_epochs):
            raise UserError(f"{type(self).__name__} unfreezes the encoder during the run, which DDP does not follow "
                            "(it fixes the trainable parameters when it wraps the network): train it on one GPU")

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """Random-init network from the plans (also what ``nnUNetv2_predict`` calls: never loads weights); a
        classmethod, so that a variant's ``recompute_full_resolution`` reaches the network wherever it is built."""
        name = configuration_manager.network_arch_class_name
        if name not in NETWORK_CLASSES:
            raise UserError(
                f"plans '{plans_manager.plans_name}' describe {name}, not one of {', '.join(NETWORK_CLASSES)}: create "
                "plans with nnUNetv2_hiendmae_plan and pass their name with -p")
        return pydoc.locate(name)(num_input_channels, num_output_channels, configuration_manager.patch_size,
                                  deep_supervision=False, recompute_full_resolution=cls.recompute_full_resolution,
                                  **configuration_manager.network_arch_init_kwargs)

    def _pretrained_checkpoint(self) -> dict | None:
        """The verified pretraining checkpoint to start from, or None (scratch, or weights from --c/--val)."""
        if not self.load_pretrained:
            self.print_to_log_file("Encoder: random initialisation (scratch trainer)")
            return None
        if self._weights_from_checkpoint:
            self.print_to_log_file("Encoder: weights come from the nnU-Net checkpoint being loaded")
            return None
        name, dataset = self.plans_manager.plans_name, self.plans_manager.dataset_name
        plan_cmd = f"nnUNetv2_hiendmae_plan -d {dataset} -pt CHECKPOINT"
        info = self.plans_manager.plans.get("pretrain_info")
        if info is None:
            raise UserError(f"plans '{name}' were not written by nnUNetv2_hiendmae_plan: create them with "
                            f"'{plan_cmd}' and pass their name with -p")
        if not info.get("checkpoint"):
            variant = variants.VARIANTS.get(type(self).__name__)
            twin = variants.trainer_name(replace(variant, arm="scratch")) if variant else "a _scratch trainer"
            raise UserError(f"plans '{name}' name no pretrained checkpoint (from-scratch plans): train them with "
                            f"-tr {twin}, or create plans with '{plan_cmd}'")
        modes = "".join(f" --{key} {info[key]}" for key in ("spacing", "normalization") if info.get(key))
        replan = f"nnUNetv2_hiendmae_plan -d {dataset} -pt {shlex.quote(info['checkpoint'])} -o {name}{modes}"
        return verify_checkpoint(info["checkpoint"], info.get("encoder_sha256"), replan)

    def initialize(self) -> None:
        """nnU-Net's initialize, with the pretrained encoder loaded into the freshly built, bare network.

        The base class builds, compiles and DDP-wraps in one method; an instance attribute shadows the static
        ``build_network_architecture`` for that one call so the weights go in before compile/DDP (and never at
        inference, which uses the class's method).
        """
        ckpt = None if self.was_initialized else self._pretrained_checkpoint()  # fails before anything is built
        build = type(self).build_network_architecture

        def build_for_training(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                               num_input_channels: int, num_output_channels: int,
                               enable_deep_supervision: bool = True) -> nn.Module:
            network = build(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                            enable_deep_supervision)
            if ckpt is not None:
                report = load_pretrained_encoder(network, ckpt)
                self.print_to_log_file(f"{report.summary()} from "
                                       f"{self.plans_manager.plans['pretrain_info']['checkpoint']}")
            return network

        self.build_network_architecture = build_for_training
        try:
            super().initialize()
        finally:
            del self.build_network_architecture

    def encoder_frozen(self) -> bool:
        """Whether the encoder is frozen in the current epoch (``freezing``; after the last epoch, as in the last)."""
        return self.freezing.frozen(min(self.current_epoch, self.num_epochs - 1), self.num_epochs)

    def _stage(self) -> str:
        """nnUNetTrainer_warmup's stage of the current epoch."""
        return "warmup_all" if self.current_epoch < self.warmup_duration_whole_net else "train"

    def _param_groups(self, network: nn.Module, frozen: bool) -> list[dict]:
        """The recipe's AdamW groups over the parameters that learn now; a staged run's encoder, once it learns, in
        groups of its own that warm up from the epoch it joined."""
        groups = param_groups(network, self.weight_decay, self.layer_decay)  # skips parameters that need no grad
        joined = self.freezing.unfreeze_epoch(self.num_epochs)
        if frozen or not joined:
            return groups
        rest, encoder = split_param_groups(groups, network.encoder.parameters())
        return rest + [{**g, "warmup_from": joined, "warmup_epochs": self.warmup_duration_whole_net} for g in encoder]

    def configure_optimizers(self, stage: str = "warmup_all"):
        """AdamW with layer-wise lr groups; warm-up, then poly decay on the same optimiser (momenta survive).

        Only the parameters that learn in the current epoch are in it: a frozen encoder has ``requires_grad`` off and
        no group (no AdamW state, no weight decay). When a staged run's encoder joins, a new optimiser takes the
        decoder's AdamW state over and gives the encoder groups with a linear warm-up of their own. Rebuilt for the
        epoch of a checkpoint by :meth:`load_checkpoint`, so ``--c`` continues in either stage.
        """
        frozen = self.encoder_frozen()
        if self.training_stage == stage and self._optimised_frozen == frozen:
            return self.optimizer, self.lr_scheduler
        network = bare_module(self.network)
        network.encoder.requires_grad_(not frozen)
        if stage == "train" and self.training_stage == "warmup_all" and self._optimised_frozen == frozen:
            optimizer = self.optimizer
        else:
            optimizer = torch.optim.AdamW(self._param_groups(network, frozen), lr=self.initial_lr, betas=self.betas,
                                          fused=self.device.type == "cuda")
            if self.optimizer is not None:  # parameters that keep learning keep their AdamW state
                kept = {id(p) for g in optimizer.param_groups for p in g["params"]}
                optimizer.state.update({p: s for p, s in self.optimizer.state.items() if id(p) in kept})
        if stage == "warmup_all":
            scheduler = LayerScaledWarmup(optimizer, self.initial_lr, self.warmup_duration_whole_net)
        else:
            scheduler = LayerScaledPoly(optimizer, self.initial_lr, self.num_epochs, self.warmup_duration_whole_net)
        learning = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        self.print_to_log_file(f"Optimiser stage '{stage}' from epoch {self.current_epoch} "
                               f"(warm-up {self.warmup_duration_whole_net} of {self.num_epochs} epochs, "
                               f"layer decay {self.layer_decay}, encoder {'frozen' if frozen else 'learning'}, "
                               f"{learning} of {sum(p.numel() for p in network.parameters())} parameters learn)")
        self.training_stage, self._optimised_frozen = stage, frozen
        return optimizer, scheduler

    def on_train_epoch_start(self) -> None:
        """Switch the optimiser where the epoch needs it (warm-up over, a staged encoder joining), then nnU-Net's."""
        self.optimizer, self.lr_scheduler = self.configure_optimizers(self._stage())
        super().on_train_epoch_start()

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device):
            loss = self.loss(self.network(data), target)
        scaler = self.grad_scaler  # fp16 only: a GPU without native bf16
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], self.grad_clip)
        if scaler:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """One output scale: nothing to switch (nnU-Net calls this unconditionally)."""

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """Resume (``--c``, ``--val``): a path or a loaded dict; rebuild the checkpoint's optimiser stage first.

        nnU-Net 2.8.1's own versions fail here: the base one accepts only paths, nnUNetTrainer_warmup's calls
        ``torch.load`` without ``weights_only=False``, which torch >= 2.6 rejects for nnU-Net's checkpoints.
        """
        if not self.was_initialized:
            self._weights_from_checkpoint = True
            self.initialize()
        checkpoint = filename_or_checkpoint
        if not isinstance(checkpoint, dict):  # nnU-Net's own file (numpy scalars in 'logging'): not weights-only
            checkpoint = read_torch_file(checkpoint, "nnU-Net training checkpoint", weights_only=False,
                                         map_location=self.device)
        missing = [k for k in NNUNET_CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
        if missing:
            source = filename_or_checkpoint if not isinstance(filename_or_checkpoint, dict) else "the checkpoint"
            raise UserError(f"{source}"
                            f" is not an nnU-Net training checkpoint: expected the keys "
                            f"{', '.join(NNUNET_CHECKPOINT_KEYS)}, missing {', '.join(missing)}")
        weights = {k.removeprefix("module."): v for k, v in checkpoint["network_weights"].items()}
        bare_module(self.network).load_state_dict(weights)
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        self.optimizer, self.lr_scheduler = self.configure_optimizers(self._stage())  # the checkpoint epoch's groups
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state"):  # fp16: the loss scale reached
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])


# nnU-Net's trainers and our mixins that generated classes may name as bases (see variants.class_specs)
_NAMED_BASES = {"_Scheduled": _Scheduled, "_LabelBudget": _LabelBudget, "nnUNetTrainer": nnUNetTrainer,
                **{name: getattr(nnUNetTrainer_Xepochs, name) for name in variants.NNUNET_TRAINERS.values()
                   if name != "nnUNetTrainer"}}


def _define_variants() -> None:
    """Every name of the variant tables as a real module-level class (``__module__`` and ``__qualname__`` this
    module's), so that pickling, spawned workers and nnU-Net's lookup by name through the ext shim find it."""
    for spec in variants.class_specs():
        bases = tuple(_NAMED_BASES.get(b) or globals()[b] for b in spec.bases)
        globals()[spec.name] = type(spec.name, bases, {**spec.attributes, "__module__": __name__,
                                                       "__qualname__": spec.name, "__doc__": spec.doc})


_define_variants()


__all__ = [name for name, obj in list(globals().items())
           if isinstance(obj, type) and issubclass(obj, nnUNetTrainer) and name.startswith("nnUNetTrainerHiEndMAE")]
