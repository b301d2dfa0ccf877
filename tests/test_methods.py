"""The pretraining methods behind the registry: every named loss is made of what its method says, on the views and
targets its method says (a dropped, mis-weighted or mis-targeted component fails a test here), MiM's levels nest,
GL-MAE's teacher is an unmasked, gradient-free EMA of the student, the small reductions stay in float32 under
autocast, and bad settings are one clear line."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.presets import PRESETS, encoder_config_for_patch, token_size_3d
from nnunetv2_hiendmae.vit import patchify, take_tokens
from pretrain import methods
from pretrain.methods.contract import PretrainingModel
from pretrain.methods.gl_mae import consistency
from pretrain.methods.masked import Masked, MaskedAutoencoder, in_raster_order
from pretrain.methods.mim import MiM, octant_volumes, token_octants, token_volumes

PATCH = (32, 32, 32)
ARCH = "vit_tiny"  # the encoder under test; tests/test_primus_methods.py runs the encoder-agnostic tests on Primus


def token() -> tuple[int, int, int]:
    return token_size_3d(PRESETS[ARCH]["token_size"])


def summary(normed: torch.Tensor) -> torch.Tensor:
    """What stands for a view in GL-MAE's consistency, written out: the ViT's CLS token, Primus's mean token."""
    return normed[:, 0] if ARCH.startswith("vit") else normed.mean(1)


def final_norm(encoder: torch.nn.Module) -> torch.nn.Module:
    return encoder.eva.norm if ARCH.startswith("primus") else encoder.norm


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
    settings = methods.make_settings(name, {**methods.METHODS[name].small, **given})
    settings.check(PATCH, token())
    torch.manual_seed(0)
    return methods.model_class(name)(encoder_config_for_patch(ARCH, PATCH), settings), settings


