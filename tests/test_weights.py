"""Loading pretraining checkpoints into HiEndUNETR: exact copies, the two documented adaptations, and clear refusals."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nnunetv2_hiendmae.checkpoint import encoder_fingerprint, encoder_state_dict, make_checkpoint, save_atomic
from nnunetv2_hiendmae.encoders import build_encoder
from nnunetv2_hiendmae.errors import UserError
from nnunetv2_hiendmae.network import HiEndUNETR
from nnunetv2_hiendmae.presets import encoder_config
from nnunetv2_hiendmae.vit import interpolate_pos_embed, patchify
from nnunetv2_hiendmae.weights import load_pretrained_encoder, verify_checkpoint

PATCH = (32, 64, 48)


def fake_checkpoint(in_channels: int = 1, **config) -> dict:
    """A pretraining checkpoint with a random encoder and a few decoder tensors, as the pretraining code saves it."""
    torch.manual_seed(1)
    cfg = {**encoder_config("vit_tiny", in_channels=in_channels), **config}
    weights = {f"encoder.{k}": v for k, v in build_encoder(cfg).state_dict().items()}
    weights.update({"mask_token": torch.randn(1, 1, 32), "decoder.norm.weight": torch.ones(32),
                    "decoder.head.weight": torch.randn(16**3 * in_channels, 32)})
    pretrain = {"in_channels": in_channels, "patch_size": [96, 96, 96], "token_size": 16}
    return make_checkpoint(weights, cfg, {"decoder_dim": 32}, pretrain)


def network_for(ckpt: dict, in_channels: int, patch=PATCH) -> HiEndUNETR:
    torch.manual_seed(2)
    encoder = {k: v for k, v in ckpt["encoder"].items() if k != "in_channels"}  # as the plans store it
    return HiEndUNETR(in_channels, 3, patch, encoder, feature_size=4)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, dict]:
    ckpt = fake_checkpoint()
    path = tmp_path / "pretrained.pt"
    save_atomic(ckpt, path)
    return path, ckpt


def test_the_network_takes_its_channel_count_from_nnunet_whatever_the_plans_say():
    """Plans store the encoder without ``in_channels`` (plans of 0.1 had one): nnU-Net's ``input_channels`` rules."""
    enc = encoder_config("vit_tiny")
    for plans_encoder in ({k: v for k, v in enc.items() if k != "in_channels"}, {**enc, "in_channels": 1}):
        net = HiEndUNETR(3, 2, PATCH, plans_encoder, feature_size=4)
        assert net.encoder.patch_embed.proj.weight.shape[1] == 3 and net.encoder_config["in_channels"] == 3


def test_loading_copies_every_encoder_tensor(saved):
    path, _ = saved
    ckpt = verify_checkpoint(str(path), encoder_fingerprint(saved[1]))
    net = network_for(ckpt, 1)
    report = load_pretrained_encoder(net, ckpt)
    source, loaded = encoder_state_dict(ckpt), net.encoder.state_dict()
    assert source.keys() == loaded.keys()
    for key, value in source.items():
        assert torch.equal(loaded[key], value), key
    assert sorted(report.loaded) == sorted(source) and report.adapted == []
    assert report.summary() == f"pretrained encoder: {len(source)} tensors loaded, 0 adapted"


def test_single_channel_stem_is_repeated_and_divided_over_three_channels():
    ckpt = fake_checkpoint(in_channels=1)
    net = network_for(ckpt, 3)
    report = load_pretrained_encoder(net, ckpt)
    w = encoder_state_dict(ckpt)["patch_embed.proj.weight"]  # [E, 1, p, p, p]
    assert torch.equal(net.encoder.patch_embed.proj.weight, w.repeat(1, 3, 1, 1, 1) / 3)
    assert report.adapted == ["patch_embed.proj.weight: 1 -> 3 input channels, repeated and divided by 3"]
    assert "1 adapted" in report.summary() and "divided by 3" in report.summary()
    x = torch.randn(1, 1, 16, 16, 16)  # the rule: C identical copies give the pretrained stem response
    pretrained = build_encoder(ckpt["encoder"])
    pretrained.load_state_dict(encoder_state_dict(ckpt))
    token = net.encoder.token_size
    assert torch.allclose(net.encoder.patch_embed(patchify(x.repeat(1, 3, 1, 1, 1), token)),
                          pretrained.patch_embed(patchify(x, token)), atol=1e-5)


def test_learned_pos_embed_is_interpolated_to_the_patch_grid():
    ckpt = fake_checkpoint(pos_embed="learned", pos_embed_grid=[6, 6, 6])
    net = network_for(ckpt, 1)
    report = load_pretrained_encoder(net, ckpt)
    expected = interpolate_pos_embed(encoder_state_dict(ckpt)["pos_embed"], (6, 6, 6), (2, 4, 3))
    assert torch.equal(net.encoder.pos_embed, expected)
    assert report.adapted == ["pos_embed: token grid (6, 6, 6) -> (2, 4, 3), trilinear interpolation"]


