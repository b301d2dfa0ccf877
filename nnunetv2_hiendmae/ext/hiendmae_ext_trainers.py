"""Shim found by nnU-Net's ``nnUNet_extTrainer`` search: re-exports the trainers, nothing else.

nnU-Net imports this file as the top-level module ``hiendmae_ext_trainers`` and drops it from ``sys.modules``
afterwards; the classes themselves live in ``nnunetv2_hiendmae.trainers``, so they keep an importable
``__module__`` (pickling, spawn workers).
"""
from nnunetv2_hiendmae.trainers import *  # noqa: F401,F403 - the re-export is this module's only job
