"""Frame-conditioning masks: strategies per segment in latent time, and the loss leaving given tokens out."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny_t2v
from sora_jax.diffusion import flow
from sora_jax.diffusion import masks
from sora_jax.train import train_dit

# Two rows: segments of 4, 1 (an image) and 2 latent frames, then padding; a 3-frame and a 5-frame one.
FRAMES = [[4, 1, 2, 0], [3, 5, 0, 0]]
TOKENS_PER_FRAME = [[2, 3, 1], [1, 2]]
L = 20


def _batch():
  seg = np.zeros((2, L), np.int32)
  frame = np.zeros((2, L), np.int32)
  for r, (frames, per) in enumerate(zip(FRAMES, TOKENS_PER_FRAME)):
    n = 0
    for s, (nf, k) in enumerate(zip(frames, per)):
      ids = np.repeat(np.arange(nf), k)
      seg[r, n:n + len(ids)], frame[r, n:n + len(ids)] = s + 1, ids
      n += len(ids)
  return jnp.asarray(frame), jnp.asarray(seg), jnp.asarray(FRAMES, jnp.int32)


def _frames_given(mask, frame, seg, r, s):
  """Given latent frames of segment s + 1 of row r, checking every token of a frame agrees."""
  sel = np.asarray(seg[r]) == s + 1
  out = {}
  for f, m in zip(np.asarray(frame[r])[sel], np.asarray(mask[r])[sel]):
    assert out.setdefault(int(f), bool(m)) == bool(m), "tokens of one latent frame disagree"
  return sorted(f for f, m in out.items() if m)


EXPECTED = {  # strategy -> frames given for a segment of n frames (None: depends on the draw)
    "none": lambda n: [],
    "first": lambda n: [0] if n >= 2 else [],
    "last": lambda n: [n - 1] if n >= 2 else [],
    "first_last": lambda n: [0, n - 1] if n >= 3 else [],
}


@pytest.mark.parametrize("strategy", masks.STRATEGIES)
def test_each_strategy_per_segment(strategy):
  frame, seg, nframes = _batch()
  probs = masks.strategy_probs({strategy: 1.0})
  for seed in range(4):
    mask = masks.sample_token_mask(jax.random.key(seed), frame, seg, nframes, probs)
    assert not np.any(np.asarray(mask)[np.asarray(seg) == 0]), "padding is never conditioned"
    for r, frames in enumerate(FRAMES):
      for s, n in enumerate(f for f in frames if f):
        given = _frames_given(mask, frame, seg, r, s)
        if n == 1:
          assert given == [], "an image has nothing to condition on"
        elif strategy in EXPECTED:
          assert given == EXPECTED[strategy](n)
        else:
          assert len(given) < n, "at least one frame is left to generate"
          if strategy == "prefix":
            assert given == list(range(len(given))) and given
          if strategy == "suffix":
            assert given == list(range(n - len(given), n)) and given


def test_prefix_lengths_cover_the_range():
  frame, seg, nframes = _batch()
  probs = masks.strategy_probs({"prefix": 1.0})
  lengths = {len(_frames_given(masks.sample_token_mask(jax.random.key(i), frame, seg, nframes, probs),
                               frame, seg, 1, 1)) for i in range(40)}
  assert lengths == {1, 2, 3, 4}  # a 5-frame segment: prefixes of 1..4 frames


def test_strategy_probs():
  assert masks.strategy_probs(None)[0] == 1.0
  p = masks.strategy_probs(masks.default_ratios())
  np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)
  assert p[0] == pytest.approx(0.5)
  with pytest.raises(ValueError, match="unknown strategy 'middle'"):
    masks.strategy_probs({"middle": 1.0})
  with pytest.raises(ValueError, match=r"mask_ratios\['first'\]=-1"):
    masks.strategy_probs({"first": -1})
  with pytest.raises(ValueError, match="must not all be zero"):
    masks.strategy_probs({"first": 0.0})


def _loss_inputs(x0, **cond):
  """(config, packed batch) for `denoiser_loss` over `_batch()`'s segments, with `cond` set on config.cond."""
  frame, seg, nframes = _batch()
  config = tiny_t2v.get_config("runlocal")
  config.train_dit.max_segments = 4
  for key, value in cond.items():  # replaced whole (ConfigDict.update would merge into the demo's dicts)
    config.cond[key] = value
  grid = jnp.stack([nframes, jnp.ones_like(nframes), jnp.ones_like(nframes)], -1)
  batch = {"tokens": x0, "tokens_segment_ids": seg, "coords": jnp.stack([frame] * 3, -1), "grid": grid,
           "text": jnp.zeros((2, 4), jnp.int32), "text_segment_ids": jnp.zeros((2, 4), jnp.int32),
           "text_positions": jnp.zeros((2, 4), jnp.int32)}
  return config, batch


class _ZeroModel:
  """Records what the loss feeds the denoiser and predicts zero velocity."""

  def encode_text(self, text, seg, pos, num_segments, labels=None):
    return jnp.zeros(text.shape + (2,)), jnp.zeros((text.shape[0], num_segments, 2))

  def __call__(self, x_t, coords, seg, t_table, text, text_seg, pooled, cond_mask=None):
    self.x_t, self.cond_mask = x_t, cond_mask
    return jnp.zeros_like(x_t)


