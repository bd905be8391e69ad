"""Precomputed text embeddings of a frozen pretrained text encoder, looked up by caption.

`tools/encode_text.py` runs `config.text.encoder` ('minilm' or 't5', frozen) once over the captions of one or
more latent caches (or a captions file) and writes them here; with `config.text.precomputed=PATH` the DiT
pipeline then packs the stored states next to the caption tokens and the train step skips the encoder.
Sampling still encodes prompts live with the same encoder (its weights stay in the DiT checkpoint).

Layout: a tfds array_record dataset (written with `latent_cache.write_dataset`, no TensorFlow), one example
per distinct caption:
  caption  str
  tokens   int32 [n]: the caption's token ids (config.text.max_len, special tokens included)
  states   float32 (or float16 on disk) [n, D]: per-token encoder states; n is the caption's own length, so
           the mask is implicit (packing pads with zeros, exactly where the live encoder outputs zeros)
  pooled   float32 [D]: the encoder's pooled vector (`encoder.pool`)
Row 0 is the empty caption: the unconditional prompt that caption dropout substitutes. `captions.jsonl`
lists the captions in row order (readers build the lookup from it without touching the states), and
`metadata.json` records the encoder (kind, max_len, width, a hash of its config/tokenizer files) and each
latent cache encoded (path, number of examples, a fingerprint of its stored statistics), so a cache that was
re-encoded, appended to or never covered is caught before training starts.

Keyed by caption rather than by index: one dataset serves every cache of a `config.data.mixture`, repeated
captions (several clips per video) are stored once, and a cache's order does not matter.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Callable, Iterable, Sequence

import numpy as np

from sora_jax import configs_lib
from sora_jax.data import latent_cache

NAME = "text_embeddings"
META_KEY = "text_embeddings"
CAPTIONS_FILE = "captions.jsonl"
_DTYPES = {"float32": np.float32, "float16": np.float16}


# ---------------------------------------------------------------------------------------------- fingerprints

def cache_fingerprint(path: str, split: str = "train") -> dict:
  """{path, split, num_examples, fingerprint} of a latent cache split, from its stored statistics.

  The per-channel sums change whenever the latents do (re-encoding, appending), so the fingerprint tells
  a cache from another one with the same length without reading any example.
  """
  path = latent_cache._resolve(path)  # pylint: disable=protected-access
  meta = latent_cache.read_metadata(path).get(latent_cache.CACHE_KEY, {})
  stats = meta.get("splits", {}).get(split)
  if stats is None:
    raise ValueError(f"latent cache {path} has no split {split!r}")
  key = json.dumps({k: stats[k] for k in ("num_examples", "count", "sum", "sumsq")}, sort_keys=True)
  return {"path": path, "split": split, "num_examples": int(stats["num_examples"]),
          "fingerprint": hashlib.sha256(key.encode()).hexdigest()[:16]}


def encoder_fingerprint(kind: str, path: str | None) -> str:
  """A hash of the encoder folder's config.json and tokenizer.json: the same model wherever it is installed."""
  from sora_jax.models import text_pretrained  # pylint: disable=g-import-not-at-top
  folder = text_pretrained.model_dir(kind, path)
  h = hashlib.sha256(kind.encode())
  for name in ("config.json", "tokenizer.json"):
    file = os.path.join(folder, name)
    if os.path.isfile(file):
      with open(file, "rb") as f:
        h.update(f.read())
  return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- captions

def cache_captions(path: str, split: str = "train", chunk: int = 256) -> Iterable[str]:
  """The captions of a latent cache split, in order."""
  source = latent_cache.LatentCacheSource(path, split)
  for start in range(0, len(source), chunk):
    for ex in source.__getitems__(range(start, min(start + chunk, len(source)))):
      yield ex["caption"]


def file_captions(path: str) -> list[str]:
  """Captions of a captions file: CSV/JSONL with a `caption` column (as `sources.read_captions`), or plain
  text with one caption per line."""
  if path.endswith((".csv", ".jsonl")):
    from sora_jax.data import sources  # pylint: disable=g-import-not-at-top
    return [r["caption"] for r in sources.read_captions(path) if not r["error"]]
  with open(path, encoding="utf-8") as f:
    return [line.rstrip("\n") for line in f if line.strip()]


def unique(captions: Iterable[str]) -> list[str]:
  """'' first (the unconditional prompt), then each distinct caption once, in first-seen order."""
  seen = {"": None}
  for c in captions:
    seen.setdefault(c.decode("utf-8") if isinstance(c, bytes) else str(c), None)
  return list(seen)


