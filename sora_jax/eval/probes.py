"""Shared pieces of the trained-model probes in tools/ (denoise_probe, condition_probe): clips of a workdir's
latent cache, a jitted one-step denoiser over packed rows, and the data's per-attribute mean patterns."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.data import packing
from sora_jax.data import synthetic
from sora_jax.diffusion import flow
from sora_jax.train import train_dit


def make_one_step(graphdef, max_segments: int):
  """jit: (state, rows, noise, t) -> one-step x0 estimate [B, L, P] of packed rows noised to flow time t."""
  @jax.jit
  def one_step(state, rows, noise, t):
    model = nnx.merge(graphdef, state)
    seg = rows["tokens_segment_ids"]
    t_table = jnp.full(rows["grid"].shape[:2], t, jnp.float32)
    t_tok = flow.tokens_from_table(t_table, seg)
    x_t = flow.interpolate(rows["tokens"], noise, t_tok)
    text, pooled = train_dit.batch_text(model, rows, max_segments)
    v = model(x_t, rows["coords"], seg, t_table, text, rows["text_segment_ids"], pooled)
    return flow.x0_from_velocity(x_t, v, t_tok)

  return one_step


def cache_clips(config, workdir: str, num: int) -> list[dict]:
  """Up to `num` latent-cache examples sharing the grid of the first one with >= 3 latent frames."""
  cache = train_dit.latent_caches(config, workdir)[0][0]
  clips, shape = [], None
  for i in range(len(cache)):
    ex = cache[i]
    if shape is None and ex["latent"].shape[0] >= 3:
      shape = ex["latent"].shape
    if shape is not None and ex["latent"].shape == shape:
      clips.append(ex)
    if len(clips) == num:
      break
  if not clips:
    raise ValueError(f"{workdir}: the latent cache has no clip of 3 or more latent frames")
  return clips


def data_patterns(cache, grid_shape, attribute: str):
  """Per value of `attribute`: mean latent of the cache clips with that value minus the mean over values,
  [V, *grid_shape] (cache clips of another grid are skipped; a value no clip has gives zeros)."""
  column, values = synthetic.ATTRIBUTE_NAMES.index(attribute), synthetic.ATTRIBUTES[attribute]
  sums = np.zeros((len(values),) + tuple(grid_shape), np.float64)
  counts = np.zeros(len(values))
  for i in range(len(cache)):
    ex = cache[i]
    if tuple(ex["latent"].shape) == tuple(grid_shape):
      v = int(ex["labels"][column])
      sums[v] += ex["latent"]
      counts[v] += 1
  means = sums / np.maximum(counts, 1)[:, None, None, None, None]
  present = counts > 0
  return np.where(present[:, None, None, None, None], means - means[present].mean(0), 0.0), present


def one_clip_per_row(samples, max_segments: int) -> dict:
  """Per-sample features of clips of one grid -> packed rows [num_clips, ...], one clip each, as jax arrays."""
  rows = packing.stack_rows([r for s in samples for r in packing.pack_list(
      [s], seq_len=len(s["tokens"]), text_seq_len=len(s["text"]), max_segments=max_segments)])
  return jax.tree.map(jnp.asarray, rows)
