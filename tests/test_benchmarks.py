"""The benchmark scripts run as documented and print one JSON line with finite, positive measurements."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_pretrain_throughput_model_and_end_to_end(preprocessed_dataset):
    r = _run("pretrain_throughput.py", "--arch", "vit_tiny", "--patch-size", "16", "32", "32", "--batch-size", "2",
             "--crops-per-volume", "2", "--device", "cpu", "--steps", "2", "--warmup", "1", "--num-workers", "1",
             "-d", str(preprocessed_dataset["id"]), str(preprocessed_dataset["unlabelled_id"]))
    assert r["crops_per_step"] == 4 and r["precision"] == "fp32" and r["patch_size"] == [16, 32, 32]
    for phase in ("model_only", "end_to_end"):
        m = r[phase]
        assert _positive(m["s_per_step"]) and _positive(m["peak_mem_gib"])
        assert abs(m["crops_per_s"] - 4 / m["s_per_step"]) < 0.02 * m["crops_per_s"]


def test_finetune_speed_ratios_to_default_unet():
    r = _run("finetune_speed.py", "--arch", "vit_tiny", "--primus", "S", "--patch-size", "16", "32", "32",
             "--batch-size", "1", "--case-size", "20", "40", "40", "--device", "cpu", "--steps", "1", "--warmup", "1")
    nets = r["networks"]
    assert len(nets) == 3 and "HiEndUNETR vit_tiny" in nets and "Primus-S" in nets
    default = nets["nnUNetTrainer (default U-Net)"]
    for name, m in nets.items():
        assert all(_positive(m[k]) for k in ("params_m", "s_per_iter", "peak_mem_gib", "sliding_window_s")), (name, m)
        ratio = r["ratios_to_default"][name]
        assert abs(ratio["s_per_iter"] - m["s_per_iter"] / default["s_per_iter"]) <= 0.01
    assert r["ratios_to_default"]["nnUNetTrainer (default U-Net)"]["s_per_iter"] == 1.0