@pytest.mark.parametrize("change, message", [
    ({"embed_dim": 48}, "embed_dim is 96 in the checkpoint but 48"),
    ({"depth": 2}, "depth is 4 in the checkpoint but 2"),
    ({"num_heads": 2}, "num_heads is 4 in the checkpoint but 2"),
    ({"token_size": 8}, r"token_size is \(16, 16, 16\) in the checkpoint but \(8, 8, 8\)"),
    ({"pos_embed": "learned", "pos_embed_grid": [2, 4, 3]}, "pos_embed is sincos in the checkpoint but learned"),
])
def test_architecture_mismatch_is_refused(change, message):
    ckpt = fake_checkpoint()
    net = HiEndUNETR(1, 3, PATCH, {**ckpt["encoder"], **change}, feature_size=4)
    with pytest.raises(UserError, match=message):
        load_pretrained_encoder(net, ckpt)


def test_shape_mismatch_names_the_tensor():
    ckpt = fake_checkpoint()
    ckpt["weights"]["encoder.blocks.0.mlp.fc1.weight"] = torch.zeros(10, 96)
    message = r"blocks\.0\.mlp\.fc1\.weight has shape \(10, 96\) in the checkpoint but \(384, 96\)"
    with pytest.raises(UserError, match=message):
        load_pretrained_encoder(network_for(ckpt, 1), ckpt)


def test_missing_encoder_tensor_is_refused():
    ckpt = fake_checkpoint()
    del ckpt["weights"]["encoder.norm.bias"]
    with pytest.raises(UserError, match=r"missing \['norm\.bias'\]"):
        load_pretrained_encoder(network_for(ckpt, 1), ckpt)


def test_two_channel_checkpoint_into_three_channels_is_refused():
    ckpt = fake_checkpoint(in_channels=2)
    with pytest.raises(UserError, match="cannot adapt 2-channel checkpoint to 3 input channels"):
        load_pretrained_encoder(network_for(ckpt, 3), ckpt)


def test_changed_checkpoint_is_refused(saved):
    path, _ = saved
    message = r"changed since the plans were written: .*encoder sha256 [0-9a-f]{12}\.\.\., the plans expect 0{12}"
    with pytest.raises(UserError, match=message):
        verify_checkpoint(str(path), "0" * 64)


def test_unchecked_checkpoint_loads(saved):
    path, ckpt = saved
    assert verify_checkpoint(str(path), None)["encoder"] == ckpt["encoder"]


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        verify_checkpoint(str(tmp_path / "nope.pt"), None)


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_unreadable_file_says_what_it_is_not(saved, damage):
    path, _ = saved
    path.write_bytes({"truncated": path.read_bytes()[:1000], "empty": b"", "text": b"hello"}[damage])
    with pytest.raises(UserError) as e:
        verify_checkpoint(str(path), None)
    message = str(e.value)
    assert message.startswith(f"{path} is not a readable checkpoint (truncated, corrupt or not a torch file")
    assert "weights_only=False" not in message and "\n" not in message  # never the advice to unpickle


def test_torch_file_with_python_objects_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "args": UserError("any object")}, path)
    with pytest.raises(UserError, match="holds Python objects besides tensors.*weights_only=True"):
        verify_checkpoint(str(path), None)


@pytest.mark.parametrize("content,extra", [
    ({"weights": {"encoder.norm.weight": torch.ones(3)}}, "found weights"),  # a dict without our 'format'
    ({"state_dict": {"module.encoder.norm.weight": torch.ones(3)}}, "convert it with nnUNetv2_hiendmae_import"),
])
def test_foreign_file_is_refused(tmp_path, content, extra):
    path = tmp_path / "foreign.pt"
    torch.save(content, path)
    with pytest.raises(UserError, match=r"is a torch file but not a nnunetv2_hiendmae pretraining checkpoint: "
                                        r"expected the keys format, method, .*weights") as e:
        verify_checkpoint(str(path), None)
    assert extra in str(e.value)


def test_plans_pin_the_encoder_not_the_file_bytes(saved):
    path, ckpt = saved
    pinned = encoder_fingerprint(ckpt)
    rewritten = {**ckpt, "pretrain": {**ckpt["pretrain"], "note": "saved again"}}  # other bytes, same encoder
    save_atomic(rewritten, path)
    assert verify_checkpoint(str(path), pinned)["pretrain"]["note"] == "saved again"
    changed = {**ckpt, "weights": {**ckpt["weights"], "encoder.norm.bias": ckpt["weights"]["encoder.norm.bias"] + 1}}
    save_atomic(changed, path)
    with pytest.raises(UserError, match="changed since the plans were written"):
        verify_checkpoint(str(path), pinned)
