"""Every pretraining method on the Primus encoder: the encoder-agnostic component tests of tests/test_methods.py run
again with ``primus_tiny`` (no CLS token: the mean token stands for a view, and no decoder position is lost to a
prefix), plus what only an encoder without a prefix token can get wrong."""
from __future__ import annotations

import pytest
import test_methods
import torch
from test_methods import (  # noqa: F401  (collected again here, on Primus)
    test_compiled_once_no_recompilation_as_masks_change,
    test_every_method_fulfils_the_loop_contract_and_learns_on_a_structured_volume,
    test_gl_mae_components_read_their_own_views_and_the_anchors_of_their_own_case,
    test_gl_mae_ema_momentum_rises_to_one_along_a_half_cosine,
    test_gl_mae_loss_is_its_weighted_components,
    test_gl_mae_projector_learns_from_the_consistency,
    test_gl_mae_teacher_gets_no_gradient_and_sees_unmasked_global_views,
    test_mim_alignment_uses_the_coarse_features_and_runs,
    test_mim_loss_is_its_weighted_components,
    test_reconstruction_loss_is_the_normalised_mse_of_the_masked_tokens_of_every_crop,
    test_reconstruction_with_an_oracle_decoder_gives_the_input_back_exactly,
    test_the_pass_reports_the_encoders_normed_summary,
)

from nnunetv2_hiendmae.primus import PrimusEncoder
from pretrain.methods.masked import MaskedAutoencoder, in_raster_order
from pretrain.methods.mim import MiM


@pytest.fixture(autouse=True)
def primus(monkeypatch):
    monkeypatch.setattr(test_methods, "ARCH", "primus_tiny")


def test_the_methods_run_on_primus():
    model, _ = test_methods.build("hiend_mae")
    assert isinstance(model.encoder, PrimusEncoder) and model.encoder.token_size == (8, 8, 8)


def test_every_token_gets_its_decoder_position_without_a_prefix(monkeypatch):
    """Without a CLS token the decoder stream is the visible tokens then the mask tokens, all with a position: the
    features of a pass hold exactly L tokens and put back in raster order, token t is at position t."""
    model, settings = test_methods.build("mae")
    passes = test_methods.record(monkeypatch, MaskedAutoencoder, "masked_autoencode")
    model(test_methods.structured(1, settings.views(test_methods.PATCH)))
    ((_, shuffle, _), out), = passes
    assert out.features.shape[1] == shuffle.shape[1] == 64
    features = shuffle[..., None].float().expand(-1, -1, 2)  # a prefix-free stream whose features name their token
    torch.testing.assert_close(in_raster_order(features, shuffle)[..., 0], torch.arange(64.0).expand(4, -1))


def test_mim_queries_pool_every_token_of_a_primus_volume(monkeypatch):
    """The alignment queries are the mean of all decoder tokens of a middle / fine volume (no CLS to leave out)."""
    model, settings = test_methods.build("mim")
    passes = test_methods.record(monkeypatch, MaskedAutoencoder, "masked_autoencode")
    aligns = test_methods.record(monkeypatch, MiM, "align")
    model(test_methods.structured(2, settings.views(test_methods.PATCH)))
    (_, (_, mid), (_, down)) = passes
    m, k = settings.mid_samples, settings.down_samples
    with torch.no_grad():
        torch.testing.assert_close(aligns[0][0][0], model.align_mid(mid.features.mean(1)).view(2, m, -1))
        torch.testing.assert_close(aligns[1][0][0], model.align_down(down.features.mean(1)).view(2 * m, k, -1))
