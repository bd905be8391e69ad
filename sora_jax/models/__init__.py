"""Flax NNX models: VAE, DiT, text encoder, attention."""
