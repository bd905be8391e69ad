"""Optimizer (AdamW, warmup + cosine decay, gradient clipping) and EMA of weights."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def schedule(cfg) -> optax.Schedule:
  """Linear warmup to cfg.lr over cfg.warmup_steps, then cosine decay to 10% at cfg.steps."""
  steps = max(int(cfg.steps), 1)
  warmup = min(int(cfg.warmup_steps), steps - 1) if steps > 1 else 0
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else cfg.lr, peak_value=cfg.lr, warmup_steps=warmup,
      decay_steps=steps, end_value=cfg.lr * 0.1)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """Scales the updates by min(1, max_norm / global norm): `optax.clip_by_global_norm`'s result (to
  rounding) and state (empty, so checkpoints carry over), written as one scalar factor. optax selects per
  element between the update and its clipped copy, which XLA:CPU materialises as a pass of its own over every
  gradient and reads again in both moment updates; a scalar multiply fuses into them (experiments/scaling).
  """
  def update_fn(updates, state, params=None):
    del params
    factor = jnp.minimum(1.0, max_norm / optax.global_norm(updates))  # norm 0: max_norm / 0 = inf -> 1
    return jax.tree.map(lambda g: (g * factor).astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(cfg) -> optax.GradientTransformation:
  """AdamW over the params pytree; cfg is a train stage config (lr, warmup_steps, steps, ...)."""
  return optax.chain(
      clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
      optax.adamw(schedule(cfg), b1=0.9, b2=0.99, weight_decay=cfg.weight_decay),
  )


def ema_update(ema, params, decay: float, step):
  """EMA with warmup (decay ramps as (1 + step) / (10 + step)) so early averages are not stale."""
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)
  return jax.tree.map(lambda e, p: (d * e + (1 - d) * p).astype(e.dtype), ema, params)
