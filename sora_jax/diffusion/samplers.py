"""Samplers for packed batches: flow ODE solvers, DDIM / ancestral DDPM, classifier-free guidance.

Every solver is a pure function built on `lax.fori_loop`, so it jits with the model closed over:
`jax.jit(lambda p, x: sample_flow(lambda x, t: apply(p, x, t), x, ts, seg))`.

Time is per segment: the model is called as `fn(x [B, L, D], table [B, S])`, each segment following its
own schedule (e.g. its own resolution shift). Padding tokens are never updated.

Conditioning (image-to-video, extension): tokens with `cond_mask == 1` are given clean. They are written
to `cond_x0` before every model call and after every step, so they are exactly `cond_x0` at the end. The
t table cannot say "t = 0 for these tokens": the velocity function passes the mask to the model itself
(the DiT's `cond_mask`, which modulates those tokens as t = 0).
"""
from __future__ import annotations

from typing import Callable, Literal

import jax
import jax.numpy as jnp

from sora_jax.diffusion import flow

Array = jax.Array
VelocityFn = Callable[[Array, Array], Array]

FLOW_SOLVERS = ("euler", "heun", "dpmpp_2m")
DDPM_SOLVERS = ("ddim", "ancestral")


def cfg(v_cond: Array, v_uncond: Array, scale: Array | float) -> Array:
  """Classifier-free guidance `v_uncond + scale (v_cond - v_uncond)` (scale 1 = conditional only)."""
  return v_uncond + scale * (v_cond - v_uncond)


def cfg_dual(v_full: Array, v_visual: Array, v_none: Array, text_scale: Array | float,
             visual_scale: Array | float) -> Array:
  """Guidance with separate text and visual-condition scales (InstructPix2Pix's two-term CFG).

  `v_full` sees text and frames, `v_visual` the frames only, `v_none` neither:
  `v_none + s_vis (v_visual - v_none) + s_text (v_full - v_visual)`; both scales 1 give `v_full`.
  """
  return v_none + visual_scale * (v_visual - v_none) + text_scale * (v_full - v_visual)


def flow_timesteps(num_steps: int, shift: Array | float = 1.0, strength: Array | float = 1.0) -> Array:
  """Times `[num_steps + 1, B, S]` from `strength` to 0: uniform in t, then shifted per segment.

  `shift` and `strength` are `[B, S]` tables or scalars (giving the broadcast of their shapes). A
  strength below 1 starts part-way (SDEdit); strength 0 makes every step the identity.
  """
  shift = jnp.asarray(shift, jnp.float32)
  strength = jnp.asarray(strength, jnp.float32)
  shape = jnp.broadcast_shapes(shift.shape, strength.shape)
  t = jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32).reshape((-1,) + (1,) * len(shape))
  return flow.shift_t(t * strength[None], shift[None])


def _conditioner(x_init, cond_x0, cond_mask):
  """Returns `apply(x)` that pins the conditioning tokens to their clean value."""
  if cond_mask is None:
    return lambda x: x
  if cond_x0 is None:
    raise ValueError("cond_mask needs cond_x0")
  keep = flow._expand_to(cond_mask.astype(bool), x_init)  # pylint: disable=protected-access
  clean = cond_x0.astype(x_init.dtype)
  return lambda x: jnp.where(keep, clean, x)


