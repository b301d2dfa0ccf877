"""Every command's ``--help`` comes back at once: no torch / nnU-Net import before the arguments are parsed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from conftest import console_script

SCRIPTS = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
HEAVY = ("torch", "nnunetv2", "monai", "timm", "SimpleITK", "matplotlib", "blosc2", "dynamic_network_architectures")
PROBE = """
import importlib, json, sys
module, func = sys.argv[1].split(":")
try:
    getattr(importlib.import_module(module), func)(["--help"])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "heavy": sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[2:]))}))
"""


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_imports_nothing_heavy(script):
    """What makes ``--help`` instant, measured where it cannot flake: no heavy package is imported before parsing
    (a wall-clock bound would fail on a loaded machine with nothing broken)."""
    proc = subprocess.run([sys.executable, "-c", PROBE, SCRIPTS[script], *HEAVY], capture_output=True, text=True,
                          timeout=120)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}, (script, result)
    assert "usage:" in proc.stdout and "--help" in proc.stdout
    description = proc.stdout.split("\n\n")[1]  # after the usage block
    assert description[0].isupper() and "``" not in proc.stdout, description  # plain text, a sentence
    run = subprocess.run([console_script(script), "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout == proc.stdout.rsplit("\n", 2)[0] + "\n"  # the installed command


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_unknown_flag_is_one_error_line(script):
    proc = subprocess.run([console_script(script), "--bogus-flag"], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), (script, proc.stderr)
    assert proc.stdout == ""


def test_license_is_an_spdx_string():
    """setuptools deprecated the ``license = {text = ...}`` table (three warnings per install)."""
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in project["build-system"]["requires"]  # the first release that reads the SPDX form
