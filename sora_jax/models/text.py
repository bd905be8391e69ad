"""A small trainable byte-level text encoder for the embedded data.

Captions are UTF-8 bytes behind a BOS token; an empty caption (the unconditional prompt for
classifier-free guidance) is the BOS token alone, so every segment always has at least one text token.
The encoder runs on packed text rows: tokens of different captions never attend to each other.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.models import layers
from sora_jax.models import rope as rope_lib

PAD, BOS = 0, 1
VOCAB_SIZE = 258  # PAD, BOS, 256 bytes


def tokenize(caption: str, max_len: int) -> np.ndarray:
  """Caption -> int32 [n] with n <= max_len: BOS followed by the (truncated) UTF-8 bytes shifted by 2."""
  data = caption.encode("utf-8")[: max_len - 1]
  return np.concatenate([[BOS], np.frombuffer(data, np.uint8).astype(np.int32) + 2]).astype(np.int32)


class TextBlock(nnx.Module):

  def __init__(self, dim, num_heads, *, backend, rngs):
    self.norm1 = layers.RMSNorm(dim)
    self.attn = layers.Attention(dim, num_heads, qk_norm=True, backend=backend, rngs=rngs)
    self.norm2 = layers.RMSNorm(dim)
    self.mlp = layers.MLP(dim, 4 * dim, rngs=rngs)

  def __call__(self, x, segment_ids, rope):
    x = x + self.attn(self.norm1(x), segment_ids, rope=rope)
    return x + self.mlp(self.norm2(x))


class ByteTextEncoder(nnx.Module):
  """Embedding + pre-norm transformer over packed byte tokens; returns per-token states."""

  def __init__(self, *, width: int, depth: int, num_heads: int, backend: str = "xla", rngs: nnx.Rngs):
    self.width = width
    self.num_heads = num_heads
    self.embed = nnx.Param(jax.random.normal(rngs.params(), (VOCAB_SIZE, width)) * 0.02,
                           out_sharding=("vocab", "embed"))
    self.blocks = nnx.List([TextBlock(width, num_heads, backend=backend, rngs=rngs) for _ in range(depth)])
    self.norm = layers.RMSNorm(width)

  def __call__(self, tokens, segment_ids, positions):
    """tokens, segment_ids, positions: [B, Lt] -> states [B, Lt, width]."""
    # One-hot matmul: the backward of a gather is a scatter-add, slow on CPU and TPU; the vocab is tiny.
    x = jax.nn.one_hot(tokens, VOCAB_SIZE, dtype=jnp.float32) @ self.embed[...]
    rope = rope_lib.rope_1d(positions, self.width // self.num_heads)
    for block in self.blocks:
      x = block(x, segment_ids, rope)
    x = self.norm(x)
    return jnp.where((segment_ids > 0)[..., None], x, 0.0)


def from_config(cfg, *, backend: str, rngs: nnx.Rngs) -> ByteTextEncoder:
  if cfg.encoder != "bytes":
    raise ValueError(f"config.text.encoder={cfg.encoder!r}: unknown text encoder; available: 'bytes'")
  return ByteTextEncoder(width=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads, backend=backend, rngs=rngs)
