"""Cases per second and peak memory of ``nnUNetv2_hiendmae_embed`` on CT-like scans: the real command, as run.

Writes ``-n`` scans (the phantom of ``make_scans.py`` at ``--scale``) and a pretraining checkpoint of ``--arch`` with
random weights (what speed and memory depend on is the architecture, the patch and the data, not the weights: spacing
1.5 mm, CT window -175..250 HU, patch ``--patch-size``), then runs the command once per ``-np`` given and reports one
JSON line: per run, the command's own rate (its loop, the first case included) and that of the whole call (start-up
included), how long its encoder waited for reading and preprocessing, and the peak memory of the command and its
loader workers together (the sum of their proportional set sizes, sampled every 50 ms; Linux).

    python benchmarks/embed_throughput.py --arch vit_b16 -n 3 --scale 2.4 -np 0 1
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from make_scans import write_scans

from nnunetv2_hiendmae.checkpoint import make_checkpoint, save_atomic
from nnunetv2_hiendmae.encoders import build_encoder
from nnunetv2_hiendmae.presets import PRESETS, ct_window_statistics, encoder_config

COMMAND = Path(sys.executable).parent / "nnUNetv2_hiendmae_embed"
RATE = re.compile(r"\((?P<cases>\d+) in (?P<s>[\d.]+) s\); the encoder waited (?P<wait>[\d.]+) s")


def write_random_checkpoint(path: Path, arch: str, patch: list[int]) -> Path:
    """A pretraining checkpoint of ``arch`` with random weights, pretrained (so it says) at 1.5 mm on CT."""
    enc = encoder_config(arch)
    weights = {f"encoder.{k}": v for k, v in build_encoder(enc).state_dict().items()}
    pretrain = {"spacing": [1.5] * 3, "transpose_forward": [0, 1, 2], "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "foreground_intensity_properties_per_channel": {"0": ct_window_statistics(-175, 250)},
                "channel_names": {"0": "CT"}, "in_channels": 1, "patch_size": list(patch),
                "token_size": [enc["token_size"]] * 3}
    save_atomic(make_checkpoint(weights, enc, {}, pretrain), path)
    return path


def tree_pss_bytes(pid: int) -> int:
    """Proportional set size of a process and all its descendants (shared pages counted once), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return total


def run_command(args: list[str]) -> dict:
    """Run the command, sampling its tree's memory; its summary line parsed."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(COMMAND), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], tree_pss_bytes(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{COMMAND.name} failed ({proc.returncode}): {err[-2000:]}")
    m = RATE.search(out)
    cases, loop = int(m["cases"]), float(m["s"])
    return {"cases": cases, "loop_s": loop, "cases_per_s": round(cases / loop, 4), "wall_s": round(wall, 1),
            "cases_per_s_with_startup": round(cases / wall, 4), "encoder_waited_s": float(m["wait"]),
            "peak_memory_gib": round(peak[0] / 2**30, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(PRESETS), default="vit_tiny", help="(default: %(default)s)")
    p.add_argument("-n", "--scans", type=int, default=3, help="scans (default: %(default)s)")
    p.add_argument("--scale", type=float, default=2.4,
                   help="field of view relative to the demo's; 2.4 gives about 225 x 350 x 360 voxels at 1.5 mm "
                        "(default: %(default)s)")
    p.add_argument("--patch-size", type=int, nargs=3, default=[96, 96, 96], help="(default: 96 96 96)")
    p.add_argument("-np", "--num-processes", type=int, nargs="+", default=[0, 1],
                   help="loader workers, one run each (default: 0 1)")
    p.add_argument("--device", default="cpu", help="the command's -device (default: %(default)s)")
    p.add_argument("--reader", help="the command's --reader, e.g. NibabelIOWithReorient where SimpleITK is missing")
    p.add_argument("--work-dir", help="keep scans and outputs here (default: a temporary folder)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work_dir or tmp)
        scans = work / f"scans_{a.scans}_x{a.scale}"  # written once per count and size, reused by later runs
        if not scans.is_dir():
            write_scans(scans, a.scans, a.scale)
        ckpt = write_random_checkpoint(work / f"{a.arch}.pth", a.arch, a.patch_size)
        runs = {}
        for n in a.num_processes:
            out = work / f"out_{a.arch}_np{n}"
            shutil.rmtree(out, ignore_errors=True)  # a run from scratch, not a resumed one
            args = ["-i", str(scans), "-pt", str(ckpt), "-o", str(out), "-np", str(n), "-device", a.device]
            runs[f"np{n}"] = run_command(args + (["--reader", a.reader] if a.reader else []))
        print(json.dumps({"arch": a.arch, "patch_size": a.patch_size, "scans": a.scans, "scale": a.scale,
                          "device": a.device, "torch_threads": torch.get_num_threads(), "runs": runs}))


if __name__ == "__main__":
    main()
