"""DiT trainer: rectified flow on packed rows of latent patches, text encoder trained jointly, EMA.

Reads top to bottom: setup -> model & optimizer (created sharded) -> data -> resume -> update step -> loop.
"""
from __future__ import annotations

import functools
import os
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from sora_jax import configs_lib
from sora_jax import segments
from sora_jax.data import latent_cache
from sora_jax.data import packing
from sora_jax.data import pipeline
from sora_jax.data import sources
from sora_jax.data import text_embeddings
from sora_jax.diffusion import flow
from sora_jax.diffusion import masks
from sora_jax.models import t2v
from sora_jax.models import text_pretrained
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.train import checkpoint as ckpt_lib
from sora_jax.train import flops as flops_lib
from sora_jax.train import logging as log_lib
from sora_jax.train import optim
from sora_jax.train import state as state_lib


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "dit", "checkpoints")


def latent_dir(workdir: str) -> str:
  return os.path.join(workdir, "latents")


def create(config, mesh, *, abstract: bool = False):
  """(Created, tx) of the denoiser; `abstract` gives shapes + shardings only (AOT compiles, golden specs)."""
  tx = optim.make_optimizer(config.train_dit)
  build = state_lib.abstract if abstract else state_lib.create
  created = build(
      lambda r: t2v.TextToVideo(config, patch_dim=t2v.patch_dim(config), rngs=r), tx, seed=config.seed + 1,
      mesh=mesh, rules=mesh_lib.DIT_RULES, ema=config.train_dit.ema_decay > 0)
  return created, tx


def restore(config, workdir: str, mesh, *, use_ema: bool = True):
  """The trained denoiser of `workdir` as (graphdef, params, rest, step); EMA weights when asked. Reads one
  set of weights alone: not the optimizer's state, nor the weights it does not return."""
  created, _ = create(config, mesh, abstract=True)
  ckpt = ckpt_lib.Checkpointer(checkpoint_dir(workdir))
  if ckpt.latest_step() is None:
    raise configs_lib.MissingStageError(f"no DiT checkpoint under {checkpoint_dir(workdir)}: run "
                                        f"--mode=train_dit first")
  abstract = created.state
  ema = use_ema and abstract.ema is not None
  target = abstract.replace(opt_state=ckpt_lib.skip(abstract.opt_state),
                            params=ckpt_lib.skip(abstract.params) if ema else abstract.params,
                            ema=abstract.ema if ema else ckpt_lib.skip(abstract.ema))
  state, step = ckpt.restore(target)
  ckpt.close()
  params = state.ema if ema else state.params
  return created.graphdef, params, state.rest, step


def segment_shift(config, grid_table):
  """Per-segment timestep shift from each segment's token count (larger grids get more noise)."""
  f = config.flow
  if not f.resolution_shift:
    return jnp.ones(grid_table.shape[:2], jnp.float32)
  return flow.resolution_shift(jnp.prod(grid_table, axis=-1), f.shift_base_tokens, f.max_shift)


def cond_probs(config):
  """Mask-strategy probabilities from `config.cond.mask_ratios`, or None when nothing is ever conditioned
  (no strategy but "none" in the mix, and no `cond.tag_strategies`)."""
  cond = config.get("cond") or {}
  probs = masks.strategy_probs(cond.get("mask_ratios"))
  return None if probs[0] == 1.0 and not any(dict(cond.get("tag_strategies") or {}).values()) else probs


def batch_text(model, batch, max_segments: int, labels=None):
  """(per-token text states, pooled per segment) of a packed batch: precomputed or from the text encoder."""
  if "text_states" in batch:  # precomputed by a frozen encoder (config.text.precomputed): no encoder call
    return batch["text_states"], batch["text_pooled"]
  return model.encode_text(batch["text"], batch["text_segment_ids"], batch["text_positions"], max_segments,
                           labels=batch.get("labels") if labels is None else labels)


