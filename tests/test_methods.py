"""The pretraining methods behind the registry: each learns on a structured volume, MiM's levels nest as the method
says, GL-MAE's teacher is an unmasked, gradient-free EMA of the student, and bad settings are one clear line."""
from __future__ import annotations

import math

import pytest
import torch

from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.presets import encoder_config
from pretrain import methods
from pretrain.methods.mae import MAE
from pretrain.methods.mim import octant_volumes, token_octants, token_volumes

PATCH = (32, 32, 32)
SMALL = {"mae": {}, "hiend_mae": {}, "gl_mae": {"global_views": 1, "local_views": 2, "global_size": [40, 48, 48]},
         "mim": {}}


def structured(batch: int, views: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A ramp along the first axis plus smooth blobs: each patch's normalised voxels are largely predictable."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (n, size) in views.items():
        axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in size], indexing="ij")
        vol = 3 * axes[0].expand(batch * n, *size).clone()
        for _ in range(4):
            c = torch.rand(batch * n, 3, generator=g) * 1.6 - 0.8
            r = 0.2 + 0.3 * torch.rand(batch * n, generator=g)
            d2 = sum((a[None] - c[:, i, None, None, None]) ** 2 for i, a in enumerate(axes))
            vol += torch.exp(-d2 / (2 * r[:, None, None, None] ** 2))
        out[name] = vol.view(batch, n, 1, *size)
    return out


def build(name: str, **given):
    settings = methods.make_settings(name, {**SMALL[name], **given})
    settings.check(PATCH, (16, 16, 16))
    torch.manual_seed(0)
    return methods.model_class(name)(encoder_config("vit_tiny"), settings), settings


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_loss_is_finite_and_decreases_on_a_structured_volume(name):
    model, settings = build(name)
    views = structured(2, settings.views(PATCH))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(25):
        out = model(views)
        assert out["loss"].ndim == 0 and all(torch.isfinite(v) for v in out.values())
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        model.step_done(step / 25)
        losses.append(out["loss"].item())
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses
    x = model.figure_input(views)
    masked, recon = model.reconstruct(x)
    assert x.shape == masked.shape == recon.shape == (1, 1, *PATCH)


def test_loss_components_are_named():
    expected = {"hiend_mae": {"loss"}, "mae": {"loss"},
                "gl_mae": {"loss", "rec_global", "rec_local", "cons_global", "cons_local"},
                "mim": {"loss", "rec_up", "rec_mid", "rec_down", "align_up_mid", "align_mid_down"}}
    for name, keys in expected.items():
        model, settings = build(name)
        assert set(model(structured(1, settings.views(PATCH)))) == keys, name


def test_mae_decoder_is_plain_and_its_parameter_names_are_maes():
    model, _ = build("mae")
    names = set(dict(model.named_parameters()))
    assert {"decoder_embed.weight", "mask_token", "decoder.blocks.1.attn.qkv.weight", "decoder.norm.weight",
            "decoder.head.weight"} <= names
    assert not any("cross_attention" in n or "encoder_to_decoder" in n for n in names)
    big = MAE(encoder_config("vit_b16"), methods.make_settings("mae", {}))
    assert big.decoder_config == {"embed_dim": 576, "depth": 8, "num_heads": 16}


# ------------------------------------------------------------------------------------------------------------ MiM

def labelled_grid(size: tuple[int, int, int]) -> torch.Tensor:
    """``[1, 1, *size]`` whose voxel value is its raster index: every region says where it came from."""
    return torch.arange(math.prod(size), dtype=torch.float64).view(1, 1, *size)


