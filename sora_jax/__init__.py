"""sora_jax: Sora-style text-to-video research in JAX/Flax NNX."""

__version__ = "0.1.0"