def normalised_patches(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The reconstruction target written out: each token's voxels minus their mean, over sqrt(biased var + 1e-6)."""
    p = take_tokens(patchify(x.float(), token()), tokens)
    return (p - p.mean(-1, keepdim=True)) / (p.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()


def record(monkeypatch, cls: type, name: str) -> list:
    """Record ``(args, result)`` of every call of ``cls.name``."""
    calls, original = [], getattr(cls, name)

    def recorded(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append((args, result))
        return result

    monkeypatch.setattr(cls, name, recorded)
    return calls


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_every_method_fulfils_the_loop_contract_and_learns_on_a_structured_volume(name):
    model, settings = build(name)
    assert isinstance(model, PretrainingModel) and isinstance(model.decoder_config, dict)
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


# ------------------------------------------------------------------------------------------- MAE and Hi-End-MAE

@pytest.mark.parametrize("name", ["mae", "hiend_mae"])
def test_reconstruction_loss_is_the_normalised_mse_of_the_masked_tokens_of_every_crop(name, monkeypatch):
    model, settings = build(name)
    views = structured(2, settings.views(PATCH))
    passes = record(monkeypatch, MaskedAutoencoder, "masked_autoencode")
    loss = model(views)["loss"]
    ((x, shuffle, n_visible), out), = passes
    assert torch.equal(x, views["crops"].flatten(0, 1))  # every crop of every volume, once
    assert n_visible == int(shuffle.shape[1] * (1 - settings.mask_ratio))
    target = normalised_patches(x, shuffle[:, n_visible:])  # the masked tokens, not the visible ones
    per_crop = (out.pred.float() - target).pow(2).mean(dim=(1, 2))
    torch.testing.assert_close(out.loss, per_crop, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, per_crop.mean(), rtol=1e-5, atol=1e-6)


def test_the_pass_reports_the_encoders_normed_summary():
    """``Masked.pooled`` (GL-MAE's consistency reads it) is the CLS token of the encoder's final norm, not a patch
    token (Primus: the mean of its normed visible tokens)."""
    model, settings = build("mae")
    normed = []
    final_norm(model.encoder).register_forward_hook(lambda m, i, o: normed.append(o))
    out = model.autoencode(structured(2, {"v": (1, PATCH)})["v"][:, 0], settings.mask_ratio)
    (tokens,) = normed
    torch.testing.assert_close(out.pooled, summary(tokens), rtol=0, atol=0)


def test_decoder_features_are_put_back_in_raster_order():
    """``features[:, 1 + j]`` belongs to token ``shuffle[:, j]``: in raster order, token ``t`` is at position ``t``."""
    g = torch.Generator().manual_seed(0)
    shuffle = torch.stack([torch.randperm(27, generator=g) for _ in range(3)])
    features = torch.cat([torch.full((3, 1, 2), -1.0), shuffle[..., None].float().expand(-1, -1, 2)], dim=1)
    raster = in_raster_order(features, shuffle)
    assert raster.shape == (3, 27, 2)
    assert torch.equal(raster[..., 0], torch.arange(27.0).expand(3, -1))


def test_reconstruction_with_an_oracle_decoder_gives_the_input_back_exactly(monkeypatch):
    """Predictions equal to the normalised target must reconstruct the input: the figure de-normalises."""
    model, _ = build("mae")
    x = structured(2, {"v": (1, PATCH)})["v"][:, 0] * 100 - 40  # HU-like scale and offset

    def oracle(self, x, shuffle, n_visible):
        pred = normalised_patches(x, shuffle[:, n_visible:])
        return Masked(torch.zeros(x.shape[0]), pred, shuffle, torch.zeros(0), torch.zeros(0))

    monkeypatch.setattr(MaskedAutoencoder, "masked_autoencode", oracle)
    masked, recon = model.reconstruct(x)
    torch.testing.assert_close(recon, x, rtol=0, atol=1e-3)
    hidden = (masked == 0).float().mean().item()
    assert abs(hidden - 0.75) < 0.02 and torch.equal(masked[masked != 0], x[masked != 0])


# ---------------------------------------------------------------------------------------------------------- GL-MAE

def test_gl_mae_loss_is_its_weighted_components(monkeypatch):
    model, _ = build("gl_mae", global_weight=0.3, local_weight=0.7)
    out = model(structured(2, model.settings.views(PATCH)))
    assert set(out) == {"loss", "rec_global", "rec_local", "cons_global", "cons_local"}
    expected = out["rec_global"] + out["rec_local"] + 0.3 * out["cons_global"] + 0.7 * out["cons_local"]
    torch.testing.assert_close(out["loss"], expected)
    assert all(out[k] > 0 for k in ("cons_global", "cons_local"))


def test_gl_mae_components_read_their_own_views_and_the_anchors_of_their_own_case(monkeypatch):
    """Reconstruction of the resized global views and of the local views; the consistency of each view's projected
    CLS token with the teacher's anchors of the same case (two cases, so a mix-up across cases shows)."""
    model, settings = build("gl_mae", global_views=2, local_views=3)
    with torch.no_grad():  # a teacher that has drifted from the student, as after EMA steps
        for t in [*model.teacher_encoder.parameters(), *model.teacher_projector.parameters()]:
            t.add_(0.05 * torch.randn_like(t))
    views = structured(2, settings.views(PATCH))
    passes = record(monkeypatch, MaskedAutoencoder, "autoencode")
    normed = []
    final_norm(model.encoder).register_forward_hook(lambda m, i, o: normed.append(o))  # the student's only
    out = model(views)
    ((x, _), student), = passes
    b, p, q = 2, 2, 3
    resized = F.interpolate(views["global"].flatten(0, 1), size=PATCH, mode="trilinear", align_corners=False)
    torch.testing.assert_close(x[:b * p], resized)
    assert torch.equal(x[b * p:], views["local"].flatten(0, 1))
    torch.testing.assert_close(out["rec_global"], student.loss[:b * p].mean())
    torch.testing.assert_close(out["rec_local"], student.loss[b * p:].mean())
    with torch.no_grad():
        anchors = model.teacher_projector(summary(model.teacher_encoder(resized)[0])).view(b, p, -1)
        embedded = model.projector(summary(normed[0]))  # the student's CLS tokens of the masked views
    cos = lambda u, v: F.cosine_similarity(u, v, dim=0)  # noqa: E731
    for key, rows, n in (("cons_global", slice(0, b * p), p), ("cons_local", slice(b * p, None), q)):
        own = embedded[rows].view(b, n, -1)
        expected = sum(2 - 2 * cos(own[c, i], anchors[c, j]) for c in range(b) for i in range(n) for j in range(p))
        torch.testing.assert_close(out[key], expected / (b * n * p), rtol=1e-5, atol=1e-6)


def test_gl_mae_projector_learns_from_the_consistency():
    model, _ = build("gl_mae", global_weight=1.0, local_weight=1.0)
    out = model(structured(2, model.settings.views(PATCH)))
    (out["cons_global"] + out["cons_local"]).backward()
    assert model.projector[0].weight.grad.abs().sum() > 0 and model.projector[2].weight.grad.abs().sum() > 0


def test_gl_mae_teacher_gets_no_gradient_and_sees_unmasked_global_views(monkeypatch):
    model, settings = build("gl_mae")
    views = structured(2, settings.views(PATCH))
    seen = {}
    teacher_forward = type(model.teacher_encoder).forward
    monkeypatch.setattr(type(model.teacher_encoder), "forward",
                        lambda self, x, keep=None, **kw: (seen.setdefault(id(self), (x, keep)),
                                                          teacher_forward(self, x, keep, **kw))[1])
    out = model(views)
    x, keep = seen[id(model.teacher_encoder)]
    assert keep is None and x.shape == (2, 1, *PATCH)  # whole (unmasked) global views, resized to the patch
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher_encoder.parameters())
    assert all(p.grad is None for p in model.teacher_projector.parameters())
    assert all(p.grad is not None for p in model.encoder.parameters())
    model.train()
    assert model.encoder.training and not model.teacher_encoder.training and not model.teacher_projector.training


@pytest.mark.parametrize("progress", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0, 1.5])
def test_gl_mae_ema_momentum_rises_to_one_along_a_half_cosine(progress):
    """teacher <- m teacher + (1 - m) student with m = 1 - (1 - m0)(cos(pi progress) + 1) / 2 (BYOL, DINO), for the
    encoder and the projector; past the end of the run (progress > 1) m stays 1."""
    model, settings = build("gl_mae")
    with torch.no_grad():
        for t in [*model.teacher_encoder.parameters(), *model.teacher_projector.parameters()]:
            t.zero_()
        for s in [*model.encoder.parameters(), *model.projector.parameters()]:
            s.fill_(1.0)
    model.step_done(progress)
    m = 1 - (1 - settings.ema_momentum) * (math.cos(math.pi * min(progress, 1.0)) + 1) / 2
    for t in [*model.teacher_encoder.parameters(), *model.teacher_projector.parameters()]:
        torch.testing.assert_close(t, torch.full_like(t, 1 - m), rtol=1e-6, atol=1e-9)


def test_gl_mae_global_views_are_resized_regions_larger_than_the_patch():
    settings = methods.make_settings("gl_mae", {})
    assert settings.views((96, 96, 96)) == {"global": (2, (160, 160, 160)), "local": (6, (96, 96, 96))}


# ------------------------------------------------------------------------------------------------------------ MiM

def labelled_grid(size: tuple[int, int, int]) -> torch.Tensor:
    """``[1, 1, *size]`` whose voxel value is its raster index: every region says where it came from."""
    return torch.arange(math.prod(size), dtype=torch.float64).view(1, 1, *size)


def test_mim_octants_are_true_octants_of_the_token_grid_and_of_the_region():
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
    features = torch.randn(2, octant.numel(), 5)  # per-token features in raster order -> their mean per octant
    expected = torch.stack([features[:, octant.flatten() == o].mean(1) for o in range(8)], dim=1)
    torch.testing.assert_close(MiM.octant_means(features, grid), expected)


def test_mim_figure_masks_as_the_middle_level():
    """The reconstruction figure shows a patch-sized volume masked at the middle level's ratio."""
    model, settings = build("mim", mask_ratio_up=0.25, mask_ratio_mid=0.6)
    x = structured(1, {"v": (1, PATCH)})["v"][:, 0] + 10  # no voxel is 0 before masking
    masked, _ = model.reconstruct(x)
    assert (masked == 0).float().mean().item() == 1 - int(8 * (1 - 0.6)) / 8  # 5 of 8 tokens


def test_mim_token_volumes_are_the_voxels_of_the_tokens():
    x = labelled_grid((8, 8, 16))
    vols = token_volumes(x, torch.tensor([[0, 5]]), (4, 4, 8))  # grid 2 x 2 x 2; token 5 = (1, 0, 1)
    torch.testing.assert_close(vols[0], x[0, :, 0:4, 0:4, 0:8])
    torch.testing.assert_close(vols[1], x[0, :, 4:8, 0:4, 8:16])


def test_mim_levels_nest_and_align_with_their_own_octant_and_token(monkeypatch):
    """Middle volumes are exactly octants masked at the coarse level, fine volumes masked tokens of those; each
    reconstruction loss is the one of its level, and each alignment's target is the octant / token a volume came
    from (recovered here from the voxels)."""
    model, settings = build("mim")
    passes = record(monkeypatch, MaskedAutoencoder, "masked_autoencode")
    aligns = record(monkeypatch, MiM, "align")
    # a 64^3 region of 4^3 blocks of 16^3 voxels (one token each at native resolution), each block valued by its id
    blocks = torch.arange(64, dtype=torch.float32).view(4, 4, 4)
    whole = blocks.repeat_interleave(16, 0).repeat_interleave(16, 1).repeat_interleave(16, 2)[None, None]
    torch.manual_seed(3)
    out = model({"region": whole.expand(2, 1, 1, -1, -1, -1)})
    ((_, up_shuffle, up_visible), up), ((mid, mid_shuffle, mid_visible), mid_out), ((fine, _, fine_visible), down) \
        = passes
    for key, level in (("rec_up", up), ("rec_mid", mid_out), ("rec_down", down)):
        torch.testing.assert_close(out[key], level.loss.mean())
    # each level masks its own ratio: 4 of 8 octants (one token each), 8 - int(8 x 0.4) and 8 - int(8 x 0.5) tokens
    assert (settings.mask_ratio_up, settings.mask_ratio_mid, settings.mask_ratio_down) == (0.5, 0.6, 0.5)
    assert (up_visible, mid_visible, fine_visible) == (4, 3, 4)
    octant = token_octants(model.encoder.grid(PATCH))
    masked = [set(octant[up_shuffle[b, up_visible:]].tolist()) for b in range(2)]
    visible = [set(octant[up_shuffle[b, :up_visible]].tolist()) for b in range(2)]
    assert all(len(m) == 4 and not (m & v) for m, v in zip(masked, visible))  # whole octants are masked
    m, k = settings.mid_samples, settings.down_samples
    ((_, octant_candidates, octant_targets), _), ((_, token_candidates, token_targets), _) = aligns

    def raster(features, shuffle):  # written out: the decoder output at position 1 + j is token shuffle[:, j]'s
        tokens = torch.empty(features.shape[0], shuffle.shape[1], features.shape[2])
        for b, row in enumerate(shuffle.tolist()):
            for j, t in enumerate(row):
                tokens[b, t] = features[b, 1 + j]
        return tokens

    with torch.no_grad():  # queries: a middle / fine volume's decoder tokens (CLS left out), mean-pooled
        torch.testing.assert_close(aligns[0][0][0], model.align_mid(mid_out.features[:, 1:].mean(1)).view(2, m, -1))
        torch.testing.assert_close(aligns[1][0][0], model.align_down(down.features[:, 1:].mean(1)).view(2 * m, k, -1))
    with torch.no_grad():  # candidates: the coarse features of each octant, the middle features of each token
        coarse = raster(up.features, up_shuffle)
        means = torch.stack([coarse[:, octant == o].mean(1) for o in range(8)], dim=1)
        torch.testing.assert_close(octant_candidates, model.align_up(means))
        torch.testing.assert_close(token_candidates, model.align_mid_tokens(raster(mid_out.features, mid_shuffle)))
    for i in range(2 * m):  # middle volume i: an octant of its case's region that was masked at the coarse level
        o = [o for o in range(8) if torch.equal(mid[i], octant_volumes(whole, torch.tensor([[o]]))[0])]
        assert len(o) == 1 and o[0] in masked[i // m], i
        assert octant_targets[i // m, i % m] == o[0], "up<->mid: the middle volume's own octant"
        corner = torch.tensor([o[0] >> 2, (o[0] >> 1) & 1, o[0] & 1]) * 2  # its first block, in blocks
        for j in range(k):  # fine volume: one constant block, a token of middle volume i that was masked there
            values = fine[i * k + j].unique()
            assert values.numel() == 1
            block = torch.tensor([int(values) // 16, (int(values) // 4) % 4, int(values) % 4]) - corner
            assert ((block >= 0) & (block < 2)).all()
            token = int(block[0] * 4 + block[1] * 2 + block[2])
            assert token in mid_shuffle[i, mid_visible:].tolist(), (i, j)
            assert token_targets[i, j] == token, "mid<->down: the fine volume's own token"


def test_mim_coarse_mask_hides_whole_octants_and_names_them():
    """round(8 x mask_ratio_up) octants are masked (as the settings check counts them): exactly their tokens follow
    the visible ones, and the octants returned are those, in random order (the middle level takes the first ones)."""
    model, _ = build("mim", mask_ratio_up=0.6)
    grid = (4, 4, 4)  # 8 tokens per octant
    octant = token_octants(grid)
    torch.manual_seed(0)
    shuffle, n_visible, masked = model.octant_shuffle(4, grid, torch.device("cpu"))
    assert masked.shape == (4, 5) and n_visible == 3 * 8
    for row, hidden in zip(shuffle, masked.tolist()):
        assert sorted(row.tolist()) == list(range(64))
        assert set(octant[row[n_visible:]].tolist()) == set(hidden)
        assert set(octant[row[:n_visible]].tolist()) == set(range(8)) - set(hidden)
    assert len({tuple(m) for m in masked.tolist()}) > 1
    assert any(m[0] != min(m) for m in masked.tolist())  # not sorted: the middle level takes the first ones


def test_mim_loss_is_its_weighted_components():
    model, _ = build("mim", align_weight=0.3)
    out = model(structured(2, model.settings.views(PATCH)))
    assert set(out) == {"loss", "rec_up", "rec_mid", "rec_down", "align_up_mid", "align_mid_down"}
    expected = out["rec_up"] + out["rec_mid"] + out["rec_down"] + 0.3 * (out["align_up_mid"] + out["align_mid_down"])
    torch.testing.assert_close(out["loss"], expected)


@pytest.mark.parametrize("alignment", ["byol", "ce"])
def test_mim_alignment_scores_each_query_against_its_target(alignment):
    """A query equal to its own candidate scores best (byol: 0); the same query against another target scores worse;
    ce divides the cosines by its temperature."""
    model, _ = build("mim", alignment=alignment, ce_temperature=0.5)
    g = torch.Generator().manual_seed(0)
    candidates = torch.randn(3, 8, 16, generator=g)
    target = torch.tensor([[5, 1], [0, 7], [3, 3]])
    query = take_tokens(candidates, target)
    right, wrong = model.align(query, candidates, target), model.align(query, candidates, (target + 1) % 8)
    assert right < wrong
    cos = F.cosine_similarity(query[:, :, None], candidates[:, None], dim=-1)  # [3, 2, 8]
    if alignment == "byol":
        assert right.item() == pytest.approx(0.0, abs=1e-6)
    else:
        torch.testing.assert_close(right, F.cross_entropy((cos / 0.5).flatten(0, 1), target.flatten()))


@pytest.mark.parametrize("alignment", ["byol", "ce"])
def test_mim_alignment_uses_the_coarse_features_and_runs(alignment):
    model, settings = build("mim", alignment=alignment)
    out = model(structured(2, settings.views(PATCH)))
    assert torch.isfinite(out["align_up_mid"]) and torch.isfinite(out["align_mid_down"])
    out["align_up_mid"].backward()
    assert model.align_up[0].weight.grad.abs().sum() > 0  # the coarse-level head takes part
    assert model.align_mid[0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------ numerics

def near_pairs(n: int = 24, p: int = 2, d: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Students close to their anchors, where ``2 - 2 cos`` is small and bf16 cosines lose it."""
    g = torch.Generator().manual_seed(0)
    anchors = torch.randn(n, p, d, generator=g)
    return anchors + 0.1 * torch.randn(n, p, d, generator=g), anchors


def test_consistency_and_alignment_are_computed_in_float32_under_autocast():
    students, anchors = near_pairs()
    model, _ = build("mim", alignment="ce")
    target = torch.zeros(24, 2, dtype=torch.long)
    for loss in (lambda s: consistency(s, anchors), lambda s: model.align(s, anchors, target)):
        s32 = students.clone().requires_grad_(True)
        value = loss(s32)
        value.backward()
        s16 = students.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = loss(s16)
        mixed.backward()
        assert mixed.dtype == torch.float32
        torch.testing.assert_close(mixed, value, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(s16.grad, s32.grad, rtol=1e-4, atol=1e-8)


# ------------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("name,given,patch,message", [
    ("gl_mae", {"global_size": [16, 32, 32]}, (32, 32, 32), "smaller than --patch-size"),
    ("mim", {}, (16, 32, 32), "even number of tokens"),
    ("mim", {}, (64, 96, 32), "would stretch it 4 x 6 x 2"),
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
