"""A method is one model file and one registry entry: a throw-away method, registered here at test time and touching
no other file, runs through the command's parsing and help, a training run with its checkpoint, fine-tuning's weight
loading and the demo's parsing. Its model is a small SimMIM (Xie et al., CVPR 2022: masked tokens replaced by a mask
token inside the encoder, a linear head, L1 on the masked voxels), so it also uses the encoder's token replacement."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from nnunetv2_hiendmae.checkpoint import encoder_state_dict, load_checkpoint
from nnunetv2_hiendmae.encoders import build_encoder
from nnunetv2_hiendmae.network import HiEndUNETR
from nnunetv2_hiendmae.vit import patchify, take_tokens, unpatchify
from nnunetv2_hiendmae.weights import load_pretrained_encoder
from pretrain import methods
from pretrain.methods import Method, Recipe, setting


@dataclass
class ToySettings:
    """One crop per volume, a share of its tokens replaced by the mask token."""

    mask_ratio: float = setting(0.6, "fraction of tokens replaced by the mask token")
    toy_weight: float = setting(1.0, "weight of the L1 loss")

    def views(self, patch_size):
        return {"crops": (1, tuple(patch_size))}

    def check(self, patch_size, token_size):
        if not 0 < self.mask_ratio < 1:
            raise methods.UserError("--mask-ratio must be between 0 and 1")


class ToySimMIM(nn.Module):
    """Encoder + mask token + a linear head to the voxels of each token; fulfils the loop's contract directly."""

    def __init__(self, encoder: dict, settings: ToySettings):
        super().__init__()
        self.settings, self.encoder = settings, build_encoder(encoder)
        self.token_size, self.decoder_config = self.encoder.token_size, {}
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.encoder.embed_dim))
        self.head = nn.Linear(self.encoder.embed_dim, self.encoder.in_channels * 16 ** 3)

    def _pass(self, x: torch.Tensor):
        patches = patchify(x, self.token_size)
        replace = torch.rand(patches.shape[:2], device=x.device) < self.settings.mask_ratio
        normed, _ = self.encoder(x, replace=replace, mask_token=self.mask_token)
        return patches, replace, self.head(normed[:, 1:])

    def forward(self, views):
        patches, replace, pred = self._pass(views["crops"].flatten(0, 1))
        l1 = (pred - patches).abs().mean(-1)[replace].mean()
        return {"loss": self.settings.toy_weight * l1, "l1": l1}

    def step_done(self, progress: float) -> None:
        pass

    def figure_input(self, views):
        return views["crops"][:1, 0]

    @torch.no_grad()
    def reconstruct(self, x):
        patches, replace, pred = self._pass(x)
        grid = self.encoder.grid(x.shape[2:])
        masked = torch.where(replace[..., None], torch.zeros_like(patches), patches)
        recon = torch.where(replace[..., None], pred, patches)
        return (unpatchify(masked, self.token_size, grid, x.shape[1]),
                unpatchify(recon, self.token_size, grid, x.shape[1]))

    def no_weight_decay(self):
        return {"encoder.cls_token", "encoder.pos_embed", "mask_token"}


@pytest.fixture
def toy(monkeypatch):
    entry = Method(ToySettings, f"{__name__}:ToySimMIM", "SimMIM (throw-away test method)",
                   Recipe(3e-4, 1, 5, source="a test"), small={"mask_ratio": 0.5}, small_patch=(16, 32, 32))
    monkeypatch.setitem(methods.METHODS, "toy", entry)
    return entry


def test_the_encoder_replaces_tokens_with_the_mask_token_and_keeps_the_others():
    torch.manual_seed(0)
    model = ToySimMIM(dict(arch="vit_tiny", embed_dim=24, depth=1, num_heads=2, token_size=16, in_channels=1,
                           mlp_ratio=4.0, pos_embed="sincos", pos_embed_grid=None), ToySettings())
    x = torch.randn(1, 1, 32, 32, 16)
    seen = []
    model.encoder.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    replace = torch.tensor([[True, False, False, True]])
    model.encoder(x, replace=replace, mask_token=model.mask_token)
    pos = model.encoder.pos_embed_for((2, 2, 1), x.device)
    tokens = seen[0][:, 1:]  # the block's input, CLS dropped
    embedded = model.encoder.patch_embed(patchify(x, (16, 16, 16)))
    torch.testing.assert_close(tokens[0, [0, 3]], model.mask_token[0].expand(2, -1) + pos[0, [0, 3]])
    torch.testing.assert_close(tokens[0, [1, 2]], embedded[0, [1, 2]] + pos[0, [1, 2]])
    with pytest.raises(ValueError, match="replace with mask_token"):
        model.encoder(x, keep=take_tokens(torch.arange(4)[None], torch.tensor([[0, 1]])), replace=replace,
                      mask_token=model.mask_token)


def test_a_registered_method_gets_its_flags_help_and_recipe(toy):
    from pretrain.cli import build_parser, parse
    from pretrain.config import PretrainConfig

    parser, _ = build_parser()
    text = parser.format_help()
    assert "--method toy: SimMIM (throw-away test method)" in text and "--toy-weight" in text
    assert "toy: lr 0.0003, 1 warm-up epochs of 5 (a test)" in text  # the recipe's source cited
    given, mode = parse(["-d", "990", "-o", "out", "--method", "toy", "--toy-weight", "2", "--mask-ratio", "0.3"])
    cfg = PretrainConfig(**given)
    assert mode == "new" and isinstance(cfg.method_settings, ToySettings)
    assert (cfg.method_settings.toy_weight, cfg.method_settings.mask_ratio) == (2.0, 0.3)
    assert (cfg.lr, cfg.warmup_epochs, cfg.epochs) == (3e-4, 1, 5)  # the method's recipe


def test_a_registered_method_trains_checkpoints_and_fine_tunes(toy, preprocessed_dataset, tmp_path):
    from pretrain.config import PretrainConfig
    from pretrain.train import PretrainRun

    out = tmp_path / "toy"
    cfg = PretrainConfig(datasets=[str(preprocessed_dataset["id"])], output_dir=str(out), method="toy",
                         method_settings=dict(toy.small), arch="vit_tiny", patch_size=list(toy.small_patch),
                         batch_size=2, epochs=2, iters_per_epoch=2, num_workers=0, device="cpu", progress_bar=False,
                         checkpoint_minutes=0)
    PretrainRun(cfg).run()
    ckpt = load_checkpoint(out / "checkpoint_final.pth")
    assert ckpt["method"] == "toy" and ckpt["model"]["settings"] == {"mask_ratio": 0.5, "toy_weight": 1.0}
    assert set(ckpt["pretrain"]["history"]) >= {"loss", "l1"} and "mask_token" in ckpt["weights"]
    assert (out / "progress.png").is_file() and (out / "reconstruction_epoch_0002.png").is_file()
    network = HiEndUNETR(1, 3, (16, 32, 32), ckpt["encoder"], feature_size=4)
    report = load_pretrained_encoder(network, ckpt)
    assert len(report.loaded) == len(encoder_state_dict(ckpt)) > 0


def test_the_demo_and_the_benchmarks_offer_a_registered_method(toy):
    from conftest import benchmark_module

    from nnunetv2_hiendmae.demo.pipeline import build_parser

    args = build_parser().parse_args(["--method", "toy"])
    assert args.method == "toy" and methods.small_flags("toy") == ["--mask-ratio", "0.5"]
    assert "toy" in benchmark_module("gpu_figures").other_methods()
