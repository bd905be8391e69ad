"""Grain pipelines: pixel batches for the VAE, packed latent rows for the DiT.

Both follow one shape: MapDataset -> (shard per host) -> shuffle -> repeat -> map -> to_iter_dataset ->
(mp_prefetch workers) -> pack / batch. Every source is deterministic by index and the iterator state is
checkpointed, so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import jax
import numpy as np

from sora_jax.data import packing
from sora_jax.data import synthetic
from sora_jax.data import video_io
from sora_jax.models import text as text_lib

# Virtual length of the procedural source: indices are cheap and never repeat in practice.
SYNTHETIC_LENGTH = 1 << 30


def _per_host(ds: grain.MapDataset) -> grain.MapDataset:
  return ds[jax.process_index()::jax.process_count()]


def _prefetch(it: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  if num_workers > 0:
    return it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it


def _to_float_video(example: dict) -> dict:
  return {"video": video_io.to_float(example["video"])}


def vae_dataset(config, *, seed: int, batch_size: int) -> grain.IterDataset:
  """Same-size pixel batches {'video': float32 [B, T, H, W, 3]} mixing config.train_vae.sizes by weight.

  One dataset per size, batched, then mixed: a batch never mixes shapes (convolutions need dense batches).
  """
  sizes, weights = config.train_vae.sizes, config.train_vae.size_weights
  if config.data.source != "synthetic":
    raise ValueError(f"config.data.source={config.data.source!r}: the VAE trainer reads 'synthetic' data")
  per_size = []
  for k, size in enumerate(sizes):
    src = synthetic.SyntheticVideos(SYNTHETIC_LENGTH, [tuple(size)], split="train", seed=seed + 7919 * k)
    ds = _per_host(grain.MapDataset.source(src)).map(_to_float_video)
    per_size.append(ds.batch(batch_size, drop_remainder=True))
  ds = grain.MapDataset.mix(per_size, weights=list(weights)) if len(per_size) > 1 else per_size[0]
  return _prefetch(ds.to_iter_dataset(), config.data.num_workers)


def synthetic_source(config, *, split: str, seed: int, num_samples: int) -> grain.MapDataset:
  """The embedded captioned clips at config.data.sizes (for encoding and evaluation)."""
  return grain.MapDataset.source(synthetic.SyntheticVideos(
      num_samples, [tuple(s) for s in config.data.sizes], list(config.data.size_weights), split=split,
      seed=seed))


@dataclasses.dataclass
class LatentToFeatures(grain.transforms.RandomMap):
  """Latent example -> per-sample packing features, with caption dropout for classifier-free guidance."""
  patch_size: Sequence[int]
  max_text_len: int
  caption_dropout: float

  def random_map(self, example: dict, rng: np.random.Generator) -> dict:
    caption = example["caption"]
    if isinstance(caption, bytes):
      caption = caption.decode("utf-8", errors="replace")
    if self.caption_dropout > 0 and rng.random() < self.caption_dropout:
      caption = ""
    tokens, coords, grid = packing.patchify(np.asarray(example["latent"], np.float32), self.patch_size)
    return packing.sample_features(tokens, coords, grid, text_lib.tokenize(caption, self.max_text_len),
                                   example["labels"], int(example.get("source_id", 0)))


def dit_dataset(config, source: grain.MapDataset, *, seed: int, batch_size: int) -> grain.IterDataset:
  """Packed rows of latent patches from a latent source, batched [B, ...] (see docs/ARCHITECTURE.md)."""
  t = config.train_dit
  ds = _per_host(source).shuffle(seed=seed).repeat()
  ds = ds.random_map(LatentToFeatures(tuple(config.dit.patch_size), config.text.max_len, t.caption_dropout),
                     seed=seed + 1)
  it = _prefetch(ds.to_iter_dataset(), config.data.num_workers)
  it = packing.pack(it, seq_len=t.seq_len, text_seq_len=t.text_seq_len, max_segments=t.max_segments,
                    num_packing_bins=t.num_packing_bins, seed=seed + 2)
  return it.batch(batch_size, drop_remainder=True)
