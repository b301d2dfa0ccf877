"""The CUDA paths, run on a GPU only (skipped elsewhere; ``benchmarks/gpu_figures.py`` runs them on the GPU machine
first): the copy one batch ahead delivers every batch intact while the compute stream still reads the previous one,
the augmentation moves the same voxels as on the CPU, the GEMM patch embedding equals the convolution on the device,
and a step's loss for the same weights and masks is the CPU's in fp32, close to it in bf16 and the same under
``torch.compile``."""
from __future__ import annotations

import pytest
import torch
from test_methods import PATCH, build, structured

from nnunetv2_hiendmae.precision import autocast
from pretrain.data import device_batches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 comparisons on the GPU without TF32 matmuls (10-bit mantissa)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_copy_ahead_delivers_every_batch_intact_while_the_step_runs():
    """Each batch is summed on the compute stream after a long kernel, when the copier has long moved on to the next
    batch and the loop dropped its reference: without the stream wait and ``record_stream`` the sums would read
    memory that is not there yet or was reused."""
    g = torch.Generator().manual_seed(0)
    source = [{"crops": torch.randn(4, 2, 1, 48, 48, 48, generator=g).half().pin_memory()} for _ in range(8)]
    sums = []
    for batch in device_batches(iter(source), CUDA):
        assert batch["crops"].device.type == "cuda" and batch["crops"].dtype == torch.float16
        torch.cuda._sleep(5_000_000)  # a few ms of compute-stream work before the batch is read
        sums.append(batch["crops"].float().sum(dim=(1, 2, 3, 4, 5)))
    torch.cuda.synchronize()
    expected = torch.stack([b["crops"].float().sum(dim=(1, 2, 3, 4, 5)) for b in source])
    torch.testing.assert_close(torch.stack(sums).cpu(), expected, rtol=1e-4, atol=1e-2)


def test_augmentation_on_the_gpu_equals_the_cpus_for_the_same_seed():
    """Its decisions come from the host's generator: the device only moves voxels, the same ones."""
    from pretrain.augment import augment

    x = torch.randn(24, 2, 16, 16, 24).half()
    torch.manual_seed(5)
    on_cpu = augment(x)
    torch.manual_seed(5)
    on_gpu = augment(x.to(CUDA))
    assert on_gpu.dtype == torch.float32
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-6)


@pytest.mark.parametrize("token", [(16, 16, 16), (8, 16, 12)])
def test_patch_embedding_gemm_equals_the_convolution_on_the_gpu(token):
    from nnunetv2_hiendmae.vit import PatchEmbed3D, patchify

    torch.manual_seed(0)
    embed = PatchEmbed3D(2, 96, token).to(CUDA)
    x = torch.randn(3, 2, *(t * g for t, g in zip(token, (3, 2, 2))), device=CUDA)
    conv = embed.proj(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(embed(patchify(x, token)), conv, rtol=1e-5, atol=1e-5)
    with autocast(CUDA, "bf16"):
        fast, plain = embed(patchify(x, token)), embed.proj(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(fast.float(), plain.float(), rtol=2e-2, atol=2e-2)


def test_same_loss_for_the_same_weights_and_masks_on_cpu_gpu_bf16_and_compiled():
    model, settings = build("hiend_mae")
    x = structured(2, settings.views(PATCH))["crops"].flatten(0, 1)  # [N, 1, *PATCH]
    grid = model.encoder.grid(PATCH)
    tokens = grid[0] * grid[1] * grid[2]
    shuffle = torch.rand(x.shape[0], tokens, generator=torch.Generator().manual_seed(1)).argsort(dim=1)
    n_visible = model.num_visible(tokens, settings.mask_ratio)

    def loss(m, device, precision="fp32"):
        with autocast(device, precision):
            return m.masked_autoencode(x.to(device), shuffle.to(device), n_visible).loss.float().cpu()

    on_cpu = loss(model, torch.device("cpu"))
    model.to(CUDA)
    torch.testing.assert_close(loss(model, CUDA), on_cpu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss(model, CUDA, "bf16"), on_cpu, rtol=3e-2, atol=3e-3)
    torch._dynamo.reset()
    compiled = torch.compile(model.masked_autoencode)
    with autocast(CUDA, "fp32"):
        out = compiled(x.to(CUDA), shuffle.to(CUDA), n_visible).loss.float().cpu()
    torch._dynamo.reset()
    torch.testing.assert_close(out, on_cpu, rtol=1e-4, atol=1e-5)
