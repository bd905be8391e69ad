"""Rotary position embeddings for 1D token positions and 3D (t, h, w) spacetime coordinates.

Frequencies are computed from the coordinates of each token, so any grid size or duration works without
retraining and tokens of different samples in one packed row each see their own grid.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _freqs(num_pairs: int, theta: float) -> jax.Array:
  return 1.0 / (theta ** (jnp.arange(num_pairs, dtype=jnp.float32) / num_pairs))


def rope_3d(coords: jax.Array, head_dim: int, theta: float = 10000.0):
  """coords [B, L, 3] -> (cos, sin) [B, L, head_dim // 2].

  The head_dim / 2 rotation pairs are split over (t, h, w) as evenly as possible, the remainder going to
  time (e.g. 64 pairs -> 22, 21, 21), so any even head dim works (Wan-style 128 included).
  """
  if head_dim % 2:
    raise ValueError(f"3D RoPE needs an even head_dim, got {head_dim}")
  half = head_dim // 2
  n_hw = half // 3
  counts = (half - 2 * n_hw, n_hw, n_hw)
  angles = jnp.concatenate([coords[..., i:i + 1].astype(jnp.float32) * _freqs(n, theta)
                            for i, n in enumerate(counts) if n], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def rope_1d(positions: jax.Array, head_dim: int, theta: float = 10000.0):
  """positions [B, L] -> (cos, sin) [B, L, head_dim // 2]."""
  angles = positions[..., None].astype(jnp.float32) * _freqs(head_dim // 2, theta)
  return jnp.cos(angles), jnp.sin(angles)


def apply(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [B, L, H, Dh] by per-token angles (cos, sin [B, L, Dh/2]); pairs are (i, i + Dh/2)."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  return jnp.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).astype(dtype)