def test_mim_octants_are_true_octants_of_the_token_grid_and_of_the_crop():
    grid = (4, 6, 2)
    octant = token_octants(grid).view(grid)
    for o in range(8):  # octant o = 4 * (x in upper half) + 2 * (y upper) + (z upper): a box, not a raster slab
        ix, iy, iz = o >> 2, (o >> 1) & 1, o & 1
        box = octant[ix * 2:(ix + 1) * 2, iy * 3:(iy + 1) * 3, iz:iz + 1]
        assert (box == o).all() and (octant == o).sum() == box.numel()
    x = labelled_grid((8, 12, 4))
    vols = octant_volumes(x.expand(2, 1, -1, -1, -1), torch.tensor([[5, 0], [7, 2]]))
    assert vols.shape == (4, 1, 4, 6, 2)
    torch.testing.assert_close(vols[0], x[0, :, 4:8, 0:6, 2:4])  # octant 5 = (1, 0, 1)
    torch.testing.assert_close(vols[1], x[0, :, 0:4, 0:6, 0:2])
    torch.testing.assert_close(vols[2], x[0, :, 4:8, 6:12, 2:4])  # octant 7
    torch.testing.assert_close(vols[3], x[0, :, 0:4, 6:12, 0:2])  # octant 2 = (0, 1, 0)


def test_mim_token_volumes_are_the_voxels_of_the_tokens():
    x = labelled_grid((8, 8, 16))
    vols = token_volumes(x, torch.tensor([[0, 5]]), (4, 4, 8))  # grid 2 x 2 x 2; token 5 = (1, 0, 1)
    torch.testing.assert_close(vols[0], x[0, :, 0:4, 0:4, 0:8])
    torch.testing.assert_close(vols[1], x[0, :, 4:8, 0:4, 8:16])