def denoiser_loss(model, batch, rng, config, step=None):
  """Flow-matching loss of one packed batch (frame-conditioned tokens given clean and not counted).

  With `step` (the train step) and `config.cond.start_step` > 0, no token is conditioned before that step:
  the caption alone has to carry the clip until then (experiments/tiny_t2v/README.md, runs AG and D13).
  Segments with a strategy in the batch's `given` table (`cond.tag_strategies`) only ever train with it:
  before `start_step` they count nothing in the loss."""
  S = config.train_dit.max_segments
  seg = batch["tokens_segment_ids"]
  x0 = batch["tokens"]
  rng_t, rng_n = jax.random.split(rng)
  t_table = flow.sample_t(rng_t, (seg.shape[0], S), kind=config.flow.t_sampling,
                          logit_mean=config.flow.logit_mean, logit_std=config.flow.logit_std)
  t_table = flow.shift_t(t_table, segment_shift(config, batch["grid"]))
  noise = jax.random.normal(rng_n, x0.shape, x0.dtype)
  x_t = flow.interpolate(x0, noise, flow.tokens_from_table(t_table, seg))
  probs = cond_probs(config)
  cond_mask, weight = None, None
  if probs is not None:
    # fold_in keeps t and noise identical to an unconditioned run with the same rng.
    given = batch.get("given")
    cond_mask = masks.sample_token_mask(jax.random.fold_in(rng, 1), batch["coords"][..., 0], seg,
                                        batch["grid"][..., 0], probs, given)
    weight = jnp.ones(seg.shape, jnp.float32)
    start = (config.get("cond") or {}).get("start_step", 0)
    if step is not None and start > 0:
      started = step >= start
      cond_mask = cond_mask & started
      if given is not None:  # segments that only train with given frames wait for the start
        fixed = segments.gather((given >= 0).astype(jnp.float32), seg) > 0.5
        weight = jnp.where(fixed & ~started, 0.0, weight)
    x_t = jnp.where(cond_mask[..., None], x0, x_t)
    weight = weight * (1.0 - cond_mask.astype(jnp.float32))
  labels = batch.get("labels")
  if labels is not None and t2v.is_class_conditional(config) and config.train_dit.caption_dropout > 0:
    # Label dropout (the class-conditional twin of caption dropout): -1 reads as the null class.
    drop = jax.random.bernoulli(jax.random.fold_in(rng, 2), config.train_dit.caption_dropout, labels.shape[:2])
    labels = jnp.where(drop[..., None], -1, labels)
  text, pooled = batch_text(model, batch, S, labels)
  v = model(x_t, batch["coords"], seg, t_table, text, batch["text_segment_ids"], pooled, cond_mask=cond_mask)
  loss, _ = flow.flow_loss(v, flow.velocity_target(x0, noise), seg, token_weight=weight, max_segments=S)
  return loss


def latent_parts(config, workdir: str) -> list[tuple[str, str, float]]:
  """(name, latent cache path, weight) of each input of the DiT.

  Without `config.data.mixture`: the one cache `--mode=encode` wrote. With one: per part, its `path` for a
  'latents' part, else the cache `--mode=encode` wrote for that part (`<workdir>/latents/<name>`).
  """
  parts = sources.mixture(config)
  if not parts:
    return [("latent_cache", latent_cache.dataset_path(latent_dir(workdir)), 1.0)]
  return [(p["name"], os.path.expanduser(p["path"]) if p["source"] == "latents"
           else latent_cache.dataset_path(latent_dir(workdir), p["name"]), p["weight"]) for p in parts]


def latent_caches(config, workdir: str) -> tuple[list[latent_cache.LatentCacheSource], list[float]]:
  """The DiT's latent caches, opened, and their mixing weights."""
  caches, weights = [], []
  for name, path, weight in latent_parts(config, workdir):
    if not os.path.exists(path):
      part = f" (config.data.mixture part {name!r})" if sources.mixture(config) else ""
      raise configs_lib.MissingStageError(f"no latent cache at {path}{part}: run --mode=encode first")
    caches.append(latent_cache.LatentCacheSource(path))
    weights.append(weight)
  return caches, weights


def latent_source(workdir: str, config=None) -> grain.MapDataset:
  """The DiT's latents in a fixed order (validation): the one cache, or the mixture's parts interleaved by
  weight without shuffling when `config` has a `data.mixture`."""
  if config is None or not sources.mixture(config):
    path = latent_cache.dataset_path(latent_dir(workdir))
    if not os.path.isdir(path):
      raise configs_lib.MissingStageError(f"no latent cache at {path}: run --mode=encode first")
    return grain.MapDataset.source(latent_cache.LatentCacheSource(path))
  caches, weights = latent_caches(config, workdir)
  return sources.mix([grain.MapDataset.source(c) for c in caches], weights)


def dit_input(config, workdir: str, *, seed: int, batch_size: int) -> grain.IterDataset:
  """The training pipeline over `latent_caches`, with `config.text.precomputed` checked against them."""
  caches, weights = latent_caches(config, workdir)
  embeddings = text_embeddings.from_config(config, [c.path for c in caches])
  return pipeline.dit_dataset(config, [grain.MapDataset.source(c) for c in caches], seed=seed,
                              batch_size=batch_size, weights=weights, embeddings=embeddings)


def flops_per_token(config) -> float:
  """Analytic training FLOPs per video token of a full row (see sora_jax/train/flops.py)."""
  return flops_lib.flops_per_token(config)


