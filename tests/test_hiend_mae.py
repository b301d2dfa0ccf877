"""The Hi-End-MAE model: masking, encoder taps, decoder wiring, loss on masked patches only, parameter names."""
import math

import pytest
import torch

from nnunetv2_hiendmae.presets import encoder_config
from nnunetv2_hiendmae.vit import patchify, unpatchify
from pretrain.methods import MaskedCropsSettings
from pretrain.methods.hiend_mae import DECODER_PRESETS, HiEndMAE


def tiny(token: int = 16, channels: int = 1, mask_ratio: float = 0.75) -> HiEndMAE:
    enc = dict(encoder_config("vit_tiny", channels), token_size=token)
    return HiEndMAE(enc, MaskedCropsSettings(mask_ratio=mask_ratio), DECODER_PRESETS["vit_tiny"])


def run(model: HiEndMAE, x: torch.Tensor, shuffle: torch.Tensor | None = None):
    """``(loss, pred, shuffle)`` of one masked pass, with a random mask unless ``shuffle`` is given."""
    if shuffle is None:
        out = model.autoencode(x, model.settings.mask_ratio)
    else:
        out = model.masked_autoencode(x, shuffle, model.num_visible(shuffle.shape[1], model.settings.mask_ratio))
    return out.loss.mean(), out.pred, out.shuffle


def test_same_loss_as_the_implementation_before_the_method_registry():
    """Same seed, input and mask as a run of the code at 73e4f54 (one model file, conv patch embedding)."""
    torch.manual_seed(0)
    model = tiny()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 32, 32, 48, generator=g)
    shuffle = torch.stack([torch.randperm(12, generator=g) for _ in range(2)])
    loss, _, _ = run(model, x, shuffle)
    assert loss.item() == pytest.approx(1.0237298011779785, rel=1e-6)
    assert model(dict(crops=x[:, None]))["loss"].ndim == 0  # the method's forward: K crops per volume


@pytest.mark.parametrize("token,shape", [(16, (32, 32, 32)), (16, (16, 48, 32)), (12, (24, 36, 12)),
                                         (12, (36, 36, 36))])
@pytest.mark.parametrize("channels", [1, 2])
def test_output_shapes_cubic_and_non_cubic(token, shape, channels):
    model = tiny(token, channels)
    x = torch.randn(3, channels, *shape)
    loss, pred, shuffle = run(model, x)
    n_tokens = math.prod(s // token for s in shape)
    n_masked = n_tokens - int(n_tokens * 0.25)
    assert pred.shape == (3, n_masked, token ** 3 * channels)
    assert shuffle.shape == (3, n_tokens)
    assert loss.ndim == 0 and torch.isfinite(loss)
    masked, recon = model.reconstruct(x)
    assert masked.shape == recon.shape == x.shape


def test_patchify_order_and_inverse():
    x = torch.randn(2, 3, 32, 16, 48)
    p = patchify(x, (16, 16, 16))
    assert p.shape == (2, 2 * 1 * 3, 16 ** 3 * 3)
    # token 1 is grid position (0, 0, 1): voxels [0:16, 0:16, 16:32]; vector ordered (ph, pw, pd, C), channel last
    assert torch.equal(p[0, 1].reshape(16, 16, 16, 3), x[0, :, 0:16, 0:16, 16:32].permute(1, 2, 3, 0))
    assert torch.equal(unpatchify(p, (16, 16, 16), (2, 1, 3), 3), x)


@pytest.mark.parametrize("mask_ratio", [0.75, 0.6, 0.9])
def test_visible_token_count_and_per_sample_masks(mask_ratio):
    model = tiny(mask_ratio=mask_ratio)
    seen = {}
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.__setitem__("n", i[0].shape[1]))
    x = torch.randn(4, 1, 48, 48, 48)  # 27 tokens
    _, _, shuffle = run(model, x)
    n_vis = math.floor(27 * (1 - mask_ratio))
    assert seen["n"] == 1 + n_vis  # CLS + visible tokens only
    visible_sets = {tuple(sorted(row[:n_vis].tolist())) for row in shuffle}
    assert len(visible_sets) > 1  # different masks per sample
    assert all(sorted(row.tolist()) == list(range(27)) for row in shuffle)  # permutations


def test_taps_come_from_the_right_blocks_deep_to_shallow():
    model = tiny()
    assert model.encoder.taps == (1, 2, 3)  # depth 4: d//4, 2d//4, 3d//4 (3, 6, 9 for depth 12)
    block_out, proj_in, proj_out, memory = {}, {}, {}, {}
    for i, blk in enumerate(model.encoder.blocks):
        blk.register_forward_hook(lambda m, inp, out, i=i: block_out.__setitem__(i, out))
    def record_projection(j):
        def hook(module, inp, out):
            proj_in[j], proj_out[j] = inp[0], out
        return hook

    for j, lin in enumerate(model.encoder_to_decoder):
        lin.register_forward_hook(record_projection(j))
    for k, blk in enumerate(model.decoder.cross_attention_blocks):
        blk.register_forward_hook(lambda m, inp, out, k=k: memory.__setitem__(k, inp[1]))
    normed = {}
    model.encoder.norm.register_forward_hook(lambda m, inp, out: normed.__setitem__("x", out))
    run(model, torch.randn(2, 1, 32, 32, 32))
    for j, t in enumerate(model.encoder.taps):
        assert torch.equal(proj_in[j], block_out[t])  # raw (pre-norm) residual stream of the tapped block
    assert torch.equal(proj_in[3], normed["x"])  # the query stream starts from the final normed tokens
    for k, j in enumerate((2, 1, 0)):  # cross-attention blocks see taps deep -> shallow
        assert torch.equal(memory[k], proj_out[j])


