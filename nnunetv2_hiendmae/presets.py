"""Encoder presets as plain data (no torch import, so command-line ``--help`` stays instant)."""

# Presets are data: every encoder is built from one of these plus in_channels / pos-embed options.
PRESETS: dict[str, dict] = {
    "vit_tiny": dict(embed_dim=96, depth=4, num_heads=4, token_size=16),  # CPU tests and the demo
    "vit_b16": dict(embed_dim=768, depth=12, num_heads=12, token_size=16),
    "vit_l16": dict(embed_dim=1536, depth=12, num_heads=16, token_size=16),
    "vit_l12": dict(embed_dim=1536, depth=12, num_heads=16, token_size=12),  # the released Hi-End-MAE model
}
