"""Shim found by nnU-Net's ``nnUNet_extTrainer`` search: re-exports the trainers, and makes our user errors one line in
the nnU-Net command that imported it.

nnU-Net imports this file as the top-level module ``hiendmae_ext_trainers`` and drops it from ``sys.modules``
afterwards; the classes themselves live in ``nnunetv2_hiendmae.trainers``, so they keep an importable
``__module__`` (pickling, spawn workers).
"""
from nnunetv2_hiendmae.errors import one_line_errors_in_nnunet_commands
from nnunetv2_hiendmae.trainers import *  # noqa: F401,F403 - the re-export

one_line_errors_in_nnunet_commands()
