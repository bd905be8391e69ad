"""Per-segment tables <-> per-token values for packed rows (segment id 0 = padding, k -> table row k-1).

Gathers and segment sums are one-hot matmuls rather than gathers/scatters: S is small, and on CPU and TPU
a scatter-add in the backward pass is far slower than a thin matmul.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def onehot(segment_ids: jax.Array, num_segments: int, dtype=jnp.float32) -> jax.Array:
  """[B, L] ids -> [B, L, S] one-hot (padding rows are all zero)."""
  return (segment_ids[..., None] == jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)).astype(dtype)


def gather(table: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Per-segment table [B, S, ...] -> per-token [B, L, ...]; padding tokens get zeros."""
  b, s = table.shape[:2]
  flat = table.reshape(b, s, -1)
  out = jnp.einsum("bls,bsf->blf", onehot(segment_ids, s, flat.dtype), flat,
                   precision=jax.lax.Precision.HIGHEST)
  return out.reshape(segment_ids.shape + table.shape[2:])


def count(mask: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """Number of tokens per segment where `mask` [B, L] holds: [B, S] float."""
  return jnp.einsum("bls,bl->bs", onehot(segment_ids, num_segments), mask.astype(jnp.float32))


def mean(x: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """Mean of token features per segment: x [B, L, D] -> [B, S, D] (empty segments: 0)."""
  oh = onehot(segment_ids, num_segments)
  total = jnp.einsum("bls,bld->bsd", oh, x.astype(jnp.float32))
  count = jnp.sum(oh, axis=1)[..., None]
  return (total / jnp.maximum(count, 1.0)).astype(x.dtype)


def location_ids(segment_ids: jax.Array, coords: jax.Array) -> jax.Array:
  """One id per (segment, h, w) of a packed row: int32 [B, L] (0 on padding), from coords [B, L, 3] (t, h, w).

  Used as segment ids, it limits attention to the tokens at the same place of the same clip, i.e. to the
  time series of one location (temporal attention) with the same attention function and backends.
  """
  h, w = coords[..., 1].astype(jnp.int32), coords[..., 2].astype(jnp.int32)
  num_h, num_w = jnp.max(h) + 1, jnp.max(w) + 1
  seg = segment_ids.astype(jnp.int32)
  return jnp.where(seg > 0, ((seg - 1) * num_h + h) * num_w + w + 1, 0)