def test_loss_gives_conditioned_tokens_clean_and_leaves_them_out():
  frame, seg, nframes = _batch()
  x0 = jax.random.normal(jax.random.key(3), (2, L, 4))
  config, batch = _loss_inputs(x0, mask_ratios={"first": 1.0})
  rng = jax.random.key(0)
  model = _ZeroModel()
  loss = train_dit.denoiser_loss(model, batch, rng, config)
  mask = np.asarray(model.cond_mask)
  np.testing.assert_array_equal(mask, (np.asarray(frame) == 0) & (np.asarray(nframes)[
      np.arange(2)[:, None], np.maximum(np.asarray(seg) - 1, 0)] >= 2) & (np.asarray(seg) > 0))
  np.testing.assert_array_equal(np.asarray(model.x_t)[mask], np.asarray(x0)[mask])
  # Same t and noise as an unconditioned run: the zero-velocity loss is the mean |noise - x0|^2 over the
  # other tokens, per segment first.
  config.cond.mask_ratios = {"none": 1.0}
  train_dit.denoiser_loss(model, batch, rng, config)
  assert model.cond_mask is None
  _, rng_n = jax.random.split(rng)
  target = jax.random.normal(rng_n, x0.shape) - x0
  want, _ = flow.flow_loss(jnp.zeros_like(x0), target, seg, jnp.asarray(~mask, jnp.float32), max_segments=4)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  unmasked, _ = flow.flow_loss(jnp.zeros_like(x0), target, seg, max_segments=4)
  assert abs(float(unmasked) - float(loss)) > 1e-4


def test_no_token_is_conditioned_before_cond_start_step():
  config, batch = _loss_inputs(jax.random.normal(jax.random.key(3), (2, L, 4)), mask_ratios={"first": 1.0},
                               start_step=10)
  model = _ZeroModel()
  before = train_dit.denoiser_loss(model, batch, jax.random.key(0), config, step=jnp.asarray(9))
  assert not np.asarray(model.cond_mask).any()
  after = train_dit.denoiser_loss(model, batch, jax.random.key(0), config, step=jnp.asarray(10))
  assert np.asarray(model.cond_mask).sum() > 0
  # Before the start step the loss counts every token, as an unconditioned run with the same rng does.
  config.cond.mask_ratios = {"none": 1.0}
  np.testing.assert_allclose(float(before), float(train_dit.denoiser_loss(model, batch, jax.random.key(0), config)),
                             rtol=1e-6)
  assert float(after) != float(before)


def test_a_given_strategy_overrides_the_draw_for_its_segment():
  frame, seg, nframes = _batch()
  probs = masks.strategy_probs({"none": 1.0})
  last = masks.STRATEGIES.index("last")
  given = jnp.asarray([[last, -1, last, 0], [-1, masks.STRATEGIES.index("prefix"), 0, 0]], jnp.int32)
  for seed in range(8):
    mask = masks.sample_token_mask(jax.random.key(seed), frame, seg, nframes, probs, given)
    assert _frames_given(mask, frame, seg, 0, 0) == [3]  # 4 frames, "last"
    assert _frames_given(mask, frame, seg, 0, 1) == []   # drawn: "none"
    assert _frames_given(mask, frame, seg, 0, 2) == [1]  # 2 frames, "last"
    assert _frames_given(mask, frame, seg, 1, 0) == []   # drawn: "none"
    prefix = _frames_given(mask, frame, seg, 1, 1)
    assert prefix and prefix == list(range(len(prefix))) and len(prefix) < 5


def test_segments_with_a_given_strategy_wait_out_of_the_loss_until_the_start_step():
  frame, seg, _ = _batch()
  x0 = jax.random.normal(jax.random.key(3), (2, L, 4))
  config, batch = _loss_inputs(x0, mask_ratios={"none": 1.0}, start_step=10, tag_strategies={"exits": "first"})
  first = masks.STRATEGIES.index("first")
  batch["given"] = jnp.asarray([[first, -1, -1, 0], [-1, -1, 0, 0]], jnp.int32)
  rng = jax.random.key(0)
  model = _ZeroModel()
  _, rng_n = jax.random.split(rng)
  target = jax.random.normal(rng_n, x0.shape) - x0
  fixed = np.asarray(seg) == np.asarray([[1], [-1]])  # row 0's first segment only
  before = train_dit.denoiser_loss(model, batch, rng, config, step=jnp.asarray(9))
  assert not np.asarray(model.cond_mask).any()
  want, _ = flow.flow_loss(jnp.zeros_like(x0), target, seg, jnp.asarray(~fixed, jnp.float32), max_segments=4)
  np.testing.assert_allclose(before, want, rtol=1e-6)
  after = train_dit.denoiser_loss(model, batch, rng, config, step=jnp.asarray(10))
  given = (np.asarray(frame) == 0) & fixed
  np.testing.assert_array_equal(np.asarray(model.cond_mask), given)
  want, _ = flow.flow_loss(jnp.zeros_like(x0), target, seg, jnp.asarray(~given, jnp.float32), max_segments=4)
  np.testing.assert_allclose(after, want, rtol=1e-6)
