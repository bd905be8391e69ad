"""Tests for sora_jax.diffusion.flow: schedule identities, the masked loss, DDPM parameterisations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.diffusion import flow

SEG = np.array([[1, 1, 1, 2, 2, 0, 0, 0],
                [1, 2, 2, 2, 2, 2, 2, 3]], np.int32)


def test_tokens_from_table_gathers_and_zeros_padding():
  table = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2) + 1
  out = np.asarray(flow.tokens_from_table(table, SEG))
  assert out.shape == (2, 8, 2)
  for b in range(2):
    for l in range(8):
      want = table[b, SEG[b, l] - 1] if SEG[b, l] else np.zeros(2)
      np.testing.assert_array_equal(out[b, l], want)
  # Scalar tables give [B, L].
  assert flow.tokens_from_table(table[..., 0], SEG).shape == (2, 8)


def test_interpolate_endpoints_and_velocity_recovers_x0():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x0 = jax.random.normal(k1, (2, 8, 4))
  noise = jax.random.normal(k2, (2, 8, 4))
  np.testing.assert_allclose(flow.interpolate(x0, noise, jnp.zeros((2, 8))), x0)
  np.testing.assert_allclose(flow.interpolate(x0, noise, jnp.ones((2, 8))), noise)
  t = jax.random.uniform(k3, (2, 8))
  x_t = flow.interpolate(x0, noise, t)
  v = flow.velocity_target(x0, noise)
  np.testing.assert_allclose(x_t - t[..., None] * v, x0, atol=1e-5)
  np.testing.assert_allclose(flow.x0_from_velocity(x_t, v, t), x0, atol=1e-5)


def test_shift_t_fixes_endpoints_is_monotone_and_adds_noise():
  t = jnp.linspace(0.0, 1.0, 101)
  for s in (0.5, 1.0, 3.0):
    out = np.asarray(flow.shift_t(t, s))
    assert out[0] == 0.0 and out[-1] == pytest.approx(1.0)
    assert np.all(np.diff(out) > 0)
  np.testing.assert_allclose(flow.shift_t(t, 1.0), t, atol=1e-7)
  assert np.all(np.asarray(flow.shift_t(t, 3.0)) >= np.asarray(t) - 1e-7)
  # Per-segment shift tables broadcast.
  assert flow.shift_t(jnp.full((2, 3), 0.5), jnp.array([[1.0, 2.0, 4.0]])).shape == (2, 3)


def test_resolution_shift_monotone_and_clipped():
  n = jnp.array([0, 64, 256, 1024, 4096, 1 << 20])
  out = np.asarray(flow.resolution_shift(n, base_tokens=256, max_shift=6.0))
  np.testing.assert_allclose(out, [1.0, 1.0, 1.0, 2.0, 4.0, 6.0], rtol=1e-6)
  assert np.all(np.diff(out) >= 0)


def test_sample_t_range_and_logit_normal_median():
  rng = jax.random.key(1)
  t = np.asarray(flow.sample_t(rng, (20000,)))
  assert t.min() > 0 and t.max() < 1
  assert np.median(t) == pytest.approx(0.5, abs=0.02)
  shifted = np.asarray(flow.sample_t(rng, (20000,), logit_mean=1.0))
  assert np.median(shifted) == pytest.approx(float(jax.nn.sigmoid(1.0)), abs=0.02)
  u = np.asarray(flow.sample_t(rng, (20000,), kind="uniform"))
  assert u.min() > 0 and u.max() < 1 and np.mean(u) == pytest.approx(0.5, abs=0.02)
  with pytest.raises(ValueError):
    flow.sample_t(rng, (2,), kind="bogus")


def _loss_reference(pred, target, seg, weight, num_seg):
  """Numpy: per-token MSE over D, weighted mean per segment, mean over segments that exist."""
  mse = ((pred - target) ** 2).mean(-1)
  per, present = np.zeros(seg.shape[:1] + (num_seg,)), []
  for b in range(seg.shape[0]):
    for k in range(1, num_seg + 1):
      w = weight[b] * (seg[b] == k)
      if w.sum() > 0:
        per[b, k - 1] = (w * mse[b]).sum() / w.sum()
        present.append(per[b, k - 1])
  return np.mean(present), per


def test_flow_loss_matches_reference_and_ignores_padding():
  k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
  pred = np.array(jax.random.normal(k1, (2, 8, 3)))
  target = np.asarray(jax.random.normal(k2, (2, 8, 3)))
  weight = np.array(jax.random.uniform(k3, (2, 8)))
  weight[1, 7] = 0.0  # segment 3 of row 1 has only a zero-weight token: it does not exist
  loss_fn = jax.jit(flow.flow_loss, static_argnames="max_segments")
  for w in (None, weight):
    loss, per = loss_fn(pred, target, SEG, w, max_segments=4)
    ref_loss, ref_per = _loss_reference(pred, target, SEG, np.ones((2, 8)) if w is None else w, 4)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(per, ref_per, rtol=1e-5, atol=1e-7)
  # Garbage in padding positions changes nothing.
  pred2 = pred.copy()
  pred2[SEG == 0] = 1e6
  np.testing.assert_allclose(loss_fn(pred2, target, SEG, max_segments=4)[0],
                             loss_fn(pred, target, SEG, max_segments=4)[0])
  assert flow.diffusion_loss is flow.flow_loss


def test_flow_loss_segments_weigh_equally():
  # Segment 1 has 1 token with error 1, segment 2 has 6 tokens with error 0: loss is 0.5, not 1/7.
  seg = np.array([[1, 2, 2, 2, 2, 2, 2, 0]], np.int32)
  pred = np.zeros((1, 8, 2), np.float32)
  pred[0, 0] = 1.0
  loss, per = flow.flow_loss(pred, np.zeros_like(pred), seg, max_segments=3)
  assert float(loss) == pytest.approx(0.5)
  np.testing.assert_allclose(per, [[1.0, 0.0, 0.0]])


def test_flow_loss_all_padding_is_zero_not_nan():
  loss, _ = flow.flow_loss(jnp.ones((1, 4, 2)), jnp.zeros((1, 4, 2)), jnp.zeros((1, 4), jnp.int32),
                           max_segments=2)
  assert float(loss) == 0.0


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddpm_schedule(kind):
  ac = np.asarray(flow.ddpm_schedule(1000, kind))
  assert ac.shape == (1000,)
  assert np.all(np.diff(ac) < 0) and 0 < ac[-1] < 0.05 and ac[0] > 0.99
  zt = np.asarray(flow.ddpm_schedule(1000, kind, zero_terminal_snr=True))
  assert zt[-1] == pytest.approx(0.0, abs=1e-12)
  assert zt[0] == pytest.approx(ac[0], rel=1e-6)
  assert np.all(np.diff(zt) <= 0)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_ddpm_targets_invert(prediction):
  k1, k2 = jax.random.split(jax.random.key(3))
  x0 = jax.random.normal(k1, (2, 8, 3))
  noise = jax.random.normal(k2, (2, 8, 3))
  a = jnp.linspace(0.05, 0.95, 16).reshape(2, 8)
  x_t = flow.ddpm_interpolate(x0, noise, a)
  target = flow.ddpm_targets(x0, noise, a, prediction)
  x0_hat, eps_hat = flow.ddpm_x0_eps(x_t, target, a, prediction)
  np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
  np.testing.assert_allclose(eps_hat, noise, atol=2e-4)


def test_segment_counts_feeds_resolution_shift():
  counts = flow.segment_counts(jnp.asarray(SEG), max_segments=4)
  np.testing.assert_array_equal(counts, [[3, 2, 0, 0], [1, 6, 1, 0]])
  assert flow.resolution_shift(counts, 1.0, 2.0).shape == (2, 4)