def sample_flow(
    velocity_fn: VelocityFn,
    x_init: Array,
    t_schedule: Array,
    segment_ids: Array,
    solver: Literal["euler", "heun", "dpmpp_2m"] = "euler",
    cond_x0: Array | None = None,
    cond_mask: Array | None = None,
) -> Array:
  """Integrates `dx/dt = v(x, t)` along `t_schedule` (usually 1 -> 0) and returns x at the last time.

  Args:
    velocity_fn: `(x [B, L, D], t_table [B, S]) -> v [B, L, D]`.
    x_init: `[B, L, D]` state at `t_schedule[0]` (noise for t = 1).
    t_schedule: `[N + 1, B, S]` per-segment times (see `flow_timesteps`), decreasing.
    segment_ids: `[B, L]` int, 0 = padding (kept as in `x_init`).
    solver: "euler" (N calls), "heun" (2N - 1 calls: the last step is Euler), or "dpmpp_2m" (N calls).
    cond_x0: `[B, L, D]` clean values for conditioning tokens.
    cond_mask: `[B, L]`, 1 where a token is given clean (see the module docstring).

  Returns:
    `[B, L, D]` final state.
  """
  num_steps = t_schedule.shape[0] - 1
  if num_steps < 1:
    raise ValueError("t_schedule needs at least 2 times")
  pin = _conditioner(x_init, cond_x0, cond_mask)
  real = flow._expand_to(segment_ids > 0, x_init)  # pylint: disable=protected-access
  tok = lambda table: flow._expand_to(  # pylint: disable=protected-access  # noqa: E731
      flow.tokens_from_table(table, segment_ids), x_init).astype(jnp.float32)

  def velocity(x, t_table):
    return velocity_fn(x, t_table).astype(jnp.float32)

  def finish(x_old, x_new):
    # Padding is never moved; conditioning tokens go back to their clean value.
    return pin(jnp.where(real, x_new.astype(x_old.dtype), x_old))

  def euler_step(i, x):
    t, t_next = t_schedule[i], t_schedule[i + 1]
    v = velocity(x, t)
    return finish(x, x + (tok(t_next) - tok(t)) * v)

  def heun_step(i, x):
    t, t_next = t_schedule[i], t_schedule[i + 1]
    dt = tok(t_next) - tok(t)
    v1 = velocity(x, t)
    x_pred = pin(x + dt * v1)
    v2 = velocity(x_pred, t_next)
    return finish(x, x + dt * 0.5 * (v1 + v2))

  x = pin(x_init)
  if solver == "euler":
    return jax.lax.fori_loop(0, num_steps, euler_step, x)
  if solver == "heun":
    # The last step to t = 0 is Euler, as in Karras et al.: a corrector there costs a call for little gain.
    x = jax.lax.fori_loop(0, num_steps - 1, heun_step, x)
    return euler_step(num_steps - 1, x)
  if solver == "dpmpp_2m":
    return _dpmpp_2m(velocity, x, t_schedule, tok, finish, num_steps)
  raise ValueError(f"unknown flow solver {solver!r}; expected one of {FLOW_SOLVERS}")


def _log_snr(t: Array) -> Array:
  """`lambda = log(alpha / sigma) = log((1 - t) / t)`; only evaluated where 0 < t < 1."""
  t = jnp.clip(t, 1e-12, 1 - 1e-7)
  return jnp.log1p(-t) - jnp.log(t)


def _dpmpp_2m(velocity, x, t_schedule, tok, finish, num_steps):
  """DPM-Solver++(2M) with sigma = t, alpha = 1 - t and data prediction `D = x - t v`.

  One step from t to s (lambda = log(alpha / sigma), h = lambda_s - lambda_t):
    x_s = (sigma_s / sigma_t) x + alpha_s (1 - exp(-h)) D',
  where `alpha_s (1 - exp(-h)) = alpha_s - sigma_s alpha_t / sigma_t`, which stays finite at t = 1
  (alpha_t = 0, lambda_t = -inf). `D' = D + (h / (2 h_prev)) (D - D_prev)` is the 2nd order
  multistep correction; it falls back to `D` (first order) where h or h_prev is infinite: the first
  two steps (the first starts at lambda = -inf) and the last step to t = 0 (lambda = +inf), where x_s = D.
  Those O(1) first-order steps keep the global error second order.
  """

  def step(i, carry):
    x, d_prev = carry
    t, t_next = t_schedule[i], t_schedule[i + 1]
    t_prev = t_schedule[jnp.maximum(i - 1, 0)]
    v = velocity(x, t)
    d = x - tok(t) * v
    # Per-segment coefficients (tables), gathered to tokens afterwards.
    alive = t > 0  # a segment already at t = 0 (or an empty table row) stays put
    ratio = jnp.where(alive, t_next / jnp.where(alive, t, 1.0), 1.0)
    coef = jnp.where(alive, (1 - t_next) - ratio * (1 - t), 0.0)
    second = (i > 0) & (t_prev < 1) & (t < 1) & (t_next > 0) & alive & (t_prev > t)
    lam_prev, lam, lam_next = _log_snr(t_prev), _log_snr(t), _log_snr(t_next)
    h, h_prev = lam_next - lam, lam - lam_prev
    k = jnp.where(second, h / jnp.where(second, 2 * h_prev, 1.0), 0.0)
    d_corr = d + tok(k) * (d - d_prev)
    x_next = tok(ratio) * x + tok(coef) * d_corr
    return finish(x, x_next), d

  x, _ = jax.lax.fori_loop(0, num_steps, step, (x, jnp.zeros(x.shape, jnp.float32)))
  return x


# ---------------------------------------------------------------- DDPM alternative


