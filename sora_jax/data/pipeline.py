"""Grain pipelines: pixel batches for the VAE, packed latent rows for the DiT.

Both follow one shape: MapDataset -> (shard per host) -> shuffle -> repeat -> map (decode video files, see
`sources`) -> to_iter_dataset -> (mp_prefetch workers) -> pack / batch. Every source is deterministic by
index and the iterator state is checkpointed, so a resumed run sees exactly the batches an uninterrupted run
would have seen.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Sequence

import grain
import jax
import numpy as np

from sora_jax.data import packing
from sora_jax.data import sources
from sora_jax.data import synthetic
from sora_jax.data import text_embeddings
from sora_jax.data import video_io
from sora_jax.diffusion import masks
from sora_jax.models import text as text_lib

# Virtual length of the procedural source: indices are cheap and never repeat in practice.
SYNTHETIC_LENGTH = 1 << 30


def _per_host(ds: grain.MapDataset) -> grain.MapDataset:
  return ds[jax.process_index()::jax.process_count()]


def prefetch(it: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  """mp_prefetch over `num_workers` processes (0: in this process)."""
  if num_workers > 0:
    return it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it


def _to_float_video(example: dict) -> dict:
  return {"video": video_io.to_float(example["video"])}


def vae_dataset(config, *, seed: int, batch_size: int) -> grain.IterDataset:
  """Same-size pixel batches {'video': float32 [B, T, H, W, 3]} mixing config.train_vae.sizes by weight.

  One dataset per size, batched, then mixed: a batch never mixes shapes (convolutions need dense batches).
  Video files (config.data.source 'folder' or 'tfds') are cut and resized to each size; bad files are
  skipped (see `sources`), so those sizes are batched after dropping them.
  """
  sizes, weights = config.train_vae.sizes, config.train_vae.size_weights
  if config.data.source == "synthetic" and not sources.mixture(config):
    per_size = []
    for k, size in enumerate(sizes):
      src = synthetic.SyntheticVideos(SYNTHETIC_LENGTH, [tuple(size)], split="train", seed=seed + 7919 * k,
                                      exit_fraction=config.data.get("exit_fraction", 0.0),
                                      exit_depth=config.data.get("exit_depth", 0.0),
                                      enter_fraction=config.data.get("enter_fraction", 0.0))
      ds = _per_host(grain.MapDataset.source(src)).map(_to_float_video)
      per_size.append(ds.batch(batch_size, drop_remainder=True))
    ds = grain.MapDataset.mix(per_size, weights=list(weights)) if len(per_size) > 1 else per_size[0]
    return prefetch(ds.to_iter_dataset(), config.data.num_workers)
  per_size = []
  for k, size in enumerate(sizes):
    ds = sources.pixel_dataset(config, seed=seed + 7919 * k, size=size, shuffle=True, repeat=True,
                               name=f"vae data {tuple(size)}")
    per_size.append(ds.map(_to_float_video).to_iter_dataset().batch(batch_size, drop_remainder=True))
  it = grain.IterDataset.mix(per_size, weights=list(weights)) if len(per_size) > 1 else per_size[0]
  return prefetch(it, config.data.num_workers)


def synthetic_source(config, *, split: str, seed: int, num_samples: int) -> grain.MapDataset:
  """The embedded captioned clips at config.data.sizes (for encoding and evaluation)."""
  return sources.synthetic_dataset(config, split=split, seed=seed, num_samples=num_samples)


@dataclasses.dataclass
class LatentToFeatures(grain.transforms.RandomMap):
  """Latent example -> per-sample packing features, with caption dropout for classifier-free guidance."""
  patch_size: Sequence[int]
  max_text_len: int
  caption_dropout: float
  tokenizer: str = "bytes"
  tokenizer_path: str | None = None
  token_drop_rate: float = 0.0  # NaViT token dropping (coords travel with the kept tokens)
  # Precomputed text embeddings (`text_embeddings.TextEmbeddings`): captions are looked up, not tokenized.
  embeddings: Any = None
  # ((tag, strategy index), ...): a sample whose `tags` hold `tag` always trains with that frame-conditioning
  # strategy; others draw theirs from cond.mask_ratios (see `given_strategy`).
  tag_strategies: tuple = ()

  def random_map(self, example: dict, rng: np.random.Generator) -> dict:
    caption = example["caption"]
    if isinstance(caption, bytes):
      caption = caption.decode("utf-8", errors="replace")
    if self.caption_dropout > 0 and rng.random() < self.caption_dropout:
      caption = ""
    tokens, coords, grid = packing.patchify(np.asarray(example["latent"], np.float32), self.patch_size)
    tokens, coords = packing.drop_tokens(tokens, coords, self.token_drop_rate, rng)
    states = pooled = None
    if self.embeddings is not None:
      text, states, pooled = self.embeddings.lookup(caption)
    else:
      text = text_lib.tokenize(caption, self.max_text_len, self.tokenizer, self.tokenizer_path)
    return packing.sample_features(tokens, coords, grid, text, example["labels"],
                                   _int_id(example.get("source_id", 0)), states, pooled,
                                   given_strategy(example.get("tags", ""), self.tag_strategies))


def latent_to_features(config, *, train: bool = True, embeddings=None) -> LatentToFeatures:
  """The DiT's per-sample transform from `config` (tokenizer and its path, or `config.text.precomputed`).

  `train=False` (validation) turns off caption dropout and token dropping.
  """
  if embeddings is None and config.text.get("precomputed"):
    embeddings = text_embeddings.TextEmbeddings(config.text.precomputed)
  t = config.train_dit
  return LatentToFeatures(tuple(config.dit.patch_size), config.text.max_len,
                          t.caption_dropout if train else 0.0, config.text.get("tokenizer", "bytes"),
                          config.text.get("path") or None, t.get("token_drop_rate", 0.0) if train else 0.0,
                          embeddings, tag_strategies(config) if train else ())


def tag_strategies(config) -> tuple[tuple[str, int], ...]:
  """`config.cond.tag_strategies` ({tag: strategy name, '' = the mix}) as ((tag, index into
  masks.STRATEGIES), ...) for the tags that have a strategy."""
  named = dict((config.get("cond") or {}).get("tag_strategies") or {})
  return tuple((tag, masks.STRATEGIES.index(name)) for tag, name in named.items() if name)


def given_strategy(tags, table: Sequence[tuple[str, int]]) -> int:
  """The strategy a sample with comma-separated `tags` always trains with, or -1 (drawn from the mix).

  The sample's first tag that has a strategy in `table` decides."""
  if isinstance(tags, bytes):
    tags = tags.decode("utf-8")
  by_tag = dict(table)
  return next((by_tag[t.strip()] for t in (tags or "").split(",") if t.strip() in by_tag), -1)


