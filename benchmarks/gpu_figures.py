"""The GPU figures of docs/benchmarks.md, in three parts of a few minutes each on one GPU.

Parts, in the order to run them (about 6-7, 5-6 and 5 minutes on an H100, estimated from earlier compile and step
times; a timeout per step keeps a hung step from holding up the others):

* ``pretrain`` (targets 1 and 2 of the GPU issue, Hi-End-MAE ViT-B/16, 24 x 8 crops of 96^3, bf16): the CUDA tests
  (``tests/test_cuda.py``); the model-only step eager, with the reference code side by side when ``--reference`` is
  given, and compiled; then realistic scans (``make_scans.py``, >= 256 x 256 x 200 voxels after preprocessing)
  through ``nnUNetv2_hiendmae_preprocess_unlabeled`` into the pretraining CLI itself (compiled, as on CUDA by default),
  whose steady-state crops/s (its epochs after the first) are set against the compiled model-only step.
* ``finetune`` (target 3): ``finetune_speed.py``, 96^3, batch 2: eager, HiEndUNETR ViT-B/16 and its ``_recompute``
  variant against nnU-Net's default U-Net and Primus-M; under ``torch.compile`` (minutes per network), HiEndUNETR
  against the default U-Net only.
* ``methods`` (target 2 for the other methods): every other method of the registry (MAE, GL-MAE, MiM), model-only
  and the CLI, both eager.

Every part writes into ``--out``: ``figures.jsonl`` (one record per step: the command, its seconds and exit status,
and what it measured), ``figures.md`` (the tables with the ratios the issue asks for) and ``steps.log`` (the tail of
each step's output). ``--quick`` runs every step at CPU size (``vit_tiny``, small crops and scans, few steps,
compiled with ``aot_eager``), so that a test proves the commands before any GPU time is spent on them.

    python benchmarks/gpu_figures.py pretrain --out figures --reference ../Hi-End-MAE --reference-pythonpath ../timm054
    python benchmarks/gpu_figures.py pretrain --out figures --quick        # CPU rehearsal
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pretrain import methods

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def other_methods() -> list[str]:
    """The ``methods`` part's: every method of the registry but Hi-End-MAE (the ``pretrain`` part's)."""
    return [m for m in methods.METHODS if m != "hiend_mae"]


@dataclass(frozen=True)
class Size:
    """What one part measures at: the GPU issue's settings, or the CPU rehearsal's."""

    device: str
    arch: str
    patch: tuple[int, int, int]  # MiM crops twice this
    batch: int
    steps: int
    warmup: int
    scans: int
    scan_scale: float
    workers: int
    epochs: int
    iters: int
    finetune: list[str]
    timeout_s: int
    primus: str = "primus_m"  # the Primus measured next to ``arch`` (docs/primus.md)
    # the compiled model-only steps' torch.compile backend: inductor on the GPU, as the CLI; the CPU rehearsal traces
    # and differentiates the same graphs with aot_eager, without inductor's C++ code generation (about 50 s per
    # network on 2 cores, and nothing that the GPU's Triton kernels share)
    compile_backend: str = "inductor"


GPU = Size("cuda", "vit_b16", (96, 96, 96), 24, 20, 5, 32, 2.4, 15, 5, 60, [], 300)
QUICK = Size("cpu", "vit_tiny", (32, 32, 32), 2, 2, 1, 3, 0.5, 1, 2, 3,
             ["--arch", "vit_tiny", "--primus", "S", "--patch-size", "32", "32", "32", "--batch-size", "1",
              "--case-size", "48", "48", "48", "--steps", "1", "--warmup", "1"], 300, "primus_tiny", "aot_eager")


class Steps:
    """Runs the steps of a part as subprocesses and records each one, as it ends, in ``figures.jsonl``."""

    def __init__(self, out: Path, env: dict[str, str]):
        self.out, self.env = out, env
        self.records: list[dict] = []

    def run(self, name: str, cmd: list[str], timeout_s: int, parse=None) -> dict | None:
        """Run ``cmd``; ``parse(stdout)`` turns its output into the record's result. A failure is recorded, not
        raised: the next steps still run."""
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout_s, cwd=ROOT)
            rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, stdout, stderr = "timeout", _text(e.stdout), _text(e.stderr)
        record = {"step": name, "cmd": " ".join(cmd), "s": round(time.perf_counter() - t0, 1), "rc": rc}
        if rc == 0 and parse is not None:
            try:
                record["result"] = parse(stdout)
            except (ValueError, KeyError, IndexError, OSError) as e:
                record["rc"], record["parse_error"] = "unparsed", f"{type(e).__name__}: {e}"
        with open(self.out / "steps.log", "a") as f:
            f.write(f"==== {name} (rc {record['rc']}, {record['s']} s)\n$ {record['cmd']}\n"
                    f"{stdout[-4000:]}\n{stderr[-4000:]}\n")
        with open(self.out / "figures.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{name}: rc {record['rc']} in {record['s']} s", flush=True)
        self.records.append(record)
        return record.get("result")


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def cli_history(run_dir: Path):
    """The pretraining CLI's per-epoch record from its final checkpoint."""
    def parse(_: str) -> dict:
        import torch

        history = torch.load(run_dir / "checkpoint_final.pth", weights_only=True)["pretrain"]["history"]
        steady = history["crops_per_s"][1:] or history["crops_per_s"]  # epoch 1 holds start-up and compilation
        return {"crops_per_s_per_epoch": [round(v, 1) for v in history["crops_per_s"]],
                "epoch_time_s": [round(v, 2) for v in history["epoch_time"]],
                "steady_crops_per_s": round(sum(steady) / len(steady), 1)}
    return parse


