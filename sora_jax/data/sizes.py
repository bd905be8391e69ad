"""Per-sample target sizes: keep the aspect ratio, pick resolution and duration per sample.

Every size is rounded so the VAE stride times the patch size divides it: heights and widths to multiples of
`spatial_stride * patch_h` (resp. `patch_w`), frame counts to `1 + temporal_stride * patch_t * k`. Policies:

- `fixed`: one of a list of (frames, height, width), by weight (the embedded data's default).
- `random`: a random short side in [min_side, max_side] and duration in [min_frames, max_frames], keeping
  the source aspect ratio.
- `native`: the source size, scaled down (keeping the aspect ratio) until it fits a token budget.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Grid:
  """What a size must divide by: VAE strides and the DiT patch."""
  temporal_stride: int = 4
  spatial_stride: int = 8
  patch: tuple[int, int, int] = (1, 2, 2)

  @property
  def frame_step(self) -> int:
    return self.temporal_stride * self.patch[0]

  @property
  def pixel_step(self) -> tuple[int, int]:
    return self.spatial_stride * self.patch[1], self.spatial_stride * self.patch[2]

  def round(self, frames: float, height: float, width: float) -> tuple[int, int, int]:
    """Nearest valid size not larger than the request (at least one patch, one frame)."""
    fs = self.frame_step
    f = 1 + fs * max(0, int((frames - 1) // fs)) if frames > 1 else 1
    sh, sw = self.pixel_step
    return f, max(sh, int(height // sh) * sh), max(sw, int(width // sw) * sw)

  def tokens(self, frames: int, height: int, width: int) -> int:
    lt = 1 + (frames - 1) // self.temporal_stride
    return (math.ceil(lt / self.patch[0]) * (height // self.spatial_stride // self.patch[1])
            * (width // self.spatial_stride // self.patch[2]))


def fixed(sizes: Sequence[Sequence[int]], weights: Sequence[float] | None, rng: np.random.Generator):
  """One of `sizes` by `weights` (they are assumed valid already)."""
  p = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
  return tuple(int(x) for x in sizes[rng.choice(len(sizes), p=p)])


def random_size(native: Sequence[int], grid: Grid, rng: np.random.Generator, *, min_side: int, max_side: int,
                min_frames: int, max_frames: int):
  """A random short side and duration, keeping the native aspect ratio; never longer than the source."""
  frames, height, width = native
  side = rng.uniform(min_side, max_side)
  scale = side / min(height, width)
  f = frames if frames == 1 else min(frames, int(rng.uniform(min_frames, max_frames + 1)))
  return grid.round(f, height * scale, width * scale)


def native_size(native: Sequence[int], grid: Grid, *, max_tokens: int):
  """The native size, downscaled uniformly in space (then trimmed in time) to fit `max_tokens`."""
  f, h, w = grid.round(*native)
  n = grid.tokens(f, h, w)
  if n > max_tokens:
    scale = math.sqrt(max_tokens / n)  # tokens scale with area
    f, h, w = grid.round(f, h * scale, w * scale)
  while grid.tokens(f, h, w) > max_tokens and f > 1:  # one patch per frame is still too much: shorten
    f = grid.round(f - grid.frame_step, h, w)[0]
  return f, h, w
