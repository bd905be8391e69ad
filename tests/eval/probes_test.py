"""The probes' data side: per-attribute conditional-mean patterns of a latent cache."""
import numpy as np

from sora_jax.data import synthetic
from sora_jax.eval import probes

GRID = (3, 2, 2, 4)


def _clip(direction: str, value: float, grid=GRID):
  attrs = dict(shape="circle", color="red", size="small", direction=direction, motion="straight",
               background="black")
  return {"latent": np.full(grid, value, np.float32), "labels": synthetic.labels_of(attrs)}


def test_data_patterns_are_conditional_means_minus_their_average():
  cache = [_clip("left", 1.0), _clip("left", 3.0), _clip("right", 6.0), _clip("up", 0.5),
           _clip("up", 100.0, grid=(1, 2, 2, 4))]  # another grid: skipped
  patterns, present = probes.data_patterns(cache, GRID, "direction")
  order = list(synthetic.ATTRIBUTES["direction"])
  assert patterns.shape == (len(order),) + GRID
  np.testing.assert_array_equal(present, [d in ("left", "right", "up") for d in order])
  means = {"left": 2.0, "right": 6.0, "up": 0.5}
  average = np.mean(list(means.values()))
  for d, m in means.items():
    np.testing.assert_allclose(patterns[order.index(d)], m - average)
  np.testing.assert_array_equal(patterns[order.index("down")], 0.0)
