"""`--mode=encode`: write the latents of a dataset with a trained VAE into a tfds latent cache.

Clips are grouped by size so every VAE call gets a dense batch; latents are stored normalised by the VAE's
per-channel statistics, ready for the DiT.
"""
from __future__ import annotations

import collections
import time

import jax
import numpy as np
from absl import logging

from sora_jax.data import latent_cache
from sora_jax.data import pipeline
from sora_jax.data import video_io
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.train import train_dit
from sora_jax.train import train_vae


def _examples(config, source, encode_fn, params, rest, mesh, batch_size):
  """Yields latent-cache examples, encoding clips in same-size batches."""
  pending = collections.defaultdict(list)
  t0, done = time.perf_counter(), 0

  def flush(items):
    nonlocal done
    video = np.stack([video_io.to_float(x["video"]) for x in items])
    n = len(items)
    pad = (-n) % jax.device_count()  # the batch axis is sharded over devices
    if pad:
      video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
    latents = np.asarray(jax.device_get(encode_fn(params, rest, mesh_lib.global_batch(video, mesh))))[:n]
    for x, z in zip(items, latents):
      yield {"latent": z, "caption": x["caption"], "labels": np.asarray(x["labels"], np.int32),
             "size": np.asarray(x["video"].shape[:3], np.int32), "source_id": int(x["index"])}
    done += n
    if done % (batch_size * 10) < n:
      logging.info("encode: %d/%d clips (%.1f clips/s)", done, len(source), done / (time.perf_counter() - t0))

  for i in range(len(source)):
    x = source[i]
    key = x["video"].shape
    pending[key].append(x)
    if len(pending[key]) == batch_size:
      yield from flush(pending.pop(key))
  for items in pending.values():
    yield from flush(items)


def encode(config, workdir: str, mesh) -> dict:
  """Encodes config.encode.num_samples training clips into `<workdir>/latents`; returns a summary."""
  graphdef, params, rest = train_vae.restore(config, workdir, mesh)
  encode_fn = train_vae.make_encode_fn(graphdef, mesh)
  source = pipeline.synthetic_source(config, split="train", seed=config.seed + 11,
                                     num_samples=config.encode.num_samples)
  t0 = time.perf_counter()
  with mesh_lib.use(mesh, mesh_lib.VAE_RULES):
    path = latent_cache.write_latent_cache(
        train_dit.latent_dir(workdir),
        _examples(config, source, encode_fn, params, rest, mesh, config.encode.batch_size),
        latent_channels=config.vae.latent_channels,
        metadata={"vae": config.vae.to_dict(), "sizes": [list(s) for s in config.data.sizes],
                  "normalized": True},
        overwrite=True)
  seconds = time.perf_counter() - t0
  logging.info("encode: wrote %d latents to %s in %.1fs", len(source), path, seconds)
  return {"path": path, "num_examples": len(source), "seconds": seconds}