def _int_id(source_id) -> int:
  # Latent caches may key examples by file name; the packed `index` table holds int32.
  if isinstance(source_id, (str, bytes)):
    return zlib.crc32(source_id.encode() if isinstance(source_id, str) else source_id) & 0x7FFFFFFF
  return int(source_id)


def dit_dataset(config, source: grain.MapDataset | Sequence[grain.MapDataset], *, seed: int, batch_size: int,
                weights: Sequence[float] | None = None, embeddings=None) -> grain.IterDataset:
  """Packed rows of latent patches from a latent source, batched [B, ...] (see docs/ARCHITECTURE.md).

  `source` may be a list of latent sources mixed by `weights` (config.data.mixture): each is host-sharded,
  shuffled (source k with seed + 7919 k) and repeated on its own, then `grain.MapDataset.mix` interleaves
  them in proportion, so the mixture stays a MapDataset and the checkpointed iterator resumes it exactly.
  `embeddings` (default: `config.text.precomputed`, unchecked): precomputed text embeddings to pack instead
  of running the text encoder in the step.
  """
  t = config.train_dit
  parts = list(source) if isinstance(source, (list, tuple)) else [source]
  parts = [_per_host(p).shuffle(seed=seed + 7919 * k).repeat() for k, p in enumerate(parts)]
  ds = sources.mix(parts, list(weights) if weights is not None else [1.0] * len(parts))
  to_features = latent_to_features(config, embeddings=embeddings)
  ds = ds.random_map(to_features, seed=seed + 1)
  embeddings = to_features.embeddings
  it = prefetch(ds.to_iter_dataset(), config.data.num_workers)
  it = packing.pack(it, seq_len=t.seq_len, text_seq_len=t.text_seq_len, max_segments=t.max_segments,
                    num_packing_bins=t.num_packing_bins, seed=seed + 2, text_states=embeddings is not None)
  return it.batch(batch_size, drop_remainder=True)
