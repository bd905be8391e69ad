"""PSNR / SSIM / LPIPS: known values, an independent SSIM reference, safe weight loading."""
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.eval import metrics


def _video(shape, seed=0):
  return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


def test_psnr_known_value():
  x = jnp.zeros((1, 2, 4, 4, 3))
  # MSE 0.01 at peak 2: 10*log10(4 / 0.01) = 26.02 dB.
  np.testing.assert_allclose(metrics.psnr(x, x + 0.1), 10 * np.log10(400.0), rtol=1e-5)


def _ssim_reference(x, y, window=7, sigma=1.5):
  """Direct sliding-window SSIM for one [H, W] channel (Wang et al., valid windows)."""
  r = np.arange(window) - (window - 1) / 2
  g = np.exp(-0.5 * (r / sigma) ** 2)
  w = np.outer(g, g) / np.outer(g, g).sum()
  c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
  vals = []
  for i in range(x.shape[0] - window + 1):
    for j in range(x.shape[1] - window + 1):
      a, b = x[i:i + window, j:j + window], y[i:i + window, j:j + window]
      ma, mb = (w * a).sum(), (w * b).sum()
      va, vb = (w * a * a).sum() - ma ** 2, (w * b * b).sum() - mb ** 2
      cov = (w * a * b).sum() - ma * mb
      vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
  return np.mean(vals)


def test_ssim_matches_direct_reference_and_identity():
  x = np.asarray(_video((1, 1, 12, 12, 1)))
  y = np.clip(x + 0.2 * np.asarray(_video((1, 1, 12, 12, 1), seed=1)), -1, 1)
  np.testing.assert_allclose(metrics.ssim(x, y, window=7), _ssim_reference(x[0, 0, ..., 0], y[0, 0, ..., 0]),
                             rtol=1e-4)
  np.testing.assert_allclose(metrics.ssim(x, x), 1.0, rtol=1e-6)


def test_lpips_zero_on_identity_grows_with_noise_and_is_differentiable():
  x = _video((1, 2, 32, 32, 3))
  noise = jax.random.normal(jax.random.key(1), x.shape)
  assert float(metrics.lpips(x, x)) == pytest.approx(0.0, abs=1e-6)
  small, large = float(metrics.lpips(x, x + 0.05 * noise)), float(metrics.lpips(x, x + 0.3 * noise))
  assert 0 < small < large
  assert metrics.lpips(x, x, reduce=False).shape == (2,)
  g = jax.grad(lambda y: metrics.lpips(y, x))(x + 0.1 * noise)
  assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).sum()) > 0


def test_numpy_only_unpickler_refuses_other_globals(tmp_path):
  good, bad = tmp_path / "good.pkl", tmp_path / "bad.pkl"
  good.write_bytes(pickle.dumps({"w": np.arange(3.0)}))
  bad.write_bytes(pickle.dumps({"f": print}))
  np.testing.assert_array_equal(metrics.load_numpy_pickle(str(good))["w"], np.arange(3.0))
  with pytest.raises(pickle.UnpicklingError, match="refusing"):
    metrics.load_numpy_pickle(str(bad))
