"""nnU-Net trainers that fine-tune the Hi-End-MAE ViT (as :class:`~nnunetv2_hiendmae.network.HiEndUNETR`).

Found by ``nnUNetv2_train``/``nnUNetv2_predict`` through ``nnUNet_extTrainer`` (see :mod:`nnunetv2_hiendmae.ext`).
Every name starts with ``nnUNetTrainerHiEndMAE`` so it can never shadow, or be shadowed by, a built-in trainer.

Recipe (one place, :class:`nnUNetTrainerHiEndMAE`): AdamW (betas 0.9/0.999 as the reference fine-tuning, weight
decay 0.05 except biases, norms, CLS token and positional embedding), peak lr 1e-4, linear warm-up then poly decay
with nnU-Net's own schedulers (same optimiser kept across the switch, as nnUNetTrainer_warmup), layer-wise lr decay
0.75 over the encoder, gradient clipping at norm 1, bf16 autocast on CUDA, no deep supervision. Variants change one
thing: the schedule (data, :class:`Schedule`) or the initialisation (``load_pretrained``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from nnunetv2.training.lr_scheduler.warmup import Lin_incr_LRScheduler, PolyLRScheduler_offset
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.lr_schedule.nnUNetTrainer_warmup import nnUNetTrainer_warmup
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2_hiendmae.checkpoint import read_torch_file
from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.network import HiEndUNETR
from nnunetv2_hiendmae.optim import param_groups
from nnunetv2_hiendmae.precision import autocast
from nnunetv2_hiendmae.presets import NETWORK_CLASS
from nnunetv2_hiendmae.weights import load_pretrained_encoder, verify_checkpoint

NNUNET_CHECKPOINT_KEYS = ("network_weights", "optimizer_state", "current_epoch", "logging", "_best_ema", "init_args")


@dataclass(frozen=True)
class Schedule:
    """Training length. ``warmup_epochs=None``: 50 epochs (nnU-Net's warm-up), at most 10% of a short run, min 1."""

    epochs: int
    iterations: int = 250
    val_iterations: int = 50
    warmup_epochs: int | None = None

    def warmup(self) -> int:
        return self.warmup_epochs if self.warmup_epochs is not None else max(1, min(50, self.epochs // 10))


DEFAULT = Schedule(epochs=1000)  # nnU-Net's default length
SMOKE = Schedule(epochs=2, iterations=3, val_iterations=2, warmup_epochs=1)  # CPU tests
DEMO = Schedule(epochs=6, iterations=10, val_iterations=3)  # CPU demo: ~3 min per trainer on 2 cores


class _Scheduled:
    """Mixin: apply the class's :class:`Schedule` after nnU-Net's ``__init__`` has set its defaults."""

    schedule: Schedule = DEFAULT

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.schedule.epochs
        self.num_iterations_per_epoch = self.schedule.iterations
        self.num_val_iterations_per_epoch = self.schedule.val_iterations


def bare_module(network: nn.Module) -> nn.Module:
    """The network without DDP / torch.compile wrappers (whose parameter names carry prefixes)."""
    if isinstance(network, DDP):
        network = network.module
    return network._orig_mod if isinstance(network, OptimizedModule) else network


class _LayerScaled:
    """Scheduler mixin: nnU-Net's schedulers give every group the same lr; scale each by its ``lr_scale``."""

    def step(self, current_step: int | None = None) -> None:
        super().step(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] *= group.get("lr_scale", 1.0)


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

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-4  # the reference fine-tuning lr (nnU-Net's 1e-2 is for SGD on CNNs)
        self.weight_decay = 0.05
        self.warmup_duration_whole_net = self.schedule.warmup()
        self.enable_deep_supervision = False
        self.grad_scaler = None  # bf16 needs no loss scaling
        self._weights_from_checkpoint = False  # set by load_checkpoint: --c / --val bring their own weights

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """Random-init network from the plans (also what ``nnUNetv2_predict`` calls: never loads weights); a
        classmethod, so that a variant's ``recompute_full_resolution`` reaches the network wherever it is built."""
        if configuration_manager.network_arch_class_name != NETWORK_CLASS:
            raise UserError(
                f"plans '{plans_manager.plans_name}' describe {configuration_manager.network_arch_class_name}, not "
                f"{NETWORK_CLASS}: create plans with nnUNetv2_hiendmae_plan and pass their name with -p")
        return HiEndUNETR(num_input_channels, num_output_channels, configuration_manager.patch_size,
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
            scratch = self.__class__.__name__.replace("nnUNetTrainerHiEndMAE", "nnUNetTrainerHiEndMAE_scratch", 1)
            raise UserError(f"plans '{name}' name no pretrained checkpoint (from-scratch plans): train them with "
                            f"-tr {scratch}, or create plans with '{plan_cmd}'")
        return verify_checkpoint(info["checkpoint"], info.get("encoder_sha256"))

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

    def configure_optimizers(self, stage: str = "warmup_all"):
        """AdamW with layer-wise lr groups; warm-up, then poly decay on the same optimiser (momenta survive)."""
        if self.training_stage == stage:
            return self.optimizer, self.lr_scheduler
        if stage == "train" and self.training_stage == "warmup_all":
            optimizer = self.optimizer
        else:
            groups = param_groups(bare_module(self.network), self.weight_decay, self.layer_decay)
            optimizer = torch.optim.AdamW(groups, lr=self.initial_lr, betas=self.betas,
                                          fused=self.device.type == "cuda")
        if stage == "warmup_all":
            scheduler = LayerScaledWarmup(optimizer, self.initial_lr, self.warmup_duration_whole_net)
        else:
            scheduler = LayerScaledPoly(optimizer, self.initial_lr, self.num_epochs, self.warmup_duration_whole_net)
        self.print_to_log_file(f"Optimiser stage '{stage}' from epoch {self.current_epoch} "
                               f"(warm-up {self.warmup_duration_whole_net} of {self.num_epochs} epochs, "
                               f"layer decay {self.layer_decay})")
        self.training_stage = stage
        return optimizer, scheduler

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device):
            loss = self.loss(self.network(data), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
        self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        # nnU-Net's inner autocast(enabled=True) takes the active autocast dtype, so this makes it bf16
        with autocast(self.device):
            return super().validation_step(batch)

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
        stage = "warmup_all" if self.current_epoch < self.warmup_duration_whole_net else "train"
        self.optimizer, self.lr_scheduler = self.configure_optimizers(stage)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])


class nnUNetTrainerHiEndMAE_scratch(nnUNetTrainerHiEndMAE):
    """Same network and recipe, random init: the baseline that isolates the effect of pretraining.

    No layer-wise decay: it protects pretrained features and would only slow a random encoder down.
    """

    load_pretrained = False
    layer_decay = 1.0


class nnUNetTrainerHiEndMAE_recompute(nnUNetTrainerHiEndMAE):
    """Recomputes the full-resolution blocks in the backward: the same gradients, for memory-bound GPUs (patches or
    batches that do not fit otherwise); docs/benchmarks.md has the memory and FLOPs it trades."""

    recompute_full_resolution = True


class nnUNetTrainerHiEndMAE_scratch_recompute(nnUNetTrainerHiEndMAE_scratch):
    recompute_full_resolution = True


class nnUNetTrainerHiEndMAE_100epochs(nnUNetTrainerHiEndMAE):
    schedule = Schedule(epochs=100)


class nnUNetTrainerHiEndMAE_250epochs(nnUNetTrainerHiEndMAE):
    schedule = Schedule(epochs=250)


class nnUNetTrainerHiEndMAE_smoke(nnUNetTrainerHiEndMAE):
    schedule = SMOKE


class nnUNetTrainerHiEndMAE_demo(nnUNetTrainerHiEndMAE):
    schedule = DEMO


class nnUNetTrainerHiEndMAE_scratch_100epochs(nnUNetTrainerHiEndMAE_scratch):
    schedule = Schedule(epochs=100)


class nnUNetTrainerHiEndMAE_scratch_250epochs(nnUNetTrainerHiEndMAE_scratch):
    schedule = Schedule(epochs=250)


class nnUNetTrainerHiEndMAE_scratch_smoke(nnUNetTrainerHiEndMAE_scratch):
    schedule = SMOKE


class nnUNetTrainerHiEndMAE_scratch_demo(nnUNetTrainerHiEndMAE_scratch):
    schedule = DEMO


class nnUNetTrainerHiEndMAEBaseline_smoke(_Scheduled, nnUNetTrainer):
    """nnU-Net's default network and recipe on the smoke schedule (a fair CNN reference)."""

    schedule = SMOKE


class nnUNetTrainerHiEndMAEBaseline_demo(_Scheduled, nnUNetTrainer):
    """nnU-Net's default network and recipe on the demo schedule (a fair CNN reference)."""

    schedule = DEMO


__all__ = [name for name, obj in list(globals().items())
           if isinstance(obj, type) and issubclass(obj, nnUNetTrainer) and name.startswith("nnUNetTrainerHiEndMAE")]