def load_pretrained_text(config, graphdef, state, shardings, mesh):
  """A fresh run's state with the pretrained text encoder's weights (frozen ones live in `rest`)."""
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    model = nnx.merge(graphdef, state.params, state.rest)
    text_pretrained.load_weights(model.text, config.text.get("path") or None)
    _, params, rest = nnx.split(model, nnx.Param, ...)
  logging.info("DiT: loaded pretrained %s text encoder", config.text.encoder)
  # The EMA starts equal to the weights but in buffers of its own: the train step donates both.
  ema = None if state.ema is None else jax.tree.map(jnp.copy, params)
  return jax.device_put(state.replace(params=params, rest=rest, ema=ema), shardings)


def make_train_step(config, graphdef, tx, shardings):
  """jit(state, batch) -> (state, metrics); donates the state, keeps it in its sharded layout."""
  cfg = config.train_dit
  lr_fn = optim.schedule(cfg)

  @functools.partial(jax.jit, donate_argnums=0, out_shardings=(shardings, None))
  def train_step(state, batch):
    rng = jax.random.fold_in(jax.random.key(config.seed + 1), state.step)

    def loss_fn(params):
      return denoiser_loss(nnx.merge(graphdef, params, state.rest), batch, rng, config, step=state.step)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = None if state.ema is None else optim.ema_update(state.ema, params, cfg.ema_decay, state.step)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": lr_fn(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

  return train_step


def train(config, workdir: str, mesh) -> dict:
  cfg = config.train_dit
  is_main = jax.process_index() == 0
  local_batch = cfg.batch_size // jax.process_count()

  # ---------------------------------------------------------------- model & optimizer (sharded)
  created, tx = create(config, mesh)
  graphdef, state = created.graphdef, created.state
  logging.info("DiT + text encoder: %d parameters", state_lib.num_params(state.params))

  # ---------------------------------------------------------------- data
  data_iter = iter(dit_input(config, workdir, seed=config.seed, batch_size=local_batch))

  # ---------------------------------------------------------------- resume
  ckpt = ckpt_lib.Checkpointer(checkpoint_dir(workdir), keep=cfg.keep, save_every=cfg.ckpt_every)
  if ckpt.latest_step() is not None:
    state, step = ckpt.restore(state, data_iter=data_iter)
    logging.info("DiT: resumed from step %d", step)
  elif config.text.encoder in text_pretrained.KINDS:
    state = load_pretrained_text(config, graphdef, state, created.shardings, mesh)
  start = int(state.step)

  # ---------------------------------------------------------------- update step
  train_step = make_train_step(config, graphdef, tx, created.shardings)

  # ---------------------------------------------------------------- loop
  writer = log_lib.MetricWriter(workdir, "dit", total_steps=cfg.steps, initial_step=start, is_main=is_main)
  config_json = config.to_dict()
  tokens_per_step = cfg.batch_size * cfg.seq_len
  flops_step = flops_per_token(config) * tokens_per_step
  t_last, steps_since, stats = time.perf_counter(), 0, []
  metrics = {}
  eval_every = cfg.get("eval_every", 0)
  if eval_every:
    from sora_jax.eval import evaluate as eval_lib  # imported here: evaluate imports this module
    val_batches, val_fn = eval_lib.validation_batches(config, workdir), eval_lib.make_val_loss_fn(config, graphdef)
    eval_writer = log_lib.MetricWriter(workdir, "eval", is_main=is_main)
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    for step in range(start, cfg.steps):
      host_batch = next(data_iter)
      stats.append(packing.packing_stats(host_batch))
      state, metrics = train_step(state, mesh_lib.global_batch(host_batch, mesh))
      steps_since += 1
      writer.advance()
      if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        dt = (now - t_last) / steps_since
        t_last, steps_since = now, 0
        n = jax.device_count()
        metrics.update(
            step_time=dt,
            real_tokens_per_s_per_device=np.mean([s["real_token_fraction"] for s in stats]) * tokens_per_step / dt / n,
            tflops_per_device=flops_step / dt / n / 1e12,
            real_token_fraction=np.mean([s["real_token_fraction"] for s in stats]),
            segments_per_row=np.mean([s["segments_per_row"] for s in stats]))
        stats = []
        writer.write(step + 1, metrics)
      if eval_every and ((step + 1) % eval_every == 0 or step + 1 == cfg.steps):
        weights = state.params if state.ema is None else state.ema
        results = eval_lib.validation_loss(config, graphdef, weights, state.rest, val_batches, mesh, val_fn=val_fn)
        eval_lib.write_results(workdir, step + 1, results, eval_writer)
      ckpt.save(step + 1, state, config=config_json, data_iter=data_iter, force=(step + 1 == cfg.steps))
  ckpt.close()
  writer.close()
  if eval_every:
    eval_writer.close()
  return {k: float(v) for k, v in metrics.items()}
