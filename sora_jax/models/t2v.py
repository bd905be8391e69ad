"""The denoiser: text encoder (or class labels) + DiT, trained together and averaged together (EMA).

With `config.text.encoder == 'class'` there is no text encoder: each segment's class is column
`config.text.class_column` of the packed `labels` table, and an unknown label (-1, as label dropout and the
unconditional branch of guidance write it) is the null class.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from sora_jax.models import dit as dit_lib
from sora_jax import segments
from sora_jax.models import text as text_lib


def is_class_conditional(config) -> bool:
  return config.text.encoder == "class"


def text_states_used(config) -> bool:
  """Whether the DiT reads the text encoder's per-token states: through cross-attention, or pooled from them.
  With bag-of-words pooling (`text.pool='words'/'words_sum'`) of the trainable encoder and no cross-attention
  only the word embeddings reach the DiT, and XLA drops the encoder's layers as dead code."""
  if is_class_conditional(config):
    return False
  pooled_from_states = config.text.encoder != "trainable" or config.text.get("pool", "mean") == "mean"
  return bool(config.dit.get("cross_attention", True)) or pooled_from_states


class TextToVideo(nnx.Module):

  def __init__(self, config, *, patch_dim: int, rngs: nnx.Rngs):
    backend = config.attention
    if is_class_conditional(config):
      self.text, text_dim = None, 0
      self.num_classes, self.class_column = config.text.num_classes, config.text.class_column
    else:
      self.text, text_dim = text_lib.from_config(config.text, backend=backend, rngs=rngs), config.text.width
      self.pool = config.text.get("pool", "mean")
      self.num_classes, self.class_column = 0, None
    self.dit = dit_lib.from_config(config, patch_dim=patch_dim, text_dim=text_dim, backend=backend, rngs=rngs)

  def encode_text(self, text, text_segment_ids, text_positions, num_segments: int, labels=None):
    """Packed caption tokens [B, Lt] -> (per-token states [B, Lt, Dt], pooled per segment [B, S, Dt]).

    Class-conditional: (None, class ids [B, S]) from `labels` [B, S, A] (-1 -> the null class).
    """
    if self.text is None:
      if labels is None:
        raise ValueError("a class-conditional model needs the packed `labels` table")
      ids = labels[..., self.class_column]
      return None, jnp.where((ids >= 0) & (ids < self.num_classes), ids, self.num_classes)
    states = self.text(text, text_segment_ids, text_positions)
    if hasattr(self.text, "pool"):  # pretrained encoders pool as they were trained (e.g. normalised mean)
      return states, self.text.pool(states, text_segment_ids, num_segments)
    if self.pool in ("words", "words_sum"):
      return states, self.text.bag_of_words(text, text_segment_ids, num_segments,
                                            normalize=self.pool == "words")
    return states, segments.mean(states, text_segment_ids, num_segments)

  def __call__(self, x, coords, segment_ids, t_table, text_states, text_segment_ids, text_pooled,
               cond_mask=None):
    """Velocity [B, L, P]; `cond_mask` [B, L] marks tokens given clean (modulated as t = 0)."""
    return self.dit(x, coords, segment_ids, t_table, text_states, text_segment_ids, text_pooled,
                    cond_mask=cond_mask)


def patch_dim(config) -> int:
  pt, ph, pw = config.dit.patch_size
  return pt * ph * pw * config.vae.latent_channels
