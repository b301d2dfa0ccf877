"""HiEndUNETR on CPU: output shapes for every decoder path, the nnU-Net contract, and which encoder outputs it uses."""
from __future__ import annotations

import pytest
import torch

from nnunetv2_hiendmae.network import HiEndUNETR, ResizeUpBlock
from nnunetv2_hiendmae.presets import encoder_config

TINY = encoder_config("vit_tiny")


def tiny(**overrides) -> dict:
    return {**TINY, **overrides}


@pytest.mark.parametrize(
    "encoder, patch",
    [
        (TINY, (32, 64, 48)),  # non-cubic, token 16: four x2 steps
        (TINY, (16, 32, 32)),  # a 1x2x2 token grid
        (tiny(token_size=12), (24, 36, 48)),  # the released model's token: last stage x1.5 by resizing
        (tiny(token_size=24), (24, 48, 24)),  # last stage a x3 transposed conv
        (tiny(token_size=[16, 16, 12]), (32, 16, 24)),  # anisotropic token
    ],
)
def test_output_is_input_sized_logits(encoder, patch):
    torch.manual_seed(0)
    net = HiEndUNETR(2, 3, patch, encoder, feature_size=4)
    out = net(torch.randn(2, 2, *patch))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 3, *patch)


def test_token_12_uses_the_resizing_last_stage():
    assert isinstance(HiEndUNETR(1, 2, (24, 24, 24), tiny(token_size=12)).decoder2, ResizeUpBlock)
    assert not isinstance(HiEndUNETR(1, 2, (32, 32, 32), TINY).decoder2, ResizeUpBlock)


def test_rejects_a_patch_that_is_not_a_multiple_of_the_token_size():
    with pytest.raises(ValueError, match="multiple of the token size"):
        HiEndUNETR(1, 2, (32, 40, 32), TINY)


def test_deep_supervision_is_ignored():
    patch = (16, 32, 16)
    nets = [HiEndUNETR(1, 2, patch, TINY, feature_size=4, deep_supervision=ds) for ds in (True, False)]
    shapes = [{k: v.shape for k, v in net.state_dict().items()} for net in nets]
    assert list(shapes[0]) == list(shapes[1]) and shapes[0] == shapes[1]
    assert nets[0].deep_supervision is True
    assert isinstance(nets[0](torch.randn(1, 1, *patch)), torch.Tensor)
    assert not hasattr(nets[0], "initialize")  # nnU-Net would run network.apply(network.initialize)


def test_encoder_keys_match_the_pretraining_encoder():
    from nnunetv2_hiendmae.encoders import build_encoder

    net = HiEndUNETR(3, 2, (16, 16, 16), TINY)
    expected = {f"encoder.{k}": v.shape for k, v in build_encoder(TINY, in_channels=3).state_dict().items()}
    assert {k: v.shape for k, v in net.state_dict().items() if k.startswith("encoder.")} == expected


def test_learned_pos_embed_lives_on_the_patch_grid():
    net = HiEndUNETR(1, 2, (32, 64, 48), tiny(pos_embed="learned", pos_embed_grid=[6, 6, 6]))
    assert net.encoder.pos_embed.shape == (1, 2 * 4 * 3, 96)
    assert net.encoder_config["pos_embed_grid"] == [2, 4, 3]


def test_gradients_reach_every_encoder_parameter():
    torch.manual_seed(0)
    net = HiEndUNETR(1, 2, (16, 32, 16), tiny(depth=8), feature_size=4)
    net(torch.randn(1, 1, 16, 32, 16)).square().mean().backward()
    for name, p in net.encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def run_with_perturbed_encoder(net: HiEndUNETR, x: torch.Tensor, index: int | None, tokens: slice) -> torch.Tensor:
    """Forward with one encoder output perturbed on the given token positions, leaving the residual stream intact.

    ``index`` picks ``hidden[index]``; ``None`` picks the final normed output.
    """
    forward = net.encoder.forward

    def perturbed(inp):
        normed, hidden = forward(inp)
        hidden = list(hidden)
        target = normed if index is None else hidden[index]
        target = target.clone()
        target[:, tokens] += 1.0
        if index is None:
            return target, hidden
        hidden[index] = target
        return normed, hidden

    net.encoder.forward = perturbed
    try:
        return net(x)
    finally:
        del net.encoder.forward


