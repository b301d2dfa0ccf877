"""nnU-Net v2 extension: Hi-End-MAE pretraining of 3D ViTs and fine-tuning them inside nnU-Net."""

import warnings

__version__ = "0.1.0"

# torchvision (pulled in by timm) warns on import under recent torch; it is noise in every command's output.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.interface.* is deprecated", category=FutureWarning)
