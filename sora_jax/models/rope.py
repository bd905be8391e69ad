"""Position encodings of 1D token positions and 3D (t, h, w) spacetime coordinates.

Rotary embeddings (relative: attention logits depend on coordinate differences) and, optionally, additive
sinusoidal embeddings of the absolute coordinates. Frequencies are computed from the coordinates of each
token, so any grid size or duration works without retraining and tokens of different samples in one packed
row each see their own grid.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax import segments
from sora_jax.parallel import mesh as mesh_lib


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
  return _tables(_angles_3d(coords, head_dim // 2, theta))


def _tables(angles: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(cos, sin) of the angles, computed once.

  Left to itself, XLA:CPU fuses cos and sin into every layer's rotation and evaluates them again for each
  head: 24 rotations (fwd + bwd) of [2, 1280, 6, 64] take 91 ms that way and 31 ms from tables of their own
  (experiments/scaling/README.md). A row-major layout pin keeps the tables buffers of their own; only when
  compiling for CPU, as `layers.Dense`'s pins.
  """
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  if isinstance(angles, jax.core.Tracer) and mesh_lib.target_platform() == "cpu":
    cos, sin = mesh_lib.pin_row_major(cos), mesh_lib.pin_row_major(sin)
  return cos, sin


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
  return _tables(positions[..., None].astype(jnp.float32) * _freqs(head_dim // 2, theta))


def apply(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [B, L, H, Dh] by per-token angles (cos, sin [B, L, Dh/2]); pairs are (i, i + Dh/2)."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  return jnp.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).astype(dtype)


def oblique_3d(coords: jax.Array, dim: int, theta: float = 10000.0, seed: int = 0) -> jax.Array:
  """coords [B, L, 3] -> additive embedding [B, L, dim] of plane waves in spacetime: [cos | sin] of
  omega_k . (t, h, w) for dim / 2 fixed frequency vectors with directions uniform on the sphere and
  magnitudes spread geometrically over [1 / theta, 1] (as the per-axis frequencies of `sincos_3d`).

  An axis-aligned embedding describes a token's frame and its place in the frame separately, so anything
  that depends on both together (where an object moving left is at time t) is a product the network has to
  build. A wave with both time and space components is already such a function: cos(a w - b t) is a grating
  moving at b / a tokens per frame, so a condition can select a motion by scaling one feature.
  """
  if dim % 2:
    raise ValueError(f"oblique_3d needs an even dim, got {dim}")
  rng = np.random.default_rng(seed)
  directions = rng.standard_normal((dim // 2, 3))
  directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
  magnitudes = theta ** -rng.uniform(0.0, 1.0, dim // 2)
  omega = jnp.asarray((directions * magnitudes[:, None]).T, jnp.float32)  # [3, dim / 2]
  angles = coords.astype(jnp.float32) @ omega
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def segment_extent(coords: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """Largest (t, h, w) coordinate of each token's own segment: float [B, L, 3] (0 on padding).

  The grid a token belongs to, read from the packed row itself (no side input), so that positions can be
  given as fractions of the clip whatever its size."""
  oh = segments.onehot(segment_ids, num_segments, dtype=jnp.bool_)  # [B, L, S]
  ext = jnp.max(jnp.where(oh[..., None], coords.astype(jnp.float32)[:, :, None, :], 0.0), axis=1)  # [B, S, 3]
  return segments.gather(ext, segment_ids)


def fractional_3d(coords: jax.Array, extent: jax.Array, dim: int, time: bool = True) -> jax.Array:
  """coords, extent [B, L, 3] -> additive embedding [B, L, dim]: per axis, [cos | sin] of pi k f for
  k = 1..n, where f = coord / extent is the token's place as a fraction of its clip (0 at the first
  frame / top / left, 1 at the last / bottom / right; 0 on an axis of length 1). With `time=False` only
  the place in the frame is given (all pairs split over h and w): which frame a token is in stays
  relative (RoPE), so a clip shifted in time looks the same to the network.

  With integer coordinates, "the right edge" is a different feature in a 4-token-wide and a 6-token-wide
  clip, so a condition that means "on the right early, on the left late" has to be learnt per grid size;
  as fractions, every size shares it (NaViT's fractional position embeddings, in sinusoidal form).
  """
  if dim % 2:
    raise ValueError(f"fractional_3d needs an even dim, got {dim}")
  frac = coords.astype(jnp.float32) / jnp.maximum(extent.astype(jnp.float32), 1.0)
  pairs = dim // 2
  split = _split_3d(pairs) if time else (0, pairs - pairs // 2, pairs // 2)
  angles = jnp.concatenate([frac[..., i:i + 1] * (jnp.pi * jnp.arange(1, n + 1, dtype=jnp.float32))
                            for i, n in enumerate(split) if n], axis=-1)
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


ABS_POS_KINDS = ("axes", "oblique", "fractional", "fractional_space")


def absolute_3d(kind: str, coords: jax.Array, dim: int, theta: float = 10000.0, *,
                segment_ids: jax.Array | None = None, num_segments: int | None = None) -> jax.Array:
  """The additive absolute embedding named by `dit.abs_pos_kind`: 'axes' (`sincos_3d`), 'oblique'
  (`oblique_3d`), 'fractional' (`fractional_3d`, which needs the packed row's segment ids) or
  'fractional_space' (the same for h and w only: no absolute time)."""
  if kind == "axes":
    return sincos_3d(coords, dim, theta)
  if kind == "oblique":
    return oblique_3d(coords, dim, theta)
  if kind in ("fractional", "fractional_space"):
    if segment_ids is None or num_segments is None:
      raise ValueError(f"abs_pos_kind={kind!r} needs segment_ids and num_segments")
    return fractional_3d(coords, segment_extent(coords, segment_ids, num_segments), dim,
                         time=kind == "fractional")
  raise ValueError(f"dit.abs_pos_kind={kind!r}: choose one of {ABS_POS_KINDS}")