def test_mim_levels_nest(monkeypatch):
    """Middle volumes are exactly octants masked at the coarse level; fine volumes are masked tokens of those."""
    model, settings = build("mim")
    seen = []
    original = MAE.masked_autoencode
    monkeypatch.setattr(MAE, "masked_autoencode",
                        lambda self, x, shuffle, n_visible: seen.append((x, shuffle, n_visible))
                        or original(self, x, shuffle, n_visible))
    # a 64^3 crop of 4^3 blocks of 16^3 voxels (one token each at native resolution), each block valued by its id
    blocks = torch.arange(64, dtype=torch.float32).view(4, 4, 4)
    whole = blocks.repeat_interleave(16, 0).repeat_interleave(16, 1).repeat_interleave(16, 2)[None, None]
    torch.manual_seed(3)
    model({"crop": whole.expand(2, 1, 1, -1, -1, -1)})
    (_, up_shuffle, up_visible), (mid, mid_shuffle, mid_visible), (fine, _, _) = seen
    octant = token_octants(model.encoder.grid(PATCH))
    masked = [set(octant[up_shuffle[b, up_visible:]].tolist()) for b in range(2)]
    visible = [set(octant[up_shuffle[b, :up_visible]].tolist()) for b in range(2)]
    assert all(len(m) == 4 and not (m & v) for m, v in zip(masked, visible))  # whole octants are masked
    m, k = settings.mid_samples, settings.down_samples
    for i in range(2 * m):  # middle volume i: an octant of its case's crop that was masked at the coarse level
        o = [o for o in range(8) if torch.equal(mid[i], octant_volumes(whole, torch.tensor([[o]]))[0])]
        assert len(o) == 1 and o[0] in masked[i // m], i
        corner = torch.tensor([o[0] >> 2, (o[0] >> 1) & 1, o[0] & 1]) * 2  # its first block, in blocks
        for j in range(k):  # fine volume: one constant block, a token of middle volume i that was masked there
            values = fine[i * k + j].unique()
            assert values.numel() == 1
            block = torch.tensor([int(values) // 16, (int(values) // 4) % 4, int(values) % 4]) - corner
            assert ((block >= 0) & (block < 2)).all()
            token = int(block[0] * 4 + block[1] * 2 + block[2])
            assert token in mid_shuffle[i, mid_visible:].tolist(), (i, j)


@pytest.mark.parametrize("alignment", ["byol", "ce"])
def test_mim_alignment_uses_the_coarse_features_and_runs(alignment):
    model, settings = build("mim", alignment=alignment)
    views = structured(2, settings.views(PATCH))
    out = model(views)
    assert torch.isfinite(out["align_up_mid"]) and torch.isfinite(out["align_mid_down"])
    out["align_up_mid"].backward()
    assert model.align_up[0].weight.grad.abs().sum() > 0  # the coarse-level head takes part
    assert model.align_mid[0].weight.grad.abs().sum() > 0
    if alignment == "ce":  # chance level of 8 octants at the start
        assert abs(out["align_up_mid"].item() - math.log(8)) < 1.0


# ---------------------------------------------------------------------------------------------------------- GL-MAE

def test_gl_mae_teacher_gets_no_gradient_moves_by_momentum_and_sees_unmasked_global_views(monkeypatch):
    model, settings = build("gl_mae")
    views = structured(2, settings.views(PATCH))
    seen = {}
    teacher_forward = type(model.teacher_encoder).forward
    monkeypatch.setattr(type(model.teacher_encoder), "forward",
                        lambda self, x, keep=None: (seen.setdefault(id(self), (x, keep)),
                                                    teacher_forward(self, x, keep))[1])
    out = model(views)
    x, keep = seen[id(model.teacher_encoder)]
    assert keep is None and x.shape == (2, 1, *PATCH)  # whole (unmasked) global views, resized to the patch
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher_encoder.parameters())
    assert all(p.grad is None for p in model.teacher_projector.parameters())
    assert model.encoder.blocks[0].attn.qkv.weight.grad is not None

    before = {k: v.clone() for k, v in model.teacher_encoder.state_dict().items()}
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    model.step_done(0.0)  # momentum 0.996 at the start: teacher <- 0.996 teacher + 0.004 student
    for k, t in model.teacher_encoder.state_dict().items():
        s = model.encoder.state_dict()[k]
        torch.testing.assert_close(t, 0.996 * before[k] + 0.004 * s)
    frozen = {k: v.clone() for k, v in model.teacher_encoder.state_dict().items()}
    model.step_done(1.0)  # momentum 1 at the end: the teacher no longer moves
    assert all(torch.equal(v, frozen[k]) for k, v in model.teacher_encoder.state_dict().items())


def test_gl_mae_global_views_are_resized_regions_larger_than_the_patch():
    settings = methods.make_settings("gl_mae", {})
    assert settings.views((96, 96, 96)) == {"global": (2, (160, 160, 160)), "local": (6, (96, 96, 96))}


# ------------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("name,given,patch,message", [
    ("gl_mae", {"global_size": [16, 32, 32]}, (32, 32, 32), "smaller than --patch-size"),
    ("mim", {}, (16, 32, 32), "even number of tokens"),
    ("mim", {"mid_samples": 5}, (32, 32, 32), "--mid-samples 5"),
    ("hiend_mae", {"mask_ratio": 1.0}, (32, 32, 32), "--mask-ratio must be between 0 and 1"),
    ("hiend_mae", {"global_views": 2}, (32, 32, 32), "--global-views: not a setting of method hiend_mae"),
    ("nope", {}, (32, 32, 32), "unknown method 'nope'"),
])
def test_bad_settings_are_one_clear_error(name, given, patch, message):
    with pytest.raises(UserError, match=message):
        methods.make_settings(name, given).check(patch, (16, 16, 16))


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_compiled_once_no_recompilation_as_masks_change(name):
    """torch.compile (as the CLI on CUDA) traces each method once: fresh masks every step keep their shapes, and
    nothing in forward changes state that a compiled graph guards on. (The eager backend checks tracing and guards
    without generating code.)"""
    import torch._dynamo

    model, settings = build(name)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(3):
            out = compiled(structured(2, settings.views(PATCH), seed=step))
            out["loss"].backward()
    torch._dynamo.reset()
