"""Diffusion objectives and noise schedules on packed batches (pure functions).

Rectified flow is the default objective: `x_t = (1 - t) * x0 + t * noise`, `t = 1` is pure noise and the
model predicts the velocity `v = noise - x0`. DDPM (eps or v prediction over a discrete alphas_cumprod
schedule) is the alternative. Both are trained with the same masked MSE, `flow_loss` (alias
`diffusion_loss`), against the target their `*_target(s)` function returns.

Packed layout: x is `[B, L, D]`, `segment_ids` is `[B, L]` int32 with 0 = padding and k > 0 = segment k,
and per-segment tables are `[B, S, ...]` with row `k - 1` holding segment k.
"""
from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax import segments

Array = jax.Array


# ---------------------------------------------------------------- packed-table helpers


def tokens_from_table(table: Array, segment_ids: Array) -> Array:
  """Gathers a per-segment table `[B, S, ...]` to tokens `[B, L, ...]`; padding tokens get zeros."""
  return segments.gather(jnp.asarray(table), jnp.asarray(segment_ids))


def _expand_to(t: Array, x: Array) -> Array:
  """Appends trailing unit axes so a per-token `[B, L]` quantity broadcasts against `[B, L, D...]`."""
  t = jnp.asarray(t)
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def segment_counts(segment_ids: Array, max_segments: int, token_weight: Array | None = None) -> Array:
  """Number of (weighted) real tokens per segment, `[B, S]` float32."""
  w = (segment_ids > 0).astype(jnp.float32)
  if token_weight is not None:
    w = w * token_weight.astype(jnp.float32)
  onehot = segment_ids[..., None] == jnp.arange(1, max_segments + 1, dtype=segment_ids.dtype)
  return jnp.einsum("bl,bls->bs", w, onehot.astype(jnp.float32))


# ---------------------------------------------------------------- rectified flow


def interpolate(x0: Array, noise: Array, t_tok: Array) -> Array:
  """`x_t = (1 - t) x0 + t noise` with a per-token t `[B, L]` (or anything broadcastable)."""
  t = _expand_to(t_tok, x0).astype(x0.dtype)
  return (1 - t) * x0 + t * noise


def velocity_target(x0: Array, noise: Array) -> Array:
  """The rectified-flow regression target `noise - x0` (independent of t)."""
  return noise - x0


def x0_from_velocity(x_t: Array, v: Array, t_tok: Array) -> Array:
  """Data prediction implied by a velocity: `x0 = x_t - t v`."""
  return x_t - _expand_to(t_tok, x_t).astype(x_t.dtype) * v


def sample_t(
    rng: Array,
    shape: tuple[int, ...],
    kind: Literal["logit_normal", "uniform"] = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    eps: float = 1e-5,
) -> Array:
  """Draws training times in (0, 1).

  logit_normal (SD3): `sigmoid(N(logit_mean, logit_std))`, concentrating training on mid noise levels.
  The result is clipped to `[eps, 1 - eps]` because float32 sigmoid/uniform can hit exactly 0 or 1.
  """
  if kind == "logit_normal":
    t = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, shape, jnp.float32))
  elif kind == "uniform":
    t = jax.random.uniform(rng, shape, jnp.float32)
  else:
    raise ValueError(f"unknown t distribution {kind!r}")
  return jnp.clip(t, eps, 1 - eps)


def shift_t(t: Array, shift: Array | float) -> Array:
  """Time shift `s t / (1 + (s - 1) t)`: monotone, fixes 0 and 1; `s > 1` moves t towards noise.

  It is the map that rescales the signal-to-noise ratio `((1-t)/t)^2` by `1/s^2`.
  """
  t = jnp.asarray(t, jnp.float32)
  shift = jnp.asarray(shift, jnp.float32)
  return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_tokens: Array, base_tokens: float, max_shift: float) -> Array:
  """Per-segment shift `clip(sqrt(num_tokens / base_tokens), 1, max_shift)`.

  More tokens carry more redundant signal at a given noise level, so larger grids and longer videos
  need more noise (SD3 / Movie Gen use the same sqrt rule). Empty (padding) segments get shift 1.
  """
  n = jnp.asarray(num_tokens, jnp.float32)
  return jnp.clip(jnp.sqrt(n / base_tokens), 1.0, max_shift)


# ---------------------------------------------------------------- loss (both objectives)


