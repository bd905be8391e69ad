"""The text-to-video denoiser: text encoder + DiT, trained together and averaged together (EMA)."""
from __future__ import annotations

from flax import nnx

from sora_jax.models import dit as dit_lib
from sora_jax import segments
from sora_jax.models import text as text_lib


class TextToVideo(nnx.Module):

  def __init__(self, config, *, patch_dim: int, rngs: nnx.Rngs):
    backend = config.attention
    self.text = text_lib.from_config(config.text, backend=backend, rngs=rngs)
    self.dit = dit_lib.from_config(config, patch_dim=patch_dim, text_dim=config.text.width, backend=backend,
                                   rngs=rngs)

  def encode_text(self, text, text_segment_ids, text_positions, num_segments: int):
    """Packed caption tokens [B, Lt] -> (per-token states [B, Lt, Dt], pooled per segment [B, S, Dt])."""
    states = self.text(text, text_segment_ids, text_positions)
    return states, segments.mean(states, text_segment_ids, num_segments)

  def __call__(self, x, coords, segment_ids, t_table, text_states, text_segment_ids, text_pooled,
               cond_mask=None):
    """Velocity [B, L, P]; `cond_mask` [B, L] marks tokens given clean (modulated as t = 0)."""
    return self.dit(x, coords, segment_ids, t_table, text_states, text_segment_ids, text_pooled,
                    cond_mask=cond_mask)


def patch_dim(config) -> int:
  pt, ph, pw = config.dit.patch_size
  return pt * ph * pw * config.vae.latent_channels
