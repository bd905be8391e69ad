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


def make_optimizer(cfg) -> optax.GradientTransformation:
  """AdamW over the params pytree; cfg is a train stage config (lr, warmup_steps, steps, ...)."""
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
      optax.adamw(schedule(cfg), b1=0.9, b2=0.99, weight_decay=cfg.weight_decay),
  )


def ema_update(ema, params, decay: float, step):
  """EMA with warmup (decay ramps as (1 + step) / (10 + step)) so early averages are not stale."""
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)
  return jax.tree.map(lambda e, p: (d * e + (1 - d) * p).astype(e.dtype), ema, params)
