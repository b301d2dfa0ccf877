"""Shared fixtures: a private nnU-Net folder tree and a tiny synthetic dataset preprocessed by the real nnU-Net.

The ``nnUNet_raw/preprocessed/results`` variables point at a private temporary tree for the whole session; they are
set here, at collection time, so that in-process nnU-Net calls and every subprocess see the same tree.
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from pretrain import methods

_ROOT = Path(tempfile.mkdtemp(prefix="hiendmae_tests_"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
for _name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
    os.environ[_name] = str(_ROOT / _name)
    (_ROOT / _name).mkdir()
os.environ.pop("nnUNet_n_proc_DA", None)  # 0 crashes nnU-Net's planning
os.environ.setdefault("nnUNet_compile", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
# two test processes share 2 cores (make test): OpenMP threads of the commands they start wait asleep, not spinning
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DATASET_ID = 990  # labelled; 991 is the unlabelled pretraining pool
# nnUNetv2_train in the tests: one augmentation worker (in the training process, the augmentation of a 2-core machine
# is several times slower: docs/benchmarks.md), no torch.compile, one export process
TRAIN_ENV = {"nnUNet_n_proc_DA": "1", "nnUNet_compile": "0", "nnUNet_def_n_proc": "1"}
BIN = Path(sys.executable).parent


def console_script(name: str) -> str:
    """Path of a console script installed next to the running interpreter."""
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_module(name: str):
    """A script of ``benchmarks/`` (not a package) imported as a module, for its helpers."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    return module


