"""``benchmarks/gpu_figures.py`` rehearsed at CPU size: every command of a part runs, its figures are recorded as
they come, and the report sets them against each other, so that the script's run on a GPU measures instead of
failing on a wiring error."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BENCH, benchmark_module


def rehearse(part: str, out: Path) -> dict[str, dict]:
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_figures.py"), part, "--quick", "--out", str(out),
                           "--work", str(out / "work")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "figures.jsonl").read_text().splitlines()]
    assert all(r["rc"] == 0 for r in records), [(r["step"], r["rc"]) for r in records]
    assert (out / "steps.log").read_text().count("==== ") == len(records)
    return {r["step"]: r["result"] for r in records if "result" in r}


@pytest.mark.slow
def test_pretrain_part_measures_the_model_then_the_cli_on_preprocessed_scans(tmp_path):
    quick = benchmark_module("gpu_figures").QUICK
    res = rehearse("pretrain", tmp_path)
    assert set(res) == {"model_only_eager", "model_only_compiled", "model_only_compiled_primus",
                        "preprocess_unlabeled", "cli_compiled"}
    assert res["model_only_compiled_primus"]["arch"] == quick.primus
    assert res["model_only_eager"]["compile"] is False and res["model_only_compiled"]["compile"] is True
    assert res["model_only_compiled"]["compile_backend"] == res["model_only_compiled_primus"]["compile_backend"] \
        == quick.compile_backend == "aot_eager"  # the CPU rehearsal traces without inductor's code generation
    assert res["model_only_compiled"]["arch"] == quick.arch and res["model_only_compiled"]["patch_size"] == [32] * 3
    assert res["preprocess_unlabeled"]["cases"] == quick.scans
    assert all(s >= 32 for s in res["preprocess_unlabeled"]["min_shape"])  # larger than a crop on every axis
    cli = res["cli_compiled"]
    assert len(cli["crops_per_s_per_epoch"]) == len(cli["epoch_time_s"]) == quick.epochs
    assert cli["steady_crops_per_s"] == pytest.approx(sum(cli["crops_per_s_per_epoch"][1:]) / (quick.epochs - 1),
                                                      abs=0.1)
    report = (tmp_path / "figures.md").read_text()
    ratio = cli["steady_crops_per_s"] / res["model_only_compiled"]["model_only"]["crops_per_s"]
    assert f"| hiend_mae | {res['model_only_compiled']['model_only']['crops_per_s']} | " in report
    assert f"| {ratio:.2f} |" in report
    assert "| Hi-End-MAE model only, eager (vit_tiny) |" in report
    assert "| Hi-End-MAE model only, compiled (vit_tiny) |" in report
    assert "| Hi-End-MAE model only, compiled, Primus (primus_tiny) |" in report
    aug = res["model_only_compiled"]["augmentation"]
    assert f"The device augmentation by itself: {1000 * aug['s_per_step']:.2f} ms per step" in report


@pytest.mark.slow
def test_methods_part_measures_every_other_method_model_only_and_in_the_cli(tmp_path):
    res = rehearse("methods", tmp_path)
    report = (tmp_path / "figures.md").read_text()
    for method in benchmark_module("gpu_figures").other_methods():
        assert res[f"model_only_eager_{method}"]["method"] == method
        assert res[f"cli_eager_{method}"]["steady_crops_per_s"] > 0
        assert f"| {method} | " in report


def test_a_failing_or_hung_step_is_recorded_and_the_next_ones_run(tmp_path):
    steps = benchmark_module("gpu_figures").Steps(tmp_path, env={})
    steps.run("fails", [sys.executable, "-c", "import sys; print('partial'); sys.exit(3)"], 60, parse=len)
    steps.run("hangs", [sys.executable, "-c", "import time; time.sleep(60)"], 1)
    steps.run("garbled", [sys.executable, "-c", "print('not json')"], 60, parse=json.loads)
    assert steps.run("works", [sys.executable, "-c", "print('{\"a\": 1}')"], 60, parse=json.loads) == {"a": 1}
    records = [json.loads(line) for line in (tmp_path / "figures.jsonl").read_text().splitlines()]
    assert [(r["step"], r["rc"]) for r in records] == [("fails", 3), ("hangs", "timeout"), ("garbled", "unparsed"),
                                                       ("works", 0)]
    assert "partial" in (tmp_path / "steps.log").read_text()
