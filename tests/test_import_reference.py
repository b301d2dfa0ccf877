"""nnUNetv2_hiendmae_import: a checkpoint in the reference Hi-End-MAE layout becomes our format, and our encoder
built from the result computes what the reference encoder computes with those weights.

The reference encoder is re-implemented here with plain functional ops from the reference semantics
(FengheTan9/Hi-End-MAE ``networks/vit.py``, ``hi_end_mae.py``), independently of ``nnunetv2_hiendmae.vit``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunetv2_hiendmae.checkpoint import FORMAT, encoder_state_dict, load_checkpoint
from nnunetv2_hiendmae.encoders import build_encoder
from pretrain.import_reference import main

E, DEPTH, HEADS, P, C = 96, 4, 4, 16, 1  # vit_tiny
DEC, DEC_SELF, DEC_CROSS = 48, 2, 3
GRID = (6, 6, 6)  # 96^3 crop / token 16
L = GRID[0] * GRID[1] * GRID[2]
CONSOLE = Path(sys.executable).parent / "nnUNetv2_hiendmae_import"


def _ln(g: torch.Generator, prefix: str, dim: int) -> dict:
    return {f"{prefix}.weight": 1 + 0.1 * torch.randn(dim, generator=g),
            f"{prefix}.bias": 0.1 * torch.randn(dim, generator=g)}


def _lin(g: torch.Generator, prefix: str, out: int, inp: int) -> dict:
    return {f"{prefix}.weight": torch.randn(out, inp, generator=g) * inp ** -0.5,
            f"{prefix}.bias": 0.05 * torch.randn(out, generator=g)}


def _block(g: torch.Generator, prefix: str, dim: int) -> dict:
    return {**_ln(g, f"{prefix}.norm1", dim), **_lin(g, f"{prefix}.attn.qkv", 3 * dim, dim),
            **_lin(g, f"{prefix}.attn.proj", dim, dim), **_ln(g, f"{prefix}.norm2", dim),
            **_lin(g, f"{prefix}.mlp.fc1", 4 * dim, dim), **_lin(g, f"{prefix}.mlp.fc2", dim, 4 * dim)}


def reference_state_dict(pos: str = "sincos", in_channels: int = C, depth: int = DEPTH, seed: int = 0) -> dict:
    """Random weights for a vit_tiny Hi-End-MAE, keys as the reference model's ``state_dict()`` (no prefix)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"mask_token": 0.02 * torch.randn(1, 1, DEC, generator=g)}
    sd["encoder_pos_embed"] = (sincos_reference(GRID, E) if pos == "sincos"
                               else 0.02 * torch.randn(1, L, E, generator=g))
    sd["decoder_pos_embed"] = sincos_reference(GRID, DEC)
    sd["encoder.cls_token"] = 0.02 * torch.randn(1, 1, E, generator=g)
    fan_in = in_channels * P ** 3
    sd["encoder.patch_embed.proj.weight"] = torch.randn(E, in_channels, P, P, P, generator=g) * fan_in ** -0.5
    sd["encoder.patch_embed.proj.bias"] = 0.05 * torch.randn(E, generator=g)
    for i in range(depth):
        sd.update(_block(g, f"encoder.blocks.{i}", E))
    sd.update(_ln(g, "encoder.norm", E))
    for i in range(DEC_SELF):
        sd.update(_block(g, f"decoder.blocks.{i}", DEC))
    for i in range(DEC_CROSS):
        b = f"decoder.cross_attention_blocks.{i}"
        sd.update({**_ln(g, f"{b}.norm0", DEC), **_lin(g, f"{b}.self_attn.qkv", 3 * DEC, DEC),
                   **_lin(g, f"{b}.self_attn.proj", DEC, DEC), **_ln(g, f"{b}.norm1", DEC),
                   **_lin(g, f"{b}.cross_attn.q", DEC, DEC), **_lin(g, f"{b}.cross_attn.kv", 2 * DEC, DEC),
                   **_lin(g, f"{b}.cross_attn.proj", DEC, DEC), **_ln(g, f"{b}.norm2", DEC),
                   **_lin(g, f"{b}.mlp.fc1", 4 * DEC, DEC), **_lin(g, f"{b}.mlp.fc2", DEC, 4 * DEC)})
    sd.update(_ln(g, "decoder.norm", DEC))
    sd.update(_lin(g, "decoder.head", in_channels * P ** 3, DEC))
    for i in range(4):
        sd.update(_lin(g, f"encoder_to_decoder.{i}", DEC, E))
    return sd


