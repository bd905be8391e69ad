"""A small trainable text encoder over byte or word tokens, for the embedded data.

Captions become a BOS token followed by either their UTF-8 bytes (`bytes`: any text, ~55 tokens for the
embedded captions) or their words hashed into a fixed vocabulary (`words`: ~11 tokens, 5x cheaper text and
cross-attention; collisions are possible but rare at 8192 buckets). An empty caption (the unconditional
prompt for classifier-free guidance) is the BOS token alone, so every segment has at least one text token.
The encoder runs on packed text rows: tokens of different captions never attend to each other.

`config.text.encoder` 'minilm' or 't5' picks a pretrained encoder instead (`text_pretrained.py`), with its own
tokenizer ('minilm' / 't5'); there the empty caption is the tokenizer's special tokens ([CLS] [SEP], </s>).
"""
from __future__ import annotations

import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax import configs_lib
from sora_jax import segments
from sora_jax.models import layers
from sora_jax.models import rope as rope_lib
from sora_jax.models import text_pretrained

PAD, BOS = 0, 1
VOCAB_SIZES = {"bytes": 258, "words": 8192}  # PAD, BOS, then bytes / word buckets
# Tokenizers of the pretrained encoders: tokenizer.json in the model folder (config.text.path).
PRETRAINED_TOKENIZERS = text_pretrained.KINDS
TOKENIZERS = tuple(VOCAB_SIZES) + PRETRAINED_TOKENIZERS
_WORD = re.compile(r"[a-z0-9]+")


def tokenize(caption: str, max_len: int, tokenizer: str = "bytes", path: str | None = None) -> np.ndarray:
  """Caption -> int32 [n], 1 <= n <= max_len.

  bytes / words: BOS then the (truncated) bytes or hashed words, shifted by 2. minilm / t5: the pretrained
  tokenizer.json of `path` (config.text.path; the packaged MiniLM when None), special tokens included.
  """
  if tokenizer in PRETRAINED_TOKENIZERS:
    return text_pretrained.tokenize(caption, max_len, text_pretrained.model_dir(tokenizer, path))
  if tokenizer == "bytes":
    ids = np.frombuffer(caption.encode("utf-8")[: max_len - 1], np.uint8).astype(np.int32) + 2
  elif tokenizer == "words":
    buckets = VOCAB_SIZES["words"] - 2
    ids = np.asarray([2 + zlib.crc32(w.encode()) % buckets for w in _WORD.findall(caption.lower())],
                     np.int32)[: max_len - 1]
  else:
    raise configs_lib.ConfigError(f"config.text.tokenizer={tokenizer!r}: choose one of {TOKENIZERS}")
  return np.concatenate([[BOS], ids]).astype(np.int32)


class TextBlock(nnx.Module):

  def __init__(self, dim, num_heads, *, backend, rngs):
    self.norm1 = layers.RMSNorm(dim)
    self.attn = layers.Attention(dim, num_heads, qk_norm=True, backend=backend, rngs=rngs)
    self.norm2 = layers.RMSNorm(dim)
    self.mlp = layers.MLP(dim, 4 * dim, rngs=rngs)

  def __call__(self, x, segment_ids, rope):
    x = x + self.attn(self.norm1(x), segment_ids, rope=rope)
    return x + self.mlp(self.norm2(x))


