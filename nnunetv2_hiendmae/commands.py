"""Running the real commands (ours and nnU-Net's) as subprocesses, with nnU-Net's expected noise hidden.

Used by the demo and by ``nnUNetv2_hiendmae_study``: the executables installed next to the running Python (a virtual
environment need not be on PATH), the command line echoed, its output streamed line by line without the lines of
:data:`NOISE` that look like failures but are expected.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

# nnU-Net output that looks like failure but is expected here (explained once by NOISE_NOTE and hidden)
NOISE = [re.compile(rb) for rb in (
    rb"Trainer '[^']+' not found in nnunetv2\.training\.nnUNetTrainer",  # then found through nnUNet_extTrainer
    rb"Searching in external trainer paths from environment variable",
    rb"^Searching in: ", rb"Searching for class \S+ in folder",
    rb"Unable to plot network architecture", rb"No module named 'hiddenlayer'",  # optional plot
    rb"torch\.jit\.interface. is deprecated",  # torchvision under recent torch
)]
WARNING_WITH_SOURCE_LINE = [re.compile(rb"Warning: ")]  # a Python warning prints its source line after it
GPU_WORDING_ON_CPU = [re.compile(rb"GPU prediction completed")]
NOISE_NOTE = ("Note: nnU-Net's own lines that look like failures but are expected here are hidden: the search for our "
              "trainers ('Trainer ... not found in nnunetv2.training.nnUNetTrainer. Searching ...'; they are then "
              "found through nnUNet_extTrainer), the optional network plot ('No module named hiddenlayer'), "
              "'GPU prediction completed' when predicting on a CPU, and torchvision's torch.jit FutureWarning.")


def executable(name: str) -> str:
    """The command installed next to this Python if there is one, else ``name`` (looked up on PATH)."""
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else name


def run_filtered(cmd: Sequence[str], env: Mapping[str, str], on_cpu: bool = False) -> int:
    """Echo ``$ cmd``, run it, stream its stdout and stderr to our stdout without :data:`NOISE` (and nnU-Net's GPU
    wording when ``on_cpu``); returns the exit status. Progress bars that redraw with \\r inside a line pass whole."""
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    proc = subprocess.Popen([executable(cmd[0]), *cmd[1:]], env=dict(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    noise = NOISE + (GPU_WORDING_ON_CPU if on_cpu else [])
    line, skip_next = b"", False
    while chunk := proc.stdout.read1(65536):
        line += chunk
        *done, line = line.split(b"\n")
        for text in done:
            if skip_next or any(p.search(text) for p in noise):
                skip_next = any(p.search(text) for p in WARNING_WITH_SOURCE_LINE)
                continue
            sys.stdout.buffer.write(text + b"\n")
        sys.stdout.buffer.flush()
    sys.stdout.buffer.write(line)
    sys.stdout.buffer.flush()
    return proc.wait()