def sincos_reference(grid, dim, temperature=10000.0) -> torch.Tensor:
    """The reference ``build_3d_sincos_position_embedding`` (num_tokens=0), written out again."""
    gh, gw, gd = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in grid], indexing="ij")
    f = dim // 6
    omega = 1.0 / temperature ** (torch.arange(f, dtype=torch.float32) / f)
    outs = [torch.einsum("m,d->md", a.flatten(), omega) for a in (gh, gw, gd)]
    return torch.cat([t for o in outs for t in (torch.sin(o), torch.cos(o))], dim=1)[None]


def write_reference(path: Path, sd: dict, prefix: str = "module.", wrap: bool = True, **extra) -> Path:
    sd = {prefix + k: v for k, v in sd.items()}
    torch.save({"state_dict": sd, "epoch": 3, **extra} if wrap else sd, path)
    return path


def reference_encoder(sd: dict, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The reference encoder forward on all tokens, from its semantics (float64)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    b, c, h, w, d = x.shape
    g = (h // P, w // P, d // P)
    # patchify_image: [B, C, gh, ph, gw, pw, gd, pd] -> [B, L, (ph, pw, pd, C)]
    patches = x.reshape(b, c, g[0], P, g[1], P, g[2], P).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, -1, P ** 3 * c)
    # PatchEmbed3D: each vector viewed as (ph, pw, pd, C), permuted to (C, ph, pw, pd), Conv3d with one output voxel
    wconv = sd["encoder.patch_embed.proj.weight"]
    tokens = patches @ wconv.permute(0, 2, 3, 4, 1).reshape(wconv.shape[0], -1).T + sd["encoder.patch_embed.proj.bias"]
    tokens = tokens + sd["encoder_pos_embed"]
    z = torch.cat([sd["encoder.cls_token"].expand(b, -1, -1), tokens], dim=1)  # CLS gets a zero pos-embed
    n, e = z.shape[1], z.shape[2]
    hd = e // HEADS

    def ln(t, name):
        return F.layer_norm(t, (e,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)

    def lin(t, name):
        return t @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    hidden = []
    for i in range(DEPTH):
        pre = f"encoder.blocks.{i}"
        qkv = lin(ln(z, f"{pre}.norm1"), f"{pre}.attn.qkv").reshape(b, n, 3, HEADS, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * hd ** -0.5).softmax(dim=-1)
        z = z + lin((attn @ v).transpose(1, 2).reshape(b, n, e), f"{pre}.attn.proj")
        z = z + lin(F.gelu(lin(ln(z, f"{pre}.norm2"), f"{pre}.mlp.fc1")), f"{pre}.mlp.fc2")
        hidden.append(z)
    return ln(z, "encoder.norm"), hidden


def expect_user_error(capsys, argv, needle: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and needle in err[-1], err
    return err[-1]


@pytest.fixture(scope="module")
def sincos_import(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imp")
    sd = reference_state_dict("sincos")
    src = write_reference(tmp / "released.pth", sd)
    out = tmp / "ours.pth"
    main(["-i", str(src), "-o", str(out)])
    return sd, src, out


@pytest.mark.parametrize("pos", ["sincos", "learned"])
def test_encoder_matches_reference(pos, tmp_path, sincos_import):
    if pos == "sincos":
        sd, _, out = sincos_import
    else:
        sd = reference_state_dict("random", seed=1)
        out = tmp_path / "ours.pth"
        main(["-i", str(write_reference(tmp_path / "released.pth", sd)), "-o", str(out)])
    ckpt = load_checkpoint(out)
    assert ckpt["encoder"]["arch"] == "vit_tiny" and ckpt["encoder"]["in_channels"] == 1
    assert ckpt["encoder"]["pos_embed"] == pos
    enc = build_encoder(ckpt["encoder"])
    enc.load_state_dict(encoder_state_dict(ckpt), strict=True)
    enc.eval()
    if pos == "learned":
        assert ckpt["encoder"]["pos_embed_grid"] == list(GRID)
        assert torch.equal(enc.pos_embed.detach(), sd["encoder_pos_embed"])
    else:
        assert "encoder.pos_embed" not in ckpt["weights"]

    x = torch.randn(2, 1, 96, 96, 96, generator=torch.Generator().manual_seed(7))
    ref_normed, ref_hidden = reference_encoder(sd, x)
    # float32 as used (rounding differences of ~1e-5 on values up to ~8), then float64 to pin the semantics down
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-5)):
        with torch.no_grad():
            normed, hidden = enc.to(dtype)(x.to(dtype))
        assert normed.shape == (2, 1 + L, E) and len(hidden) == DEPTH
        torch.testing.assert_close(normed.double(), ref_normed, atol=tol, rtol=tol)
        for ours, ref in zip(hidden, ref_hidden):
            torch.testing.assert_close(ours.double(), ref, atol=tol, rtol=tol)


def test_weights_and_metadata(sincos_import):
    sd, src, out = sincos_import
    ckpt = torch.load(out, map_location="cpu", weights_only=True)  # plain tensors and containers only
    assert ckpt["format"] == FORMAT and ckpt["method"] == "hiend_mae"
    w = ckpt["weights"]
    expected = {k for k in sd if k not in ("encoder_pos_embed", "decoder_pos_embed")}
    assert set(w) == expected
    assert all(torch.equal(w[k], sd[k]) for k in expected)
    assert ckpt["model"] == {"decoder": {"embed_dim": DEC, "num_heads": 4, "self_depth": DEC_SELF,
                                         "cross_depth": DEC_CROSS},
                             "settings": {"mask_ratio": 0.75, "crops_per_volume": 8}}
    pre = ckpt["pretrain"]
    assert pre["spacing"] == [1.5, 1.5, 1.5] and pre["transpose_forward"] == [0, 1, 2]
    assert pre["channel_names"] == {"0": "CT"} and pre["in_channels"] == 1
    assert pre["normalization_schemes"] == ["CTNormalization"] and pre["use_mask_for_norm"] == [False]
    assert pre["foreground_intensity_properties_per_channel"]["0"] == {
        "percentile_00_5": -175.0, "percentile_99_5": 250.0, "mean": -175.0, "std": 425.0,
        "median": 37.5, "min": -175.0, "max": 250.0}
    assert pre["patch_size"] == [96, 96, 96] and pre["token_size"] == [16, 16, 16]
    assert pre["datasets"] == [] and pre["epochs_done"] is None and pre["fold"] is None
    assert pre["plans"] is None and pre["configuration"] is None and pre["epochs_planned"] is None
    import hashlib
    assert pre["source"] == {"file": "released.pth", "sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
                             "note": "imported from the reference Hi-End-MAE code", "epoch": 3}


def test_ct_normalization_reproduces_release_mapping(sincos_import):
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization
    props = torch.load(sincos_import[2], weights_only=True)["pretrain"]["foreground_intensity_properties_per_channel"]
    norm = CTNormalization(use_mask_for_norm=False, intensityproperties=props["0"])
    hu = np.array([-1000.0, -175.0, 37.5, 250.0, 3000.0])
    np.testing.assert_allclose(norm.run(hu.copy()), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-7)


def test_bare_state_dict_without_prefix_and_pickled_objects(tmp_path, capsys):
    sd = reference_state_dict("sincos", seed=2)
    bare = write_reference(tmp_path / "bare.pth", sd, prefix="", wrap=False)
    main(["-i", str(bare), "-o", str(tmp_path / "a.pth"), "--arch", "vit_tiny"])
    assert torch.equal(load_checkpoint(tmp_path / "a.pth")["weights"]["encoder.norm.weight"], sd["encoder.norm.weight"])
    capsys.readouterr()
    # argparse.Namespace in the file: weights_only=True fails, then a note and a full unpickle
    pickled = write_reference(tmp_path / "ns.pth", sd, args=argparse.Namespace(model="hi_end_mae"))
    main(["-i", str(pickled), "-o", str(tmp_path / "b.pth")])
    assert "weights_only=False" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "b.pth")["encoder"]["arch"] == "vit_tiny"
    expect_user_error(capsys, ["-i", pickled, "-o", tmp_path / "c.pth", "--weights-only"], "--weights-only")
    # without a decoder: still importable for fine-tuning
    enc_only = {k: v for k, v in sd.items() if k.startswith("encoder.") or k == "encoder_pos_embed"}
    main(["-i", str(write_reference(tmp_path / "enc.pth", enc_only)), "-o", str(tmp_path / "d.pth")])
    assert load_checkpoint(tmp_path / "d.pth")["model"]["decoder"] is None


def test_bad_inputs_in_process(tmp_path, capsys, sincos_import):
    src, out = sincos_import[1], tmp_path / "new" / "o.pth"  # a folder created only when the file is written
    (tmp_path / "text.pth").write_text("not a checkpoint\n")
    expect_user_error(capsys, ["-i", tmp_path / "text.pth", "-o", out],
                      "is not a readable PyTorch checkpoint (truncated, corrupt or not a torch file")
    torch.save({"state_dict": {"module.foo.weight": torch.zeros(3)}}, tmp_path / "foreign.pth")
    expect_user_error(capsys, ["-i", tmp_path / "foreign.pth", "-o", out], "not a reference Hi-End-MAE checkpoint")
    expect_user_error(capsys, ["-i", src, "-o", out, "--arch", "vit_b16"], "does not match the checkpoint")
    three = write_reference(tmp_path / "d3.pth", reference_state_dict(depth=3))
    expect_user_error(capsys, ["-i", three, "-o", out], "matches no preset")
    two = write_reference(tmp_path / "c2.pth", reference_state_dict(in_channels=2))
    expect_user_error(capsys, ["-i", two, "-o", out], "input channels")
    expect_user_error(capsys, ["-i", src, "-o", out, "--patch-size", "128"], "8x8x8 = 512; give the patch size")
    expect_user_error(capsys, ["-i", src, "-o", out, "--patch-size", "100"], "--patch-size [100, 100, 100] must be")
    broken = reference_state_dict()
    broken["encoder.blocks.1.attn.qkv.weight"] = torch.zeros(3 * E, E + 1)
    expect_user_error(capsys, ["-i", write_reference(tmp_path / "bad.pth", broken), "-o", out], "does not fit")
    expect_user_error(capsys, ["-i", sincos_import[2], "-o", out], "already a nnunetv2_hiendmae checkpoint")
    assert not out.parent.exists()


def test_overwrite_and_help(tmp_path, capsys, sincos_import):
    src = sincos_import[1]
    out = tmp_path / "o.pth"
    out.write_bytes(b"old")
    expect_user_error(capsys, ["-i", tmp_path / "missing.pth", "-o", tmp_path / "x.pth"], "not found")
    expect_user_error(capsys, ["-i", src, "-o", out], "--force")
    assert out.read_bytes() == b"old"
    main(["-i", str(src), "-o", str(out), "--force"])
    assert load_checkpoint(out)["encoder"]["arch"] == "vit_tiny"
    main(["-i", str(src), "-o", str(tmp_path / "release" / "ckpt.pth")])  # its folder is created, as nnU-Net does
    assert load_checkpoint(tmp_path / "release" / "ckpt.pth")["encoder"]["arch"] == "vit_tiny"
    assert "imported vit_tiny" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "weights_only=False" in " ".join(capsys.readouterr().out.split())


def test_console_script_error_is_one_line(tmp_path, sincos_import):
    (tmp_path / "text.pth").write_text("not a checkpoint\n")
    r = subprocess.run([str(CONSOLE), "-i", str(tmp_path / "text.pth"), "-o", str(tmp_path / "o.pth")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not a readable PyTorch checkpoint" in lines[0], lines
    assert not (tmp_path / "o.pth").exists()
