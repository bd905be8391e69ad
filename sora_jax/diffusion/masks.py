"""Frame-conditioning masks in latent time: which tokens of a packed row are given clean.

One mechanism serves every frame-conditioned capability (image-to-video, extension forward and backward,
connecting clips, looping). In training a strategy is drawn per segment from a configurable mix; a token
is conditioned according to its latent frame (`coords[..., 0]`, in temporal patches) and its segment's
frame count (`grid[..., 0]`), so the data pipeline does not change. Conditioned tokens take their clean
value in `x_t`, are modulated as t = 0 by the DiT, and are left out of the loss.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax import segments

Array = jax.Array

STRATEGIES = ("none", "first", "last", "first_last", "prefix", "suffix", "random")
# Fewest latent frames a strategy needs to leave at least one frame to generate; shorter segments
# (images, 1 frame) fall back to "none".
_MIN_FRAMES = np.array([1, 2, 2, 3, 2, 2, 2], np.int32)
# Probability that a frame is given under "random" (one frame per segment is always left free).
RANDOM_FRAME_P = 0.5


def default_ratios() -> dict[str, float]:
  """Half the segments unconditioned, the other half shared evenly by the conditioning strategies."""
  rest = 0.5 / (len(STRATEGIES) - 1)
  return {s: (0.5 if s == "none" else rest) for s in STRATEGIES}


def strategy_probs(mask_ratios: Mapping[str, float] | None) -> np.ndarray:
  """Validated probabilities in `STRATEGIES` order from a {strategy: weight} dict (None: always "none")."""
  if mask_ratios is None:
    mask_ratios = {"none": 1.0}
  probs = np.zeros(len(STRATEGIES), np.float64)
  for name, w in dict(mask_ratios).items():
    if name not in STRATEGIES:
      raise ValueError(f"cond.mask_ratios: unknown strategy {name!r}; choose from {STRATEGIES}")
    if not np.isfinite(w) or w < 0:
      raise ValueError(f"cond.mask_ratios[{name!r}]={w!r}: must be a finite non-negative number")
    probs[STRATEGIES.index(name)] = w
  if probs.sum() <= 0:
    raise ValueError(f"cond.mask_ratios={dict(mask_ratios)!r}: weights must not all be zero")
  return (probs / probs.sum()).astype(np.float32)


def frame_mask(strategy: Array, frame: Array, num_frames: Array, k: Array, free: Array,
               u: Array) -> Array:
  """Per-token conditioning mask (bool) from per-token values (pure, no randomness).

  Args:
    strategy: index into `STRATEGIES` of the token's segment.
    frame: the token's latent frame, in [0, num_frames).
    num_frames: its segment's latent frame count.
    k: prefix/suffix length of its segment, in [1, num_frames - 1].
    free: the frame "random" never conditions, in [0, num_frames).
    u: a uniform draw per (segment, frame): "random" conditions the frame when `u < RANDOM_FRAME_P`.
  """
  first, last = frame == 0, frame == num_frames - 1
  options = [
      jnp.zeros_like(first),                        # none
      first,                                        # first
      last,                                         # last
      first | last,                                 # first_last
      frame < k,                                    # prefix
      frame >= num_frames - k,                      # suffix
      (u < RANDOM_FRAME_P) & (frame != free),       # random
  ]
  return jnp.select([strategy == i for i in range(len(STRATEGIES))], options, False)


def sample_strategies(rng: Array, num_frames: Array, probs: np.ndarray, given: Array | None = None) -> Array:
  """Strategy index per segment `[B, S]` int32; strategies the segment is too short for become "none".

  `given` `[B, S]` int: a fixed strategy per segment where >= 0 (the packed batch's `given` table), else drawn.
  """
  logits = jnp.log(jnp.asarray(probs, jnp.float32))
  strategy = jax.random.categorical(rng, logits, shape=num_frames.shape).astype(jnp.int32)
  if given is not None:
    strategy = jnp.where(given >= 0, given.astype(jnp.int32), strategy)
  return jnp.where(num_frames >= jnp.asarray(_MIN_FRAMES)[strategy], strategy, 0)


def sample_token_mask(rng: Array, frame: Array, segment_ids: Array, num_frames: Array,
                      probs: np.ndarray, given: Array | None = None) -> Array:
  """Draws a strategy per segment and returns the conditioning mask of the tokens, bool `[B, L]`.

  Args:
    rng: PRNG key.
    frame: `[B, L]` int latent frame of each token (`coords[..., 0]`).
    segment_ids: `[B, L]` int, 0 = padding (never conditioned).
    num_frames: `[B, S]` int latent frames per segment (`grid[..., 0]`); 0 for empty table rows.
    probs: `[len(STRATEGIES)]` from `strategy_probs`.
    given: `[B, S]` int, optional: segments where it is >= 0 take that strategy instead of a drawn one.
  """
  rng_s, rng_k, rng_f, rng_u = jax.random.split(rng, 4)
  n = num_frames.astype(jnp.int32)
  strategy = sample_strategies(rng_s, n, probs, given)
  nf = n.astype(jnp.float32)
  k = 1 + jnp.floor(jax.random.uniform(rng_k, n.shape) * jnp.maximum(nf - 1, 0)).astype(jnp.int32)
  free = jnp.floor(jax.random.uniform(rng_f, n.shape) * nf).astype(jnp.int32)
  # Small integer tables gather exactly through the float one-hot matmul.
  table = jnp.stack([strategy, n, k, free], axis=-1).astype(jnp.float32)
  strategy_t, n_t, k_t, free_t = jnp.moveaxis(
      jnp.round(segments.gather(table, segment_ids)).astype(jnp.int32), -1, 0)
  # One uniform per (row, segment, frame): every token of a latent frame gets the same draw.
  b, _ = segment_ids.shape
  row_seg = jnp.arange(b, dtype=jnp.int32)[:, None] * (n.shape[1] + 1) + segment_ids.astype(jnp.int32)
  draw = lambda i, f: jax.random.uniform(jax.random.fold_in(jax.random.fold_in(rng_u, i), f))  # noqa: E731
  u = jax.vmap(draw)(row_seg.reshape(-1), frame.astype(jnp.int32).reshape(-1)).reshape(frame.shape)
  return frame_mask(strategy_t, frame, n_t, k_t, free_t, u) & (segment_ids > 0)
