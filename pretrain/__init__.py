"""Hi-End-MAE self-supervised pretraining on nnU-Net preprocessed data."""
