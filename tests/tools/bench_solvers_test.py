"""tools/bench_solvers.py: how much of a true continuation's motion a generated one keeps."""
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import bench_solvers  # noqa: E402


def _moving(step, frames=7, size=32):
  """A 6 x 6 square whose left edge moves `step` pixels right per frame."""
  video = np.zeros((frames, size, size, 3), np.uint8)
  for t in range(frames):
    col = 8 + round(step * t)
    video[t, 12:18, col:col + 6] = (255, 255, 0)
  return video


def test_speed_kept_reads_same_half_stopped_and_reversed_motion():
  true = [_moving(2)] * 4 + [np.zeros((7, 32, 32, 3), np.uint8)]  # the last does not move: not counted
  generated = [_moving(2), _moving(1), _moving(0), _moving(2)[::-1], _moving(2)]
  got = bench_solvers.speed_kept(generated, true)
  assert got["clips"] == 4
  assert got["true_speed"] == pytest.approx(2 / 32)
  assert got["median"] == pytest.approx((0.5 + 0.0) / 2)  # of 1, 0.5, 0, -1
  assert got["quartiles"] == pytest.approx([-0.25, 0.625])
  assert bench_solvers.speed_kept([_moving(2)], [_moving(0)]) == {"clips": 0}
