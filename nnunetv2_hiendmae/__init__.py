"""nnU-Net v2 extension: Hi-End-MAE pretraining of 3D ViTs and fine-tuning them inside nnU-Net."""

__version__ = "0.1.0"
