"""The CUDA paths, run on a GPU only (skipped elsewhere; ``benchmarks/gpu_figures.py`` runs them on the GPU machine
first): the copy one batch ahead delivers every batch intact while the compute stream still reads the previous one,
the augmentation moves the same voxels as on the CPU, the GEMM patch embedding equals the convolution on the device,
a step's loss for the same weights and masks is the CPU's in fp32, close to it in bf16 and the same under
``torch.compile``; a step waits for a copy still in flight and reused pinned buffers stay intact; ``auto`` precision
follows the GPU's kind; GL-MAE and MiM compile and learn; the CLI trains, evaluates and resumes in fp16 with a
GradScaler; our trainer trains under nnU-Net's compile, continues with ``--c`` and predicts through the real
``nnUNetv2_train`` and ``nnUNetv2_predict`` on the GPU; and DDP runs over NCCL where two GPUs are present."""
from __future__ import annotations

from pathlib import Path

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


# ------------------------------------------------------------------------- what a GPU user hits first (cluster issue)

def test_the_step_waits_for_a_copy_that_is_still_running():
    """The copier stream is held busy before each copy and the compute stream reads the batch at once: only the
    compute stream's wait for the copier makes the sums right (the test above sleeps before reading, so it cannot
    see a missing wait)."""
    from contextlib import contextmanager

    real_stream = torch.cuda.stream

    @contextmanager
    def busy_copier(stream):
        with real_stream(stream):
            torch.cuda._sleep(20_000_000)  # tens of ms of copier-stream work before the copy is enqueued
            yield

    g = torch.Generator().manual_seed(1)
    source = [{"crops": torch.randn(4, 2, 1, 32, 32, 32, generator=g).half().pin_memory()} for _ in range(4)]
    expected = torch.stack([b["crops"].float().sum(dim=(1, 2, 3, 4, 5)) for b in source])
    torch.cuda.stream = busy_copier
    try:
        sums = [b["crops"].float().sum(dim=(1, 2, 3, 4, 5)) for b in device_batches(iter(source), CUDA)]
    finally:
        torch.cuda.stream = real_stream
    torch.testing.assert_close(torch.stack(sums).cpu(), expected, rtol=1e-4, atol=1e-2)


def test_pinned_buffers_freed_and_reused_still_deliver_every_batch_intact():
    """Batches made one at a time and dropped at once (as the loader's pinning thread does), so the host allocator
    reuses their pinned memory and the device allocator their blocks, while the compute stream lags behind."""
    expected = []

    def batches():
        for i in range(12):
            x = torch.randn(4, 2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(i)).half()
            expected.append(x.float().sum(dim=(1, 2, 3, 4, 5)))
            yield {"crops": x.pin_memory()}

    sums = []
    for batch in device_batches(batches(), CUDA):
        torch.cuda._sleep(5_000_000)
        sums.append(batch["crops"].float().sum(dim=(1, 2, 3, 4, 5)))
    torch.cuda.synchronize()
    torch.testing.assert_close(torch.stack(sums).cpu(), torch.stack(expected), rtol=1e-4, atol=1e-2)


def test_auto_precision_follows_this_gpus_kind():
    """bf16 exactly where the GPU computes it natively (compute capability >= 8.0), else fp16."""
    from nnunetv2_hiendmae.precision import resolve_precision

    native = torch.cuda.get_device_capability(CUDA) >= (8, 0)
    assert resolve_precision(CUDA, "auto") == ("bf16" if native else "fp16")


@pytest.mark.parametrize("method", ["gl_mae", "mim"])
def test_compiled_step_with_backward_and_optimiser_step(method):
    """GL-MAE (teacher, two kinds of views) and MiM (several levels) compile, and a compiled step under the GPU's
    autocast learns: the loss is finite and every trainable weight that had a gradient moved."""
    from nnunetv2_hiendmae.precision import resolve_precision
    from pretrain.augment import augment_views

    model, settings = build(method)
    model.to(CUDA).train()
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    precision = resolve_precision(CUDA, "auto")
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    for _ in range(2):
        views = augment_views({k: v.to(CUDA) for k, v in structured(2, settings.views(PATCH)).items()})
        with autocast(CUDA, precision):
            loss = compiled(views)["loss"]
        assert torch.isfinite(loss)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    moved = [k for k, v in model.named_parameters() if k in before and not torch.equal(v, before[k])]
    assert len(moved) > 0.5 * len(before)


def _gpu_pretrain(ds, out, *extra):
    from conftest import pretrain_args

    args = pretrain_args(ds, out, 2, 2, *extra)
    return [a if a != "cpu" else "cuda" for a in args]