def ddim_timesteps(num_steps: int, num_train_steps: int = 1000,
                   spacing: Literal["trailing", "leading"] = "trailing") -> Array:
  """Decreasing int32 train-step indices `[num_steps]` for DDIM / ancestral sampling.

  trailing (Lin et al. 2024) starts at the last train step, so sampling starts from the noisiest level
  the model was trained on; leading is the original DDIM spacing.
  """
  if spacing == "trailing":
    ts = jnp.round(jnp.arange(num_train_steps, 0, -num_train_steps / num_steps)) - 1
  elif spacing == "leading":
    ts = jnp.arange(num_steps)[::-1] * (num_train_steps // num_steps)
  else:
    raise ValueError(f"unknown spacing {spacing!r}")
  return ts.astype(jnp.int32)


def sample_ddpm(
    denoise_fn: Callable[[Array, Array], Array],
    x_init: Array,
    timesteps: Array,
    alphas_cumprod: Array,
    segment_ids: Array,
    prediction: Literal["eps", "v", "x0"] = "eps",
    solver: Literal["ddim", "ancestral"] = "ddim",
    eta: float = 0.0,
    rng: Array | None = None,
    cond_x0: Array | None = None,
    cond_mask: Array | None = None,
    max_segments: int | None = None,
) -> Array:
  """DDIM (eta) or ancestral DDPM sampling over discrete train steps.

  Args:
    denoise_fn: `(x [B, L, D], timestep_table [B, S] int32) -> model output [B, L, D]`.
    x_init: `[B, L, D]` noise at `timesteps[0]`.
    timesteps: decreasing int train steps, `[N]` (shared) or `[N, B, S]` (per segment).
    alphas_cumprod: `[T]` from `flow.ddpm_schedule`.
    segment_ids: `[B, L]`, 0 = padding (kept as in `x_init`).
    prediction: what the model outputs: "eps", "v" or "x0".
    solver: "ddim" uses `eta` (0 = deterministic); "ancestral" is the DDPM posterior, i.e. eta = 1.
    eta: DDIM stochasticity in [0, 1].
    rng: needed when the effective eta > 0.
    cond_x0, cond_mask: clean conditioning tokens, as in `sample_flow`.
    max_segments: S, needed to build the `[B, S]` tables when `timesteps` is `[N]`.

  Returns:
    `[B, L, D]` samples; the last step goes to alpha = 1 (clean).
  """
  if solver == "ancestral":
    eta = 1.0
  elif solver != "ddim":
    raise ValueError(f"unknown ddpm solver {solver!r}; expected one of {DDPM_SOLVERS}")
  if eta > 0 and rng is None:
    raise ValueError("stochastic sampling (eta > 0) needs rng")
  timesteps = jnp.asarray(timesteps, jnp.int32)
  if timesteps.ndim == 1:
    if max_segments is None:
      raise ValueError("a shared [N] timestep schedule needs max_segments")
    timesteps = jnp.broadcast_to(timesteps[:, None, None],
                                 (timesteps.shape[0], x_init.shape[0], max_segments))
  num_steps = timesteps.shape[0]
  alphas_cumprod = jnp.asarray(alphas_cumprod, jnp.float32)
  a_sched = jnp.concatenate([alphas_cumprod[timesteps], jnp.ones_like(timesteps[:1], jnp.float32)])
  pin = _conditioner(x_init, cond_x0, cond_mask)
  real = flow._expand_to(segment_ids > 0, x_init)  # pylint: disable=protected-access
  tok = lambda table: flow._expand_to(  # pylint: disable=protected-access  # noqa: E731
      flow.tokens_from_table(table, segment_ids), x_init).astype(jnp.float32)

  def step(i, x):
    a, a_prev = a_sched[i], a_sched[i + 1]
    out = denoise_fn(x, timesteps[i])
    x0_hat, eps_hat = flow.ddpm_x0_eps(x, out, flow.tokens_from_table(a, segment_ids), prediction)
    # sigma^2 = eta^2 * posterior variance (DDIM eq. 16); eta = 1 is the DDPM ancestral step.
    var = (1 - a_prev) / jnp.maximum(1 - a, 1e-12) * (1 - a / a_prev)
    sigma = eta * jnp.sqrt(jnp.maximum(var, 0.0))
    dir_coef = jnp.sqrt(jnp.maximum(1 - a_prev - sigma**2, 0.0))
    x_next = tok(jnp.sqrt(a_prev)) * x0_hat + tok(dir_coef) * eps_hat
    if eta > 0:
      z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
      x_next = x_next + tok(sigma) * z
    return pin(jnp.where(real, x_next.astype(x.dtype), x))

  return jax.lax.fori_loop(0, num_steps, step, pin(x_init))