def flow_loss(
    pred: Array,
    target: Array,
    segment_ids: Array,
    token_weight: Array | None = None,
    *,
    max_segments: int,
) -> tuple[Array, Array]:
  """Masked MSE: per token over D, per segment over its weighted tokens, then over the segments present.

  Averaging per segment first means a long video counts as much as a single image in the same row.
  A segment exists when it has at least one token with weight > 0; padding never counts.

  Args:
    pred: `[B, L, D...]` model output.
    target: same shape as `pred`.
    segment_ids: `[B, L]` int, 0 = padding.
    token_weight: optional `[B, L]` nonnegative weights (e.g. 0 for conditioning frames).
    max_segments: S, the static size of the per-segment output.

  Returns:
    `(loss, per_segment)`: scalar float32 and `[B, S]` float32 (0 where the segment does not exist).
  """
  diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
  mse = jnp.mean(jnp.square(diff).reshape(diff.shape[:2] + (-1,)), axis=-1)  # [B, L]
  w = (segment_ids > 0).astype(jnp.float32)
  if token_weight is not None:
    w = w * token_weight.astype(jnp.float32)
  onehot = (segment_ids[..., None] == jnp.arange(1, max_segments + 1, dtype=segment_ids.dtype))
  onehot = onehot.astype(jnp.float32)  # [B, L, S]
  num = jnp.einsum("bl,bls->bs", w * mse, onehot)
  den = jnp.einsum("bl,bls->bs", w, onehot)
  exists = den > 0
  per_segment = jnp.where(exists, num / jnp.where(exists, den, 1.0), 0.0)
  n_seg = jnp.sum(exists.astype(jnp.float32))
  loss = jnp.sum(per_segment) / jnp.maximum(n_seg, 1.0)
  return loss, per_segment


diffusion_loss = flow_loss


# ---------------------------------------------------------------- DDPM alternative


def ddpm_schedule(
    num_steps: int = 1000,
    kind: Literal["linear", "cosine"] = "linear",
    zero_terminal_snr: bool = False,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> Array:
  """alphas_cumprod `[num_steps]` float32 (index 0 is the least noisy step).

  linear: DDPM betas, rescaled by `1000 / num_steps` so other step counts keep the same noise range.
  cosine: Nichol & Dhariwal (s = 0.008, betas capped at 0.999).
  zero_terminal_snr: Lin et al. 2024 rescaling of sqrt(alphas_cumprod) so the last step is pure noise
  (train with v prediction then; eps prediction is undefined at SNR 0).
  """
  if kind == "linear":
    scale = 1000.0 / num_steps
    betas = np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64)
  elif kind == "cosine":
    s = 0.008
    f = lambda u: np.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    u = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    betas = np.minimum(1 - f(u[1:]) / f(u[:-1]), 0.999)
  else:
    raise ValueError(f"unknown ddpm schedule {kind!r}")
  ac = np.cumprod(1.0 - betas)
  if zero_terminal_snr:
    sq = np.sqrt(ac)
    first, last = sq[0], sq[-1]
    sq = (sq - last) * first / (first - last)
    ac = sq**2
  return jnp.asarray(ac, jnp.float32)


def ddpm_interpolate(x0: Array, noise: Array, alphas_cumprod_t: Array) -> Array:
  """`x_t = sqrt(a) x0 + sqrt(1 - a) noise` with a per-token `a` `[B, L]`."""
  a = _expand_to(alphas_cumprod_t, x0).astype(jnp.float32)
  return (jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise).astype(x0.dtype)


def ddpm_targets(
    x0: Array,
    noise: Array,
    alphas_cumprod_t: Array,
    prediction: Literal["eps", "v", "x0"] = "eps",
) -> Array:
  """Regression target for DDPM training: eps, v (`sqrt(a) eps - sqrt(1-a) x0`) or x0."""
  if prediction == "eps":
    return noise
  if prediction == "x0":
    return x0
  if prediction == "v":
    a = _expand_to(alphas_cumprod_t, x0).astype(jnp.float32)
    return (jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * x0).astype(x0.dtype)
  raise ValueError(f"unknown prediction type {prediction!r}")


def ddpm_x0_eps(
    x_t: Array,
    model_out: Array,
    alphas_cumprod_t: Array,
    prediction: Literal["eps", "v", "x0"] = "eps",
) -> tuple[Array, Array]:
  """Converts a model output to `(x0_hat, eps_hat)` at noise level `a` (per token `[B, L]`)."""
  a = _expand_to(alphas_cumprod_t, x_t).astype(jnp.float32)
  sa, s1a = jnp.sqrt(a), jnp.sqrt(1 - a)
  x_t = x_t.astype(jnp.float32)
  out = model_out.astype(jnp.float32)
  if prediction == "eps":
    # Clamped so an SNR-0 step gives a huge but finite x0 instead of inf/nan.
    x0 = (x_t - s1a * out) / jnp.maximum(sa, 1e-4)
    return x0, out
  if prediction == "v":
    return sa * x_t - s1a * out, s1a * x_t + sa * out
  if prediction == "x0":
    return out, (x_t - sa * out) / jnp.maximum(s1a, 1e-4)
  raise ValueError(f"unknown prediction type {prediction!r}")
