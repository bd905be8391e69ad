"""`--mode=encode`: write the latents of a dataset with a trained VAE into a tfds latent cache.

The dataset is `config.data.source`: 'synthetic' (config.encode.num_samples clips), 'folder' or 'tfds'
(every file of config.data.path, config.encode.clips_per_video clips each, sized by the data size policy;
bad files are skipped and counted, see `sources`). Clips are grouped by size so every VAE call gets a dense
batch; latents are stored normalised by the VAE's per-channel statistics, ready for the DiT.

With `config.data.mixture`, each synthetic/folder/tfds part is encoded into its own cache,
`<workdir>/latents/<part name>`, so the DiT can mix the caches with the parts' weights ('latents' parts are
caches already and are left alone). `tools/encode_latents.py` runs the same code with the cache written
anywhere, for a DiT in another workdir to read as a 'latents' part.
"""
from __future__ import annotations

import collections
import os
import time

import jax
import numpy as np
from absl import logging

from sora_jax.data import latent_cache
from sora_jax.data import pipeline
from sora_jax.data import sources
from sora_jax.data import video_io
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.train import train_dit
from sora_jax.train import train_vae


def _examples(config, source, encode_fn, params, rest, mesh, batch_size):
  """Yields latent-cache examples, encoding clips in same-size batches (None items are skipped samples)."""
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
             "size": np.asarray(x["video"].shape[:3], np.int32), "source_id": int(x["index"]),
             "tags": x.get("tags", "")}
    done += n
    if done % (batch_size * 10) < n:
      logging.info("encode: %d/%d clips (%.1f clips/s)", done, len(source), done / (time.perf_counter() - t0))

  for x in pipeline.prefetch(source.to_iter_dataset(), config.data.num_workers):  # None items dropped
    key = x["video"].shape
    pending[key].append(x)
    if len(pending[key]) == batch_size:
      yield from flush(pending.pop(key))
  for items in pending.values():
    yield from flush(items)


def encode_source(config):
  """The clips to encode: a grain MapDataset of pixel examples (None for skipped ones)."""
  if config.data.source == "synthetic":
    return pipeline.synthetic_source(config, split="train", seed=config.seed + 11,
                                     num_samples=config.encode.num_samples)
  # Several clips per file: the file list repeated, each repeat cutting its own clip (seeded by position).
  ds = sources.records(config)
  n = len(ds)
  ds = ds.repeat(config.encode.get("clips_per_video", 1)) if config.encode.get("clips_per_video", 1) > 1 else ds
  return ds.map_with_index(sources.decoder(config, seed=config.seed + 11, num_records=n, name="encode"))


def encode(config, workdir: str, mesh, *, data_dir: str | None = None, name: str = "latent_cache",
           overwrite: bool = True, latent_dtype: str = "float32") -> dict:
  """Encodes config.data.source (or each pixel part of config.data.mixture) with the VAE of `workdir`.

  The cache goes to `data_dir/name` (default `<workdir>/latents/latent_cache`); a mixture's parts go to
  `data_dir/<part name>`. `overwrite=False` refuses to replace an existing cache (FileExistsError naming it).
  `config.encode.chunk` / `tile` / `tile_overlap` choose the VAE's chunked and tiled passes (0: whole clip).
  """
  graphdef, params, rest = train_vae.restore(config, workdir, mesh)
  e = config.encode
  encode_fn = train_vae.make_encode_fn(graphdef, mesh, chunk=e.get("chunk") or None, tile=e.get("tile") or None,
                                       tile_overlap=e.get("tile_overlap", 0))
  data_dir = train_dit.latent_dir(workdir) if data_dir is None else data_dir
  kwargs = dict(data_dir=data_dir, overwrite=overwrite, latent_dtype=latent_dtype)
  parts = [p for p in sources.mixture(config) if p["source"] != "latents"]
  if not sources.mixture(config):
    return _encode_cache(config, mesh, encode_fn, params, rest, name=name, **kwargs)
  out = {p["name"]: _encode_cache(sources.part_config(config, p), mesh, encode_fn, params, rest,
                                  name=p["name"], **kwargs) for p in parts}
  return {"parts": out, "num_examples": sum(r["num_examples"] for r in out.values()),
          "skipped": sum(r["skipped"] for r in out.values()), "seconds": sum(r["seconds"] for r in out.values())}


def _encode_cache(config, mesh, encode_fn, params, rest, *, data_dir: str, name: str, overwrite: bool,
                  latent_dtype: str) -> dict:
  """Encodes the clips of config.data.source into the cache `data_dir/name`; returns a summary."""
  path = latent_cache.dataset_path(data_dir, name)
  if not overwrite and os.path.exists(os.path.join(path, "dataset_info.json")):
    raise FileExistsError(f"encode: a latent cache exists at {path}; choose another name or overwrite it")
  source = encode_source(config)
  t0 = time.perf_counter()
  with mesh_lib.use(mesh, mesh_lib.VAE_RULES):
    path = latent_cache.write_latent_cache(
        data_dir, _examples(config, source, encode_fn, params, rest, mesh, config.encode.batch_size),
        latent_channels=config.vae.latent_channels, name=name, latent_dtype=latent_dtype,
        metadata={"vae": config.vae.to_dict(), "sizes": [list(s) for s in config.data.sizes],
                  "normalized": True, "source": config.data.source, "path": config.data.get("path", "")},
        overwrite=overwrite)
  seconds = time.perf_counter() - t0
  written = latent_cache.read_metadata(path)[latent_cache.CACHE_KEY]["splits"]["train"]["num_examples"]
  skipped = len(source) - written
  logging.info("encode: wrote %d latents to %s in %.1fs; skipped %d bad clips", written, path, seconds, skipped)
  max_skip = config.data.get("max_skip_fraction", 0.1)
  if skipped > max_skip * len(source):
    raise sources.TooManySkips(f"encode: skipped {skipped} of {len(source)} clips, more than "
                               f"config.data.max_skip_fraction={max_skip}; see the warnings naming the files")
  return {"path": path, "num_examples": written, "skipped": skipped, "seconds": seconds}
