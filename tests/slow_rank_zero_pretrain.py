"""``nnUNetv2_hiendmae_pretrain`` whose rank 0 reads content fingerprints slowly: ``DELAY_S`` seconds more per case
it fingerprints (a stand-in for raw scans on a slow network disk), for the process-group timeout tests. Where
``$PAUSE_AT_STEP`` is set, rank 0 pauses after that optimiser step until a stop signal arrives, having created
``$PAUSED_FILE``: a test signals the run then, and knows the step every rank stops after.

Usage: ``torchrun ... slow_rank_zero_pretrain.py DELAY_S <nnUNetv2_hiendmae_pretrain flags>``.
"""
import os
import sys
import time
from pathlib import Path

from pretrain import build, cli, train

delay_s = float(sys.argv.pop(1))
read_fingerprints = build.pretraining_fingerprints
step = train.PretrainRun._step


def slow_on_rank_zero(dataset, identifiers=None, *args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        time.sleep(delay_s * len(identifiers))
    return read_fingerprints(dataset, identifiers, *args, **kwargs)


def step_then_pause(self, t):
    step(self, t)
    if self.is_main and self.global_step == int(os.environ.get("PAUSE_AT_STEP", -1)):
        Path(os.environ["PAUSED_FILE"]).touch()
        deadline = time.monotonic() + 120
        while self.stop.requested is None and time.monotonic() < deadline:
            time.sleep(0.01)


build.pretraining_fingerprints = slow_on_rank_zero
train.PretrainRun._step = step_then_pause
cli.main(sys.argv[1:])
