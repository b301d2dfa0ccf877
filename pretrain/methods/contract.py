"""What the training loop (:mod:`pretrain.train`) expects of a method's model: the whole contract, in one place.

A model is built as ``Model(encoder_config, settings)`` (``encoder_config``: a
:func:`~nnunetv2_hiendmae.presets.encoder_config` dict; ``settings``: the method's settings object of the registry),
and is an ``nn.Module`` with the members below. :class:`~pretrain.methods.masked.MaskedAutoencoder` provides all of
them but ``forward`` and ``figure_input``; a test checks every registered method against this protocol.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from nnunetv2_hiendmae.vit import ViTEncoder3D


@runtime_checkable
class PretrainingModel(Protocol):
    encoder: ViTEncoder3D
    """The shared encoder; fine-tuning, the probe and the checkpoint's ``encoder.*`` read it."""
    token_size: tuple[int, int, int]
    """Voxels per token and axis (recorded in the checkpoint)."""
    decoder_config: dict
    """The decoder's dimensions, plain data (recorded in the checkpoint; the model can be rebuilt from it)."""

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Views of a batch as the settings' ``views()`` name them, each ``[B, n, C, *size]`` float32 on the device
        (already augmented) -> named scalar losses: ``loss`` (what is minimised) and each of its components (logged
        per epoch, plotted and validated on held-out cases). Draws its masks from torch's global generator."""

    def step_done(self, progress: float) -> None:
        """Called after every optimiser step with the fraction of the planned run done, in [0, 1] (momentum
        teachers); most methods do nothing."""

    def figure_input(self, views: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[1, C, *patch_size]``: the volume of this batch that the reconstruction figure shows."""

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, C, *patch_size]`` -> ``(masked input, reconstruction)``, each ``[B, C, *patch_size]`` in the
        input's intensity units, for the figure."""

    def no_weight_decay(self) -> set[str]:
        """Parameter names AdamW must not decay besides biases and norms (timm's convention: tokens, position
        embeddings)."""
