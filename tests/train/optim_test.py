"""The optimizer's gradient clipping: optax's result and state, as one scalar factor."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sora_jax.train import optim


@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clipped, and not
def test_clip_by_global_norm_matches_optax(max_norm):
  keys = jax.random.split(jax.random.key(0), 3)
  grads = {"w": jax.random.normal(keys[0], (8, 5)), "b": jax.random.normal(keys[1], (5,)),
           "s": jax.random.normal(keys[2], (3, 2, 2)) * 4}
  ours, theirs = optim.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
  state, ref_state = ours.init(grads), theirs.init(grads)
  assert jax.tree.structure(state) == jax.tree.structure(ref_state)  # checkpoints carry over
  got, _ = jax.jit(ours.update)(grads, state)
  want, _ = jax.jit(theirs.update)(grads, ref_state)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=2e-6, atol=0)
  norm = float(optax.global_norm(got))
  assert norm == pytest.approx(min(max_norm, float(optax.global_norm(grads))), rel=1e-5)


def test_clip_by_global_norm_leaves_zero_gradients_zero():
  zeros = {"w": jnp.zeros((3, 3))}
  got, _ = optim.clip_by_global_norm(1.0).update(zeros, optax.EmptyState())
  assert np.isfinite(got["w"]).all() and (got["w"] == 0).all()