def run_cli(*args: str, check: bool = False, env: dict | None = None,
            timeout: float = 1200) -> subprocess.CompletedProcess:
    """Run one of the real commands (ours or nnU-Net's) as a subprocess, capturing its output."""
    cmd = [console_script(args[0]), *args[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def cli_error(main, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str], str]:
    """A console script's ``main`` run in this process on bad input: its exit status, the lines it wrote to stderr
    and its stdout. The installed command goes through the same ``cli_entry`` without the 4-5 s of a process start
    (importing torch and nnU-Net); tests/test_cli_help.py runs every installed command's error path once."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_.value.code, err.strip().splitlines(), out


def pytest_collection_modifyitems(config, items):
    """The modules with the longest tests first: ``make test`` hands whole modules to two processes (pytest-xdist,
    ``--dist loadscope --no-loadscope-reorder``) in this order, so that the long ones start early and the short ones
    fill the gaps at the end. A module's cost is estimated from its tests: about a minute for each marked ``slow``,
    a few seconds for the others."""
    cost: dict[str, float] = {}
    for item in items:
        cost[item.module.__name__] = cost.get(item.module.__name__, 0) + (60 if item.get_closest_marker("slow") else 2)
    items.sort(key=lambda item: -cost[item.module.__name__])  # stable: a module's own order is kept


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """In-process tensors here are tiny: intra-op threads gain nothing, and on a busy machine their spin-waits cost
    100x. Subprocesses (the real commands) keep their own defaults."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def nnunet_dirs() -> dict[str, Path]:
    return {k: Path(os.environ[k]) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}


@pytest.fixture(scope="session")
def preprocessed_dataset(nnunet_dirs) -> dict:
    """Dataset 990 (6 labelled + 1 test case) through ``nnUNetv2_plan_and_preprocess``, and 991, a pool of 3
    unlabelled scans through ``nnUNetv2_hiendmae_preprocess_unlabeled --like 990``."""
    from nnunetv2_hiendmae.demo.synthetic import make_datasets

    folders = make_datasets(nnunet_dirs["nnUNet_raw"], DATASET_ID, name="HiEndTest", n_labelled=6, n_unlabelled=3,
                            n_test=1, seed=0, scale=0.6, pool=_ROOT / "unlabelled_scans")
    run_cli("nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "2", "-npfp", "2",
            "--verify_dataset_integrity", check=True)
    run_cli("nnUNetv2_hiendmae_preprocess_unlabeled", "-i", str(folders["unlabelled"]), "-d", str(DATASET_ID + 1),
            "--name", "HiEndTestUnlabelled", "--like", str(DATASET_ID), "-np", "2", check=True)
    pre = nnunet_dirs["nnUNet_preprocessed"]
    return {
        "id": DATASET_ID,
        "name": folders["labelled"].name,
        "unlabelled_id": DATASET_ID + 1,
        "unlabelled_name": f"Dataset{DATASET_ID + 1:03d}_HiEndTestUnlabelled",
        "unlabelled_scans": folders["unlabelled"],
        "raw": folders["labelled"],
        "preprocessed": pre / folders["labelled"].name,
        "unlabelled_preprocessed": pre / f"Dataset{DATASET_ID + 1:03d}_HiEndTestUnlabelled",
    }


# ------------------------------------------------------------------------------------------ nnU-Net results


def write_summary(path: Path, dice_per_class: dict) -> None:
    """Write a summary.json exactly as nnU-Net's compute_metrics_on_folder does (via its save_summary_json)."""
    import numpy as np
    from nnunetv2.evaluation.evaluate_predictions import save_summary_json

    path.parent.mkdir(parents=True, exist_ok=True)
    means = {k: {"Dice": float(d), "IoU": float(d / (2 - d)) if not math.isnan(d) else math.nan, "FP": 1.0,
                 "TP": 5.0, "FN": 1.0, "TN": 90.0, "n_pred": 6.0, "n_ref": 6.0} for k, d in dice_per_class.items()}
    fg = {m: float(np.mean([means[k][m] for k in means if k != 0])) for m in next(iter(means.values()))}
    case = {"reference_file": "gt/case_000.nii.gz", "prediction_file": "pred/case_000.nii.gz",
            "metrics": {k: dict(v) for k, v in means.items()}}
    save_summary_json({"metric_per_case": [case], "mean": means, "foreground_mean": fg}, str(path))


# ------------------------------------------------------------------------------------------ checkpoints for fine-tuning

CROP = [32, 64, 64]  # pretraining crop of the checkpoints below
TOKEN = 16


def write_checkpoint(path: Path, dataset_folder: Path, *, spacing=None, props=None, schemes=None, in_channels=1,
                     pos_embed="sincos", crop=CROP, seed=0) -> Path:
    """A vit_tiny checkpoint in our format whose ``pretrain`` block copies the dataset's base plans unless told."""
    import torch

    from nnunetv2_hiendmae.checkpoint import make_checkpoint, save_atomic
    from nnunetv2_hiendmae.encoders import build_encoder
    from nnunetv2_hiendmae.presets import encoder_config

    plans = json.loads((dataset_folder / "nnUNetPlans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    enc = encoder_config("vit_tiny", in_channels=in_channels, pos_embed=pos_embed,
                         pos_embed_grid=[c // TOKEN for c in crop] if pos_embed == "learned" else None)
    torch.manual_seed(seed)
    weights = {f"encoder.{k}": v for k, v in build_encoder(enc).state_dict().items()}
    pretrain = {"datasets": [dataset_folder.name], "plans": "nnUNetPlans", "configuration": "3d_fullres",
                "spacing": spacing or cfg["spacing"], "transpose_forward": plans["transpose_forward"],
                "normalization_schemes": schemes or cfg["normalization_schemes"],
                "use_mask_for_norm": cfg["use_mask_for_norm"] * in_channels,
                "foreground_intensity_properties_per_channel":
                    props or plans["foreground_intensity_properties_per_channel"],
                "channel_names": {str(c): "CT" for c in range(in_channels)}, "in_channels": in_channels,
                "patch_size": list(crop), "token_size": [TOKEN] * 3, "mask_ratio": 0.75}
    save_atomic(make_checkpoint(weights, enc, {}, pretrain), path)
    return path


def copy_preprocessed_dataset(src: Path, root: Path, dataset_id: int, name: str = "Copy") -> Path:
    """A private copy of a preprocessed dataset under another ``nnUNet_preprocessed`` root, for a test that edits it
    (or depends on files another test may add to the shared one, such as nnU-Net's ``splits_final.json``)."""
    dst = root / f"Dataset{dataset_id:03d}_{name}"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("gt_segmentations", "splits_final.json"))
    return dst


def make_trainer(cls: type, folder: Path, plans_name: str, fold: int = 0):
    """A fine-tuning trainer on CPU for fold ``fold`` of the dataset in ``folder`` with the named plans."""
    import torch

    plans = json.loads((folder / f"{plans_name}.json").read_text())
    plans["continue_training"] = False  # nnUNetTrainer.__init__ pops it
    return cls(plans, "3d_fullres", fold, json.loads((folder / "dataset.json").read_text()), device=torch.device("cpu"))


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), so a kill can take the whole tree at once."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and everything it started (torchrun and worker pools start processes of their own)."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


# ------------------------------------------------------------------------------------------ pretraining runs (CLI)

TINY = ["--arch", "vit_tiny", "--batch-size", "2", "--num-workers", "0", "--device", "cpu", "--no-progress-bar",
        "--warmup-epochs", "1", "--checkpoint-minutes", "0", "--lr", "1e-4"]
DEFAULT_PATCH = ["16", "32", "32"]


def method_args(method: str) -> list[str]:
    """The method and its small views from the registry: CPU seconds per step."""
    patch = methods.METHODS[method].small_patch or DEFAULT_PATCH
    return ["--method", method, "--patch-size", *map(str, patch), *methods.small_flags(method)]


def pretrain_args(ds, out, epochs, iters, *extra, method="hiend_mae"):
    return ["nnUNetv2_hiendmae_pretrain", "-d", str(ds["id"]), str(ds["unlabelled_id"]), "-o", str(out), *TINY,
            *method_args(method), "--epochs", str(epochs), "--iters-per-epoch", str(iters), *extra]


def kill_after_epoch(cmd: list[str], out, epoch: int) -> int:
    """Start ``cmd``, SIGKILL its whole process group once ``checkpoint_latest.pth`` has ``epoch`` epochs done;
    returns the epochs done in the checkpoint left behind."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest, deadline = out / "checkpoint_latest.pth", time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and torch.load(latest, weights_only=True)["train_state"]["epoch"] >= epoch:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail("the run finished before it could be killed; make it longer")
    kill_tree(proc)
    assert not (out / "checkpoint_final.pth").exists()
    return torch.load(latest, weights_only=True)["train_state"]["epoch"]


SLOW_RANK_ZERO = Path(__file__).with_name("slow_rank_zero_pretrain.py")  # the command, instrumented for tests


def start_paused(cmd: list[str], step: int, tmp_path: Path, env: dict | None = None, **popen) -> subprocess.Popen:
    """Start ``cmd`` (torchrun of :data:`SLOW_RANK_ZERO`; stderr piped) and return once its rank 0 pauses after
    optimiser step ``step``, waiting for a stop signal: the test's signal then lands between two known steps."""
    paused = tmp_path / f"paused_at_{step}"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen,
                            env={**os.environ, **(env or {}), "PAUSE_AT_STEP": str(step), "PAUSED_FILE": str(paused)})
    deadline = time.time() + 600
    while not paused.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert paused.exists(), f"the run ended or stalled before step {step}: {proc.poll()}"
    return proc


def assert_resumed(out, killed_at: int, resumed, straight) -> None:
    """The resumed run says so and ends with the loss history and weights of the uninterrupted one."""
    log = "".join(p.read_text() for p in out.glob("training_log_*.txt"))
    assert f"resumed from {out / 'checkpoint_latest.pth'} after epoch {killed_at}" in log, resumed.stdout
    a = torch.load(straight / "checkpoint_final.pth", weights_only=True)
    b = torch.load(out / "checkpoint_final.pth", weights_only=True)
    assert a["pretrain"]["history"]["loss"] == pytest.approx(b["pretrain"]["history"]["loss"], rel=1e-6)
    for k in a["weights"]:
        torch.testing.assert_close(a["weights"][k], b["weights"][k], rtol=1e-5, atol=1e-6, msg=k)