def test_skips_come_from_the_tapped_blocks_and_the_bottleneck_from_the_normed_output():
    torch.manual_seed(0)
    net = HiEndUNETR(1, 2, (16, 32, 16), tiny(depth=8), feature_size=4).eval()
    assert net.encoder.taps == (2, 4, 6)
    x = torch.randn(1, 1, 16, 32, 16)
    with torch.no_grad():
        ref = net(x)
        for index in [*range(8), None]:
            out = run_with_perturbed_encoder(net, x, index, slice(1, None))
            used = index is None or index in net.encoder.taps
            assert (not torch.allclose(out, ref)) == used, f"hidden[{index}] used={used}"
            if used:
                cls_only = run_with_perturbed_encoder(net, x, index, slice(0, 1))
                assert torch.equal(cls_only, ref), f"the CLS token of {index} reached the decoder"


@pytest.mark.parametrize("token", [(16, 16, 16), (12, 12, 12), (8, 16, 12)])
@pytest.mark.parametrize("channels", [1, 3])
def test_patch_embedding_gemm_equals_the_convolution(token, channels):
    """The embedding is a GEMM on patchified voxels, stored as the reference's Conv3d: both must agree exactly
    (fp32 rounding), for cubic and non-cubic tokens and several channels, on all patches and on a subset."""
    from nnunetv2_hiendmae.vit import PatchEmbed3D, patchify, take_tokens

    torch.manual_seed(0)
    embed = PatchEmbed3D(channels, 24, token)
    x = torch.randn(2, channels, *(t * g for t, g in zip(token, (2, 3, 1))))
    conv = embed.proj(x).flatten(2).transpose(1, 2)  # [B, L, E]
    patches = patchify(x, token)
    torch.testing.assert_close(embed(patches), conv, rtol=1e-5, atol=1e-5)
    keep = torch.tensor([[5, 0, 2], [1, 4, 3]])
    torch.testing.assert_close(embed(take_tokens(patches, keep)), take_tokens(conv, keep), rtol=1e-5, atol=1e-5)


def test_network_class_constant_names_the_network():
    import pydoc

    from nnunetv2_hiendmae.presets import NETWORK_CLASS

    assert pydoc.locate(NETWORK_CLASS) is HiEndUNETR


def _saved_bytes(net: HiEndUNETR, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes autograd keeps from one forward (each storage once, parameters excluded), and the loss."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = net(x).square().mean()
    return sum(seen.values()), loss


def test_recomputing_the_full_resolution_blocks_keeps_gradients_and_frees_their_activations():
    torch.manual_seed(0)
    plain = HiEndUNETR(1, 3, (16, 32, 32), TINY)
    recompute = HiEndUNETR(1, 3, (16, 32, 32), TINY, recompute_full_resolution=True)
    recompute.load_state_dict(plain.state_dict())
    assert recompute.state_dict().keys() == plain.state_dict().keys()  # no parameter added: checkpoints load alike
    x = torch.randn(2, 1, 16, 32, 32)
    (kept, loss), (kept_recomputed, loss_recomputed) = _saved_bytes(plain, x), _saved_bytes(recompute, x)
    assert torch.equal(loss, loss_recomputed)
    loss.backward()
    loss_recomputed.backward()
    for (name, a), b in zip(plain.named_parameters(), recompute.parameters()):
        assert torch.equal(a.grad, b.grad), name  # bit for bit: the blocks are deterministic
    full_res = 16 * 2 * 16 * 32 * 32 * 4  # one fp32 tensor of feature_size channels at full resolution
    # the stem keeps 5 such tensors and the last decoder block 7 (its 32-channel concat counts twice); recomputed,
    # their outputs stay (the stem's is the last block's skip input, the last block's the output layer's input)
    assert kept - kept_recomputed == pytest.approx(10 * full_res, rel=1e-3)
    with torch.no_grad():  # inference: nothing to recompute, the plain path
        assert torch.equal(recompute(x), plain(x))


def test_recomputation_traces_under_torch_compile():
    """nnU-Net compiles the network by default on CUDA: the recomputed blocks must trace (dynamo and AOT autograd;
    the backend that needs no compiler) and give the eager loss and gradients."""
    torch.manual_seed(0)
    net = HiEndUNETR(1, 3, (16, 32, 32), TINY, recompute_full_resolution=True)
    x = torch.randn(2, 1, 16, 32, 32)
    net(x).square().mean().backward()
    eager = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    torch.compile(net, backend="aot_eager", fullgraph=True)(x).square().mean().backward()
    for (name, p), g in zip(net.named_parameters(), eager):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6, msg=name)
