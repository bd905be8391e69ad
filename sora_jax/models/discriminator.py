"""3D patch discriminator for VAE training (hinge GAN loss with an adaptive weight).

Each output logit judges one spacetime patch of the video. Built from the VAE's causal conv, so images
(1-frame videos) and videos go through the same network and the conv has one formulation everywhere.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax.models import vae as vae_lib


class PatchDiscriminator3D(nnx.Module):
  """Strided causal 3D convs with leaky ReLU -> per-patch logits `[B, T', H', W', 1]`."""

  def __init__(self, *, channels: int = 64, num_layers: int = 3, in_channels: int = 3,
               dtype=jnp.float32, rngs: nnx.Rngs):
    convs, norms, ch = [], [], in_channels
    for i in range(num_layers):
      out = channels * 2 ** min(i, 3)
      # Time is halved from the second layer on (first frame alone), space at every layer.
      convs.append(vae_lib.CausalConv3d(ch, out, strides=(2 if i else 1, 2, 2), in_axis=None if i == 0 else
                                        "conv_in", dtype=dtype, rngs=rngs))
      norms.append(vae_lib.channel_norm(out) if i else None)
      ch = out
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    self.out = vae_lib.CausalConv3d(ch, 1, out_axis=None, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for conv, norm in zip(self.convs, self.norms):
      x = conv(x)
      x = jax.nn.leaky_relu(norm(x) if norm is not None else x, 0.2)
    return self.out(x).astype(jnp.float32)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """Discriminator hinge loss: mean(relu(1 - real)) + mean(relu(1 + fake)), halved."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_loss(logits_fake: jax.Array) -> jax.Array:
  """Generator side of the hinge GAN: raise the discriminator's score of reconstructions."""
  return -jnp.mean(logits_fake)


def adaptive_weight(grad_rec: jax.Array, grad_gan: jax.Array, *, max_weight: float = 1e4) -> jax.Array:
  """||dL_rec/dW_last|| / ||dL_gan/dW_last||, clipped, no gradient (the VQGAN balancing rule)."""
  w = jnp.linalg.norm(grad_rec) / (jnp.linalg.norm(grad_gan) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))
