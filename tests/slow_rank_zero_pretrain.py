"""``nnUNetv2_hiendmae_pretrain`` whose rank 0 reads content fingerprints slowly: ``DELAY_S`` seconds more per case
it fingerprints (a stand-in for raw scans on a slow network disk), for the process-group timeout tests.

Usage: ``torchrun ... slow_rank_zero_pretrain.py DELAY_S <nnUNetv2_hiendmae_pretrain flags>``.
"""
import os
import sys
import time

from pretrain import build, cli

delay_s = float(sys.argv.pop(1))
read_fingerprints = build.pretraining_fingerprints


def slow_on_rank_zero(dataset, identifiers=None, *args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        time.sleep(delay_s * len(identifiers))
    return read_fingerprints(dataset, identifiers, *args, **kwargs)


build.pretraining_fingerprints = slow_on_rank_zero
cli.main(sys.argv[1:])
