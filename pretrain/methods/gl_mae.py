"""GL-MAE (Zhuang et al., IEEE TMI 2025): global-local masked autoencoder with global-guided consistency.

Per case, ``p`` global views (a larger region, 5/3 of the patch by default, resized to the patch on the device) and
``q`` local views (the patch) are masked; the student (:class:`~pretrain.methods.mae.MAE`) reconstructs all of them.
An EMA teacher (encoder + projector, no gradient) encodes the **unmasked** global views: their projected CLS tokens
are the anchors. The student's projected CLS tokens of the masked global and local views are pulled towards the
anchors of the same case (global-to-global, global-to-local), with ``2 - 2 cos`` (BYOL's form of the loss). Primus has
no CLS token: there, the mean of the encoder's normed tokens takes its place (the student's: of the visible tokens),
the global average pooling EVA models use for their image embedding.

    loss = rec(global) + rec(local) + global_weight * cons(global, anchors) + local_weight * cons(local, anchors)

The public repository has no pretraining code; every value the paper does not give (p, q, projector sizes, the
consistency function, the loss weights, the momentum) is a setting whose default and reason are in docs/method.md.
Fine-tuning gets the student's encoder (``encoder.*``, as every method); the teacher (``teacher_*``) is saved in the
checkpoint only so that a resumed run continues exactly.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_hiendmae.vit import init_linear_and_norm
from pretrain.methods.mae import MAE
from pretrain.methods.masked import pairwise_cosine


def projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear - GELU - Linear on the encoder's normed CLS token."""
    head = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))
    init_linear_and_norm(head)
    return head


def consistency(student: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """``2 - 2 cos`` between every student embedding ``[B, n, d]`` and every anchor ``[B, p, d]`` of the same case,
    in float32 whatever the autocast (:func:`~pretrain.methods.masked.pairwise_cosine`)."""
    return (2 - 2 * pairwise_cosine(student, anchors)).mean()


class GLMAE(MAE):
    decay_tokens = False  # no published pretraining code: Hi-End-MAE's groups, as its other unpublished settings

    def __init__(self, encoder: dict, settings, decoder: dict | None = None):
        super().__init__(encoder, settings, decoder)
        e = self.encoder.embed_dim
        self.projector = projector(e, settings.proj_hidden_dim, settings.proj_dim)
        self.teacher_encoder = copy.deepcopy(self.encoder).requires_grad_(False).eval()  # no drop-path, from the start
        self.teacher_projector = copy.deepcopy(self.projector).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> GLMAE:
        super().train(mode)
        self.teacher_encoder.eval()  # no dropout/drop-path in the teacher, whatever the student does
        self.teacher_projector.eval()
        return self

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``views['global'] [B, p, C, *G]``, ``views['local'] [B, q, C, *patch]``."""
        local = views["local"]
        b, p, q, patch = views["global"].shape[0], views["global"].shape[1], local.shape[1], local.shape[3:]
        glob = F.interpolate(views["global"].flatten(0, 1).float(), size=tuple(patch), mode="trilinear",
                             align_corners=False)  # [B*p, C, *patch]
        student = self.autoencode(torch.cat([glob.to(local.dtype), local.flatten(0, 1)]), self.settings.mask_ratio)
        embedded = self.projector(student.pooled)  # [B*(p+q), d]
        with torch.no_grad():
            teacher = self.teacher_encoder
            anchors = self.teacher_projector(teacher.pooled(teacher(glob.to(local.dtype))[0])).view(b, p, -1)
        rec_global, rec_local = student.loss[:b * p].mean(), student.loss[b * p:].mean()
        cons_global = consistency(embedded[:b * p].view(b, p, -1), anchors)
        cons_local = consistency(embedded[b * p:].view(b, q, -1), anchors)
        s = self.settings
        loss = rec_global + rec_local + s.global_weight * cons_global + s.local_weight * cons_local
        return {"loss": loss, "rec_global": rec_global, "rec_local": rec_local, "cons_global": cons_global,
                "cons_local": cons_local}

    @torch.no_grad()
    def step_done(self, progress: float) -> None:
        """EMA teacher: momentum from ``ema_momentum`` to 1 along a half cosine over the run (BYOL/DINO)."""
        m = 1 - (1 - self.settings.ema_momentum) * (math.cos(math.pi * min(progress, 1.0)) + 1) / 2
        for teacher, student in ((self.teacher_encoder, self.encoder), (self.teacher_projector, self.projector)):
            for t, s in zip(teacher.parameters(), student.parameters()):
                t.mul_(m).add_(s.detach(), alpha=1 - m)

    def figure_input(self, views: dict[str, torch.Tensor]) -> torch.Tensor:
        return views["local"][:1, 0]