# ---------------------------------------------------------------------------------------------- encoding

def make_encoder(config) -> tuple[Callable, int]:
  """(fn(tokens [B, L], segment_ids, positions) -> (states [B, L, D], pooled [B, D]), D) of config.text.

  The pretrained weights are loaded from `config.text.path` (the packaged MiniLM when unset), exactly as the
  DiT trainer loads them.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sora_jax.models import text_pretrained  # pylint: disable=g-import-not-at-top
  encoder = text_pretrained.pretrained(config.text.encoder, config.text.get("path") or None)
  graphdef, state = nnx.split(encoder)

  @jax.jit
  def fn(state, tokens, segment_ids, positions):
    model = nnx.merge(graphdef, state)
    states = model(tokens, segment_ids, positions)
    return states, model.pool(states, segment_ids, 1)[:, 0]

  return (lambda tokens, seg, pos: fn(state, tokens, seg, pos)), encoder.width


def write(out_dir: str, captions: Sequence[str], config, *, caches: Sequence[str] = (), split: str = "train",
          batch_size: int = 64, dtype: str = "float32", overwrite: bool = False, encoder=None,
          log: Callable[[str], None] = print) -> str:
  """Encodes `captions` (distinct, '' first: see `unique`) with config.text's encoder into `out_dir`.

  `caches` are the latent caches these captions came from: recorded so the DiT can check it trains on them.
  Captions run in fixed-shape batches [batch_size, text.max_len] (one compile), each caption its own segment.
  Returns the dataset directory, the path to give as `config.text.precomputed`.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from sora_jax.models import text as text_lib  # pylint: disable=g-import-not-at-top
  if dtype not in _DTYPES:
    raise ValueError(f"dtype {dtype!r}: choose one of {sorted(_DTYPES)}")
  captions = list(captions)
  if not captions or captions[0] != "":
    raise ValueError("captions must start with '' (the unconditional prompt); pass them through unique()")
  kind, max_len = config.text.encoder, config.text.max_len
  tok_name, tok_path = config.text.get("tokenizer", kind), config.text.get("path") or None
  fn, width = encoder or make_encoder(config)
  cache_info = [cache_fingerprint(c, split) for c in caches]

  def examples():
    t0 = time.perf_counter()
    for start in range(0, len(captions), batch_size):
      chunk = captions[start:start + batch_size]
      toks = [text_lib.tokenize(c, max_len, tok_name, tok_path) for c in chunk]
      tokens, seg, pos = (np.zeros((batch_size, max_len), np.int32) for _ in range(3))
      for i, ids in enumerate(toks):
        tokens[i, :len(ids)], seg[i, :len(ids)], pos[i, :len(ids)] = ids, 1, np.arange(len(ids))
      states, pooled = (np.asarray(x, np.float32) for x in fn(tokens, seg, pos))
      for i, (caption, ids) in enumerate(zip(chunk, toks)):
        yield {"caption": caption, "tokens": ids, "states": states[i, :len(ids)].astype(_DTYPES[dtype]),
               "pooled": pooled[i]}
      done = start + len(chunk)
      if done == len(captions) or (start // batch_size) % 20 == 0:
        log(f"encode_text: {done}/{len(captions)} captions ({done / (time.perf_counter() - t0):.1f}/s)")

  def finalize(target):
    with open(os.path.join(target, CAPTIONS_FILE), "w", encoding="utf-8") as f:
      for c in captions:
        f.write(json.dumps(c, ensure_ascii=False) + "\n")
    meta = {META_KEY: {
        "encoder": kind, "path": config.text.get("path") or "", "max_len": max_len, "width": width,
        "encoder_fingerprint": encoder_fingerprint(kind, tok_path), "dtype": dtype,
        "num_captions": len(captions), "caches": cache_info}}
    with open(os.path.join(target, "metadata.json"), "w") as f:
      json.dump(meta, f, indent=1)

  features = tfds.features.FeaturesDict({
      "caption": tfds.features.Text(),
      "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
      "states": tfds.features.Tensor(shape=(None, width), dtype=_DTYPES[dtype],
                                     encoding=tfds.features.Encoding.BYTES),
      "pooled": tfds.features.Tensor(shape=(width,), dtype=np.float32),
  })
  return latent_cache.write_dataset(
      out_dir, NAME, features, examples(), split="train", finalize=finalize, overwrite=overwrite,
      description=f"{kind} text embeddings written by sora_jax.data.text_embeddings.")


# ---------------------------------------------------------------------------------------------- reading

class TextEmbeddings:
  """Caption -> (tokens, states, pooled) from a dataset `write` made. Pickles by path (grain workers)."""

  def __init__(self, path: str):
    try:
      self.path = latent_cache._resolve(os.path.expanduser(path))  # pylint: disable=protected-access
    except FileNotFoundError as e:
      raise configs_lib.ConfigPathError(f"config.text.precomputed={path!r}: no text embeddings there ({e}); "
                                        "write them with tools/encode_text.py") from e
    meta_file = os.path.join(self.path, "metadata.json")
    meta = json.load(open(meta_file)) if os.path.isfile(meta_file) else {}
    if META_KEY not in meta or not os.path.isfile(os.path.join(self.path, CAPTIONS_FILE)):
      raise configs_lib.ConfigError(f"config.text.precomputed={path!r}: {self.path} is not a text embeddings "
                                    "dataset (written by tools/encode_text.py)")
    self.info = meta[META_KEY]
    with open(os.path.join(self.path, CAPTIONS_FILE), encoding="utf-8") as f:
      self.rows = {json.loads(line): i for i, line in enumerate(f)}
    if len(self.rows) != self.info["num_captions"]:
      raise ValueError(f"{self.path}: {CAPTIONS_FILE} lists {len(self.rows)} captions, metadata says "
                       f"{self.info['num_captions']}: the dataset is damaged; write it again")
    self._source = None

  @property
  def source(self):
    if self._source is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      self._source = tfds.builder_from_directory(self.path).as_data_source(split="train")
    return self._source

  def __len__(self):
    return len(self.rows)

  def lookup(self, caption: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens int32 [n], states float32 [n, D], pooled float32 [D]) of `caption`."""
    row = self.rows.get(caption)
    if row is None:
      raise KeyError(f"caption {caption[:80]!r} is not in the text embeddings at {self.path}; run "
                     "tools/encode_text.py over the latent caches you train on")
    ex = self.source[row]
    return (np.asarray(ex["tokens"], np.int32), np.asarray(ex["states"], np.float32),
            np.asarray(ex["pooled"], np.float32))

  def check(self, config, caches: Sequence[str] = (), split: str = "train") -> "TextEmbeddings":
    """Raises unless these embeddings come from config.text's encoder and cover each of `caches`."""
    info = self.info
    if config.text.encoder != info["encoder"]:
      raise configs_lib.ConfigError(f"config.text.encoder={config.text.encoder!r}, but the text embeddings at "
                                    f"{self.path} are from {info['encoder']!r}")
    if config.text.max_len != info["max_len"]:
      raise configs_lib.ConfigError(f"config.text.max_len={config.text.max_len}, but the text embeddings at "
                                    f"{self.path} were tokenized with max_len={info['max_len']}: run "
                                    "tools/encode_text.py again")
    if config.text.width != info["width"]:
      raise configs_lib.ConfigError(f"config.text.width={config.text.width}: the text embeddings at {self.path} are "
                                    f"{info['width']} wide")
    fp = encoder_fingerprint(config.text.encoder, config.text.get("path") or None)
    if fp != info["encoder_fingerprint"]:
      raise configs_lib.ConfigError(f"config.text.path={config.text.get('path') or ''!r}: a different "
                                    f"{info['encoder']} model (config/tokenizer files) than the one that wrote "
                                    f"{self.path}")
    known = {c["fingerprint"]: c for c in info["caches"]}
    for cache in caches:
      now = cache_fingerprint(cache, split)
      if now["fingerprint"] not in known:
        listed = ", ".join(f"{c['path']} ({c['num_examples']} examples)" for c in info["caches"]) or "none"
        raise ValueError(
            f"config.text.precomputed={self.path}: computed for latent caches [{listed}], not for "
            f"{now['path']} ({now['num_examples']} examples, or changed since): run tools/encode_text.py "
            f"--cache={now['path']} again")
    return self

  def __getstate__(self):
    return {**self.__dict__, "_source": None}


def from_config(config, caches: Sequence[str] = ()) -> TextEmbeddings | None:
  """The embeddings of `config.text.precomputed` checked against config.text and `caches`; None when unset."""
  path = config.text.get("precomputed") or ""
  return TextEmbeddings(path).check(config, caches) if path else None