def volumes_per_step(size: Size, method: str) -> str:
    """MiM's one crop per volume is 8x the voxels of a patch: 4 volumes of 192^3 per step on the GPU."""
    return str(max(1, size.batch // 6) if method == "mim" else size.batch)


def throughput(size: Size, method: str, *extra: str) -> list[str]:
    return [sys.executable, str(BENCH / "pretrain_throughput.py"), "--method", method, "--arch", size.arch,
            "--patch-size", *map(str, size.patch), "--batch-size", volumes_per_step(size, method),
            "--device", size.device, "--steps", str(size.steps), "--warmup", str(size.warmup), *extra]


def command(name: str) -> str:
    """A console script next to the interpreter (a virtual environment), else on PATH."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else name


def pretrain_cli(size: Size, method: str, out: Path, *extra: str) -> list[str]:
    return [command("nnUNetv2_hiendmae_pretrain"), "--method", method, "-d", "900", "-o", str(out),
            "--arch", size.arch, "--patch-size", *map(str, size.patch), "--batch-size", volumes_per_step(size, method),
            "--device", size.device, "--epochs", str(size.epochs), "--iters-per-epoch", str(size.iters),
            "--num-workers", str(size.workers), "--no-progress-bar", "--recon-every", "1000", *extra]


def make_pool(steps: Steps, size: Size, work: Path) -> None:
    """Realistic scans, preprocessed as the unlabelled pool 900 (written with nibabel, read with nnU-Net's nibabel
    reader: the GPU machine's SimpleITK is a stand-in)."""
    scans = work / "scans"
    steps.run("make_scans", [sys.executable, str(BENCH / "make_scans.py"), "-o", str(scans), "-n", str(size.scans),
                             "--scale", str(size.scan_scale)], size.timeout_s)
    steps.run("preprocess_unlabeled", [command("nnUNetv2_hiendmae_preprocess_unlabeled"), "-i", str(scans),
                                       "-d", "900", "--name", "Scans", "--ct-window", "-175", "250",
                                       "-np", str(min(16, os.cpu_count() or 1)),
                                       "--patch-size", *map(str, size.patch), "--reader", "NibabelIOWithReorient"],
              size.timeout_s, parse=lambda _: case_shapes(work))


def case_shapes(work: Path) -> dict:
    """The preprocessed pool's case sizes (the realistic-volume condition of target 2), read by nnU-Net."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = str(next((work / "nnUNet_preprocessed").glob("Dataset900_*/*_3d_fullres")))
    dataset = infer_dataset_class(folder)(folder)
    shapes = [dataset.load_case(case)[0].shape[1:] for case in dataset.identifiers]
    return {"cases": len(shapes), "min_shape": [min(s[i] for s in shapes) for i in range(3)],
            "max_shape": [max(s[i] for s in shapes) for i in range(3)]}


def part_pretrain(steps: Steps, size: Size, work: Path, a: argparse.Namespace) -> None:
    if size.device == "cuda":
        steps.run("cuda_tests", [sys.executable, "-m", "pytest", "-q", "-x", "tests/test_cuda.py"], size.timeout_s,
                  parse=lambda out: out.strip().splitlines()[-1])
    reference = []
    if a.reference:
        reference = ["--reference", a.reference, *(["--reference-pythonpath", a.reference_pythonpath]
                                                   if a.reference_pythonpath else [])]
    steps.run("model_only_eager", throughput(size, "hiend_mae", *reference), size.timeout_s, parse=last_json)
    compiled = ("--compile", size.compile_backend)
    steps.run("model_only_compiled", throughput(size, "hiend_mae", *compiled), size.timeout_s, parse=last_json)
    steps.run("model_only_compiled_primus", throughput(size, "hiend_mae", *compiled, "--arch", size.primus),
              size.timeout_s, parse=last_json)
    make_pool(steps, size, work)
    run_dir = work / "run_hiend_mae"  # compiled on CUDA, as by default
    steps.run("cli_compiled", pretrain_cli(size, "hiend_mae", run_dir), size.timeout_s, parse=cli_history(run_dir))


def part_finetune(steps: Steps, size: Size, work: Path, a: argparse.Namespace) -> None:
    base = [sys.executable, str(BENCH / "finetune_speed.py"), "--device", size.device, *size.finetune]
    steps.run("finetune_eager", base, size.timeout_s, parse=last_json)
    steps.run("finetune_compiled", [*base, "--compile", "--networks", "ours"], size.timeout_s, parse=last_json)


def part_methods(steps: Steps, size: Size, work: Path, a: argparse.Namespace) -> None:
    make_pool(steps, size, work)
    for method in other_methods():
        steps.run(f"model_only_eager_{method}", throughput(size, method), size.timeout_s, parse=last_json)
        run_dir = work / f"run_{method}"
        steps.run(f"cli_eager_{method}", pretrain_cli(size, method, run_dir, "--no-compile"), size.timeout_s,
                  parse=cli_history(run_dir))


PARTS = {"pretrain": part_pretrain, "finetune": part_finetune, "methods": part_methods}


def report(records: list[dict]) -> str:
    """The tables of the GPU issue's targets, with ratios, from one part's records (missing steps are left out)."""
    res = {r["step"]: r["result"] for r in records if r.get("result") is not None}
    lines = ["| step | rc | seconds |", "|---|---|---|"] + [f"| {r['step']} | {r['rc']} | {r['s']} |"
                                                          for r in records]
    first = next((r for r in res.values() if isinstance(r, dict) and "device_name" in r), None)
    if first:
        lines = [f"Device: {first['device_name']}, torch {first['torch']}.", ""] + lines
    rows = []
    for key, label in (("model_only_eager", "eager"), ("model_only_compiled", "compiled"),
                       ("model_only_compiled_primus", "compiled, Primus")):
        if key in res:
            m = res[key]["model_only"]
            rows.append(f"| Hi-End-MAE model only, {label} ({res[key]['arch']}) | {m['crops_per_s']} | "
                        f"{m['peak_mem_gib']} | {m['gflops_per_crop']} | {m['mfu']} |")
    if "model_only_eager" in res and "reference" in res["model_only_eager"]:
        ref = res["model_only_eager"]["reference"]["model_only"]
        rows.append(f"| the reference code | {ref['crops_per_s']} | {ref.get('peak_mem_gib')} | | |")
        for key, label in (("model_only_eager", "eager"), ("model_only_compiled", "compiled")):
            if key in res:
                ratio = res[key]["model_only"]["crops_per_s"] / ref["crops_per_s"]
                rows.append(f"| ours {label} / reference (target 1: >= 2) | {ratio:.2f} | | | |")
    if rows:
        lines += ["", "| target 1 | crops/s | peak GiB | GFLOPs/crop | MFU |", "|---|---|---|---|---|", *rows]
    if "model_only_compiled" in res:
        r = res["model_only_compiled"]
        aug, step = r["augmentation"], r["model_only"]["s_per_step"]
        lines += ["", f"The device augmentation by itself: {1000 * aug['s_per_step']:.2f} ms per step of "
                      f"{aug['bytes_per_step'] / 1e6:.0f} MB in {aug['dtype']}, {aug['s_per_step'] / step:.1%} of the "
                      f"compiled step ({1000 * step:.1f} ms)."]
    rows = []
    pool = res.get("preprocess_unlabeled")
    for method, model_key, cli_key in [("hiend_mae", "model_only_compiled", "cli_compiled")] + [
            (m, f"model_only_eager_{m}", f"cli_eager_{m}") for m in other_methods()]:
        if model_key in res and cli_key in res:
            model, cli = res[model_key]["model_only"]["crops_per_s"], res[cli_key]["steady_crops_per_s"]
            rows.append(f"| {method} | {model} | {cli} ({res[cli_key]['crops_per_s_per_epoch']}) | "
                        f"{cli / model:.2f} |")
    if rows:
        where = (f" on {pool['cases']} cases of {pool['min_shape']} to {pool['max_shape']} voxels" if pool else "")
        lines += ["", f"Target 2 (the CLI's epochs after the first{where}; >= 0.8):", "",
                  "| method | model only, crops/s | the CLI, crops/s (per epoch) | CLI / model only |",
                  "|---|---|---|---|", *rows]
    for key in ("finetune_eager", "finetune_compiled"):
        if key in res:
            lines += ["", f"Target 3, {key.split('_')[1]} (ratios to nnU-Net's default U-Net; <= 1.0):", "",
                      "| network | s / iteration | peak GiB | sliding window s |", "|---|---|---|---|"]
            for name, n in res[key]["networks"].items():
                r = res[key]["ratios_to_default"][name]
                lines.append(f"| {name} | {n['s_per_iter']} ({r['s_per_iter']}x) | {n['peak_mem_gib']} "
                             f"({r['peak_mem_gib']}x) | {n['sliding_window_s']} ({r['sliding_window_s']}x) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=list(PARTS), help="what to measure (see above)")
    p.add_argument("--out", required=True, help="folder for figures.jsonl, figures.md and steps.log ($OUT)")
    p.add_argument("--quick", action="store_true", help="CPU-sized rehearsal of every step")
    p.add_argument("--work", default=None, help="scratch folder for scans, nnU-Net folders and runs (default: a new "
                                                "temporary folder)")
    p.add_argument("--reference", default=None, help="a copy of FengheTan9/Hi-End-MAE outside this tree: its step "
                                                     "is timed next to ours (pretrain part)")
    p.add_argument("--reference-pythonpath", default=None, help="where the reference's timm 0.5.4 is installed")
    a = p.parse_args()
    size = QUICK if a.quick else GPU
    out, work = Path(a.out), Path(a.work or tempfile.mkdtemp(prefix="gpu_figures_"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(work / name)
        (work / name).mkdir(parents=True, exist_ok=True)
    steps = Steps(out, env)
    PARTS[a.part](steps, size, work, a)
    (out / "figures.md").write_text(report(steps.records))
    print((out / "figures.md").read_text())


if __name__ == "__main__":
    main()