def test_loss_is_mse_on_masked_patches_only():
    torch.manual_seed(0)
    model = tiny()
    x = torch.randn(2, 1, 32, 32, 48)
    shuffle = model.random_shuffle(2, 12, x.device)
    n_vis = int(12 * 0.25)
    seen = {}
    model.decoder.head.register_forward_hook(lambda m, i, o: seen.__setitem__("pred", o))
    loss, _, _ = run(model, x, shuffle)
    assert seen["pred"].shape[1] == 12 - n_vis  # the head predicts the masked tokens only
    patches = patchify(x, (16, 16, 16))
    target = torch.stack([patches[b, shuffle[b, n_vis:]] for b in range(2)])
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    expected = ((seen["pred"] - target) ** 2).mean()
    torch.testing.assert_close(loss, expected)

    # Whatever the decoder holds at the CLS and visible positions does not change the loss.
    def corrupt_visible(m, i, o):
        o = o.clone()
        o[:, : 1 + n_vis] += 1000.0
        return o

    handle = model.decoder.cross_attention_blocks[-1].register_forward_hook(corrupt_visible)
    loss_corrupted, _, _ = run(model, x, shuffle)
    handle.remove()
    torch.testing.assert_close(loss_corrupted, loss)
    # ... while the masked positions do
    handle = model.decoder.cross_attention_blocks[-1].register_forward_hook(
        lambda m, i, o: torch.cat([o[:, : 1 + n_vis], o[:, 1 + n_vis:] + torch.randn_like(o[:, 1 + n_vis:])], dim=1))
    assert not torch.allclose(run(model, x, shuffle)[0], loss)
    handle.remove()


def test_decoder_position_embedding_is_added_to_each_token_by_its_position():
    """The masked tokens enter the decoder as identical mask tokens: only the decoder position embedding, added to
    each token for *its own* grid position (in shuffled order), tells them apart. So the predictions differ between
    masked tokens, and re-ordering the masked tokens re-orders the predictions with them. Dropping the embedding makes
    all predictions of a sample equal; adding it in sequence (unshuffled) order leaves them in place instead."""
    torch.manual_seed(1)
    model = tiny(mask_ratio=0.5).eval()
    x = torch.randn(1, 1, 32, 32, 32)  # 8 tokens: 4 visible, 4 masked
    shuffle = torch.randperm(8)[None]
    _, pred_a, _ = run(model, x, shuffle)  # [1, 4, p³]
    assert not torch.allclose(pred_a[0, 0], pred_a[0, 1], atol=1e-3)
    order = torch.tensor([2, 0, 3, 1])
    reordered = torch.cat([shuffle[:, :4], shuffle[:, 4:][:, order]], dim=1)
    _, pred_b, _ = run(model, x, reordered)
    torch.testing.assert_close(pred_b, pred_a[:, order], rtol=1e-4, atol=1e-5)


def test_reference_parameter_names_and_sizes():
    keys = set(tiny().state_dict())
    for name in ("encoder.patch_embed.proj.weight", "encoder.cls_token", "encoder.blocks.0.norm1.weight",
                 "encoder.blocks.0.attn.qkv.bias", "encoder.blocks.3.attn.proj.weight", "encoder.blocks.0.norm2.bias",
                 "encoder.blocks.0.mlp.fc1.weight", "encoder.blocks.0.mlp.fc2.bias", "encoder.norm.weight",
                 "mask_token", "encoder_to_decoder.3.weight", "decoder.blocks.1.attn.qkv.weight",
                 "decoder.cross_attention_blocks.2.cross_attn.kv.weight",
                 "decoder.cross_attention_blocks.0.norm0.weight",
                 "decoder.cross_attention_blocks.0.self_attn.qkv.weight", "decoder.head.bias", "decoder.norm.weight"):
        assert name in keys, name
    # ViT-B/16 Hi-End-MAE has 101.6M trainable parameters, 12.2M in the decoder (reference hi_end_mae_vit_base_16p)
    big = HiEndMAE(encoder_config("vit_b16"), MaskedCropsSettings())
    assert round(sum(p.numel() for p in big.parameters()) / 1e6, 1) == 101.6
    assert round(sum(p.numel() for p in big.decoder.parameters()) / 1e6, 1) == 12.2


def test_no_weight_decay_names_the_tokens_and_position_embeddings():
    model = HiEndMAE(encoder_config("vit_tiny", pos_embed="learned", pos_embed_grid=(2, 2, 2)), MaskedCropsSettings())
    names = dict(model.named_parameters())
    assert model.no_weight_decay() == {"encoder.cls_token", "encoder.pos_embed", "mask_token"}
    assert model.no_weight_decay() <= names.keys()