def test_fp16_with_a_grad_scaler_trains_resumes_and_evaluates_on_the_gpu(preprocessed_dataset, tmp_path):
    """The pretraining CLI on the GPU in fp16 (the GradScaler's path: V100, T4), compiled, with the held-out loss
    and the probe during the run; stopped after its first epoch and resumed for a second, it keeps its GradScaler's
    state and finishes with every epoch's figures."""
    from conftest import run_cli

    from nnunetv2_hiendmae.checkpoint import load_checkpoint

    out = tmp_path / "fp16"
    args = _gpu_pretrain(preprocessed_dataset, out, "--precision", "fp16", "--compile", "--val-cases", "1",
                         "--probe-dataset", str(preprocessed_dataset["id"]), "--probe-every", "1")
    first = [*args[:args.index("--epochs")], "--epochs", "1", *args[args.index("--epochs") + 2:]]
    run_cli(*first, check=True)
    assert load_checkpoint(out / "checkpoint_latest.pth")["train_state"]["scaler"] is not None
    run_cli("nnUNetv2_hiendmae_pretrain", "--resume", "-o", str(out), "--epochs", "2", check=True)
    history = load_checkpoint(out / "checkpoint_final.pth")["pretrain"]["history"]
    assert len(history["loss"]) == 2 and all(v == v and abs(v) < 1e3 for v in history["loss"])
    assert all(v == v for v in history["probe_dice"]) and all(v == v for v in history["val_loss"])



def test_our_trainer_compiled_continued_and_predicted_by_nnunet_on_the_gpu(preprocessed_dataset, tmp_path):
    """Plans from a checkpoint, then nnU-Net's own commands on the GPU: ``nnUNetv2_train`` with ``nnUNet_compile``
    (its ``torch.compile`` of our network, validation in fp16 autocast as the predictor runs it), ``--c`` from the
    checkpoint of epoch 1, and ``nnUNetv2_predict -device cuda`` writing a segmentation of every test image."""
    import json
    import os

    import numpy as np
    import SimpleITK as sitk
    from conftest import TRAIN_ENV, run_cli, write_checkpoint

    from nnunetv2_hiendmae.ext import ext_path
    from nnunetv2_hiendmae.plans import main as plan_main

    folder, raw = preprocessed_dataset["preprocessed"], preprocessed_dataset["raw"]
    plan_main(["-d", "990", "-pt", str(write_checkpoint(tmp_path / "pre.pth", folder)), "-o", "T_gpu"])
    env = {**TRAIN_ENV, "nnUNet_compile": "1", "nnUNet_extTrainer": str(ext_path())}
    train = ("nnUNetv2_train", "990", "3d_fullres", "0", "-tr", "nnUNetTrainerHiEndMAE_smoke", "-p", "T_gpu",
             "-device", "cuda")
    proc = run_cli(*train, env=env, check=True)
    assert "tensors loaded" in proc.stdout and "Using torch.compile" in proc.stdout
    fold = Path(os.environ["nnUNet_results"]) / folder.name / "nnUNetTrainerHiEndMAE_smoke__T_gpu__3d_fullres" \
        / "fold_0"
    state = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    torch.save({**state, "current_epoch": 1}, fold / "checkpoint_latest.pth")
    (fold / "checkpoint_final.pth").unlink()
    resumed = run_cli(*train, "--c", env=env, check=True)
    assert "Epoch 1" in resumed.stdout and "Epoch 0" not in resumed.stdout
    dice = json.loads((fold / "validation" / "summary.json").read_text())["foreground_mean"]["Dice"]
    assert dice == dice  # validated on the GPU, a number

    images, out = raw / "imagesTs", tmp_path / "pred"
    run_cli("nnUNetv2_predict", "-i", str(images), "-o", str(out), "-d", "990", "-c", "3d_fullres", "-tr",
            "nnUNetTrainerHiEndMAE_smoke", "-p", "T_gpu", "-f", "0", "-device", "cuda", env=env, check=True)
    for image in sorted(images.glob("*_0000.nii.gz")):
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / image.name.replace("_0000", ""))))
        assert seg.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(image))).shape
        assert set(np.unique(seg)) <= {0, 1, 2, 3}

@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_ddp_over_nccl_on_two_gpus(preprocessed_dataset, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import console_script

    from nnunetv2_hiendmae.checkpoint import load_checkpoint

    args = _gpu_pretrain(preprocessed_dataset, tmp_path / "ddp")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           console_script(args[0]), *args[1:]], capture_output=True, text=True, timeout=500,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(tmp_path / "ddp" / "checkpoint_final.pth")["pretrain"]["world_size"] == 2
