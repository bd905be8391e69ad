"""Normalisation functions shared by the layers and the attention prologue (one formula each)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array | None, eps: float) -> jax.Array:
  """x / sqrt(mean(x^2) + eps) over the last axis, times `scale` (or not, when None); computed in float32,
  returned in x.dtype."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  if scale is not None:
    x = x * scale
  return x.astype(dtype)
