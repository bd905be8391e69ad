"""Position encodings of 1D token positions and 3D (t, h, w) spacetime coordinates.

Rotary embeddings (relative: attention logits depend on coordinate differences) and, optionally, additive
sinusoidal embeddings of the absolute coordinates. Frequencies are computed from the coordinates of each
token, so any grid size or duration works without retraining and tokens of different samples in one packed
row each see their own grid.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _freqs(num_pairs: int, theta: float) -> jax.Array:
  return 1.0 / (theta ** (jnp.arange(num_pairs, dtype=jnp.float32) / num_pairs))


def _split_3d(pairs: int) -> tuple[int, int, int]:
  """Pairs per axis (t, h, w), as even as possible, the remainder going to time."""
  n_hw = pairs // 3
  return pairs - 2 * n_hw, n_hw, n_hw


def _angles_3d(coords: jax.Array, pairs: int, theta: float) -> jax.Array:
  return jnp.concatenate([coords[..., i:i + 1].astype(jnp.float32) * _freqs(n, theta)
                          for i, n in enumerate(_split_3d(pairs)) if n], axis=-1)


def rope_3d(coords: jax.Array, head_dim: int, theta: float = 10000.0):
  """coords [B, L, 3] -> (cos, sin) [B, L, head_dim // 2].

  The head_dim / 2 rotation pairs are split over (t, h, w) as evenly as possible, the remainder going to
  time (e.g. 64 pairs -> 22, 21, 21), so any even head dim works (Wan-style 128 included).
  """
  if head_dim % 2:
    raise ValueError(f"3D RoPE needs an even head_dim, got {head_dim}")
  angles = _angles_3d(coords, head_dim // 2, theta)
  return jnp.cos(angles), jnp.sin(angles)


def sincos_3d(coords: jax.Array, dim: int, theta: float = 10000.0) -> jax.Array:
  """coords [B, L, 3] -> additive absolute embedding [B, L, dim]: [cos | sin] of the same per-axis angles
  as `rope_3d` with dim / 2 pairs. Tells each token where it is in its clip (which frame, how far from the
  top-left corner), which relative RoPE alone cannot."""
  if dim % 2:
    raise ValueError(f"sincos_3d needs an even dim, got {dim}")
  angles = _angles_3d(coords, dim // 2, theta)
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


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