class TextEncoder(nnx.Module):
  """Embedding + pre-norm transformer over packed caption tokens; returns per-token states."""

  def __init__(self, *, vocab_size: int, width: int, depth: int, num_heads: int, backend: str = "xla",
               rngs: nnx.Rngs):
    self.width = width
    self.num_heads = num_heads
    self.vocab_size = vocab_size
    self.embed = nnx.Param(jax.random.normal(rngs.params(), (vocab_size, width)),
                           out_sharding=("vocab", "embed"))
    self.blocks = nnx.List([TextBlock(width, num_heads, backend=backend, rngs=rngs) for _ in range(depth)])
    self.norm = layers.RMSNorm(width)

  def embed_tokens(self, tokens):
    """tokens [B, Lt] -> context-free word embeddings [B, Lt, width] (unit scale)."""
    if self.vocab_size <= 1024:
      # One-hot matmul: a gather's backward is a scatter-add, slow on CPU and TPU; the vocab is tiny.
      return jax.nn.one_hot(tokens, self.vocab_size, dtype=jnp.float32) @ self.embed[...]
    return jnp.take(self.embed[...], tokens, axis=0)

  def bag_of_words(self, tokens, segment_ids, num_segments: int, *, normalize: bool = True):
    """Per-segment sum of the word embeddings, over sqrt(caption length) with `normalize`: [B, S, width].

    Every word keeps its own share of the pooled vector (1 / sqrt(length) per component normalised, unit
    scale as a plain sum), where the mean of the contextual states gives a word that differs only at its
    own position 1 / length of a difference the final norm has already shrunk (experiments/tiny_t2v/README.md).
    """
    oh = segments.onehot(segment_ids, num_segments)
    total = jnp.einsum("bls,bld->bsd", oh, self.embed_tokens(tokens))
    if not normalize:
      return total
    return total / jnp.sqrt(jnp.maximum(jnp.sum(oh, axis=1), 1.0))[..., None]

  def __call__(self, tokens, segment_ids, positions):
    """tokens, segment_ids, positions: [B, Lt] -> states [B, Lt, width]."""
    x = self.embed_tokens(tokens)
    rope = rope_lib.rope_1d(positions, self.width // self.num_heads)
    for block in self.blocks:
      x = block(x, segment_ids, rope)
    x = self.norm(x)
    return jnp.where((segment_ids > 0)[..., None], x, 0.0)


def from_config(cfg, *, backend: str, rngs: nnx.Rngs) -> nnx.Module:
  """config.text -> an encoder with the `TextEncoder` call contract.

  Pretrained encoders ('minilm', 't5') come with random weights: fill them with
  `text_pretrained.load_weights(encoder)` once the state exists. They are frozen unless
  `config.text.trainable`; `config.text.width` must equal their hidden size (the DiT reads it).
  """
  if cfg.encoder in text_pretrained.KINDS:
    tokenizer = cfg.get("tokenizer", "bytes")
    if tokenizer != cfg.encoder:
      raise configs_lib.ConfigError(f"config.text.tokenizer={tokenizer!r}: encoder {cfg.encoder!r} needs tokenizer "
                                    f"{cfg.encoder!r}")
    encoder = text_pretrained.build(cfg.encoder, cfg.get("path"), trainable=cfg.get("trainable", False),
                                    backend=backend, rngs=rngs)
    if encoder.width != cfg.width:
      raise configs_lib.ConfigError(f"config.text.width={cfg.width}: the {cfg.encoder} encoder has width "
                                    f"{encoder.width}")
    if cfg.get("max_len", 0) > getattr(encoder, "max_positions", cfg.get("max_len", 0)):
      raise configs_lib.ConfigError(f"config.text.max_len={cfg.max_len}: the {cfg.encoder} encoder has "
                                    f"{encoder.max_positions} positions")
    return encoder
  if cfg.encoder != "trainable":
    raise configs_lib.ConfigError(f"config.text.encoder={cfg.encoder!r}: unknown text encoder; available: "
                                  f"{('trainable',) + text_pretrained.KINDS}")
  tokenizer = cfg.get("tokenizer", "bytes")
  if tokenizer not in VOCAB_SIZES:
    raise configs_lib.ConfigError(f"config.text.tokenizer={tokenizer!r}: choose one of {sorted(VOCAB_SIZES)}")
  return TextEncoder(vocab_size=VOCAB_SIZES[tokenizer], width=cfg.width, depth=cfg.depth,
                     num_heads=cfg.num_heads, backend=backend, rngs=rngs)
