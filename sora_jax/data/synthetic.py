"""Procedural captioned videos: the embedded default dataset (no download).

Each sample is one flat-coloured shape moving over a flat background. Every
attribute of the clip is named in its caption and returned as an integer label,
so a pixel-level scorer (`sora_jax.eval.scorer`) can check prompt adherence.

Everything is a pure function of (index, split, seed): no global RNG, so the
same index gives the same bytes in any process, which keeps grain pipelines
resumable. A fixed set of (color, shape, direction) combinations is held out of
training to measure compositional generalisation.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
import zlib

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "cyan", "magenta")
SIZES = ("small", "large")
# Image coordinates: "up" means the row index decreases.
DIRECTIONS = ("left", "right", "up", "down")
MOTIONS = ("straight", "zigzag")
BACKGROUNDS = ("black", "gray", "navy")

# Foreground colours are saturated (max channel >= 220) and backgrounds dark,
# so every foreground is far from every background, also after blur and noise.
PALETTE = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (60, 100, 255),
    "yellow": (235, 220, 40),
    "cyan": (40, 220, 230),
    "magenta": (225, 50, 225),
    "black": (0, 0, 0),
    "gray": (90, 90, 90),
    "navy": (20, 24, 80),
}

ATTRIBUTES = dict(
    shape=SHAPES,
    color=COLORS,
    size=SIZES,
    direction=DIRECTIONS,
    motion=MOTIONS,
    background=BACKGROUNDS,
)
ATTRIBUTE_NAMES = tuple(ATTRIBUTES)
# The `tags` of a clip whose shape leaves the frame, and of one whose shape enters it.
EXIT_TAG = "exits"
ENTER_TAG = "enters"

# Shape extent (bounding box side) as a fraction of min(H, W).
SIZE_FRACTION = {"small": 0.24, "large": 0.42}
# Net displacement over a clip as a fraction of the frame along the direction.
DISPLACEMENT_RANGE = (0.35, 0.5)
# Zigzag amplitude as a fraction of min(H, W).
ZIGZAG_AMPLITUDE = 0.1

_SPLITS = {"train": 0, "heldout": 1, "all": 2}
_MOTION_VERBS = {"straight": "moving", "zigzag": "zigzagging"}


def _heldout_combos(fraction: float = 0.1) -> tuple[tuple[str, str, str], ...]:
  """Picks ~`fraction` of (color, shape, direction) combos by a stable hash.

  Combos are taken in crc32 order, skipping any that would share a pair
  (color-shape, color-direction, shape-direction) with an already held-out
  combo: every pair of values then still co-occurs in training, so the held-out
  set tests new compositions, never unseen values or pairs.
  """
  combos = list(itertools.product(COLORS, SHAPES, DIRECTIONS))
  combos.sort(key=lambda c: zlib.crc32("/".join(c).encode()))
  target = max(1, round(fraction * len(combos)))
  picked, used = [], set()
  for color, shape, direction in combos:
    pairs = {("cs", color, shape), ("cd", color, direction), ("sd", shape, direction)}
    if pairs & used:
      continue
    picked.append((color, shape, direction))
    used |= pairs
    if len(picked) == target:
      break
  return tuple(sorted(picked))


HELDOUT_COMBOS = _heldout_combos()
_HELDOUT_SET = frozenset(HELDOUT_COMBOS)


def is_heldout(attrs: Mapping[str, str]) -> bool:
  """Whether the clip's (color, shape, direction) combo is held out of training."""
  return (attrs["color"], attrs["shape"], attrs["direction"]) in _HELDOUT_SET


def caption(attrs: Mapping[str, str]) -> str:
  """Caption naming every attribute; lower-case ASCII, < 64 bytes."""
  return (f"a {attrs['size']} {attrs['color']} {attrs['shape']} "
          f"{_MOTION_VERBS[attrs['motion']]} {attrs['direction']} "
          f"on a {attrs['background']} background")


def labels_of(attrs: Mapping[str, str]) -> np.ndarray:
  """Attribute indices in ATTRIBUTE_NAMES order, int32 [len(ATTRIBUTE_NAMES)]."""
  return np.array([ATTRIBUTES[k].index(attrs[k]) for k in ATTRIBUTE_NAMES], np.int32)


def attrs_of(labels: Sequence[int]) -> dict[str, str]:
  """Inverse of `labels_of`."""
  return {k: ATTRIBUTES[k][int(i)] for k, i in zip(ATTRIBUTE_NAMES, labels)}


def _rng(*keys: int) -> np.random.Generator:
  # SeedSequence over a list of ints is stable across processes and platforms.
  return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


def sample_attributes(index: int, split: str = "train", seed: int = 0) -> dict[str, str]:
  """Deterministic attributes for `index`.

  'train' never yields a held-out combo, 'heldout' only yields held-out combos,
  'all' draws uniformly from everything.
  """
  if split not in _SPLITS:
    raise ValueError(f"split must be one of {tuple(_SPLITS)}, got {split!r}")
  rng = _rng(seed, index, _SPLITS[split], 1)
  attrs = {k: v[rng.integers(len(v))] for k, v in ATTRIBUTES.items()}
  if split == "heldout":
    combo = HELDOUT_COMBOS[rng.integers(len(HELDOUT_COMBOS))]
    attrs["color"], attrs["shape"], attrs["direction"] = combo
  elif split == "train":
    # Rejection keeps the other combos uniform; ~10% rejected, so this is short.
    while is_heldout(attrs):
      attrs["color"] = COLORS[rng.integers(len(COLORS))]
      attrs["shape"] = SHAPES[rng.integers(len(SHAPES))]
      attrs["direction"] = DIRECTIONS[rng.integers(len(DIRECTIONS))]
  return attrs


def _trajectory(attrs, frames, height, width, extent, rng, exit_fraction=0.0, extend=(0, 0), exit_depth=0.0,
                enter_fraction=0.0):
  """Per-frame shape centres (rows, cols) in pixel units, float [extend[0] + T + extend[1]] each, and
  whether the shape leaves the frame (`EXIT_TAG`), enters it (`ENTER_TAG`) or neither ("").

  With probability `exit_fraction` the travel ends past the far edge: the clip shows the shape leaving the
  frame. With `exit_depth` 0 the last centre lies between on the edge (half the shape out) and just fully
  outside; with `exit_depth` d > 0 it lies up to d x the travel past the edge (but the whole shape is in
  the first frame), so the shape may cross the edge early and leave the rest of the clip empty. With
  probability `enter_fraction` (another share of the clips) the travel is the same in reverse time: it
  starts past the start edge and the shape enters the frame. No draw is made when both are 0, so those
  clips are exactly the in-frame ones. `extend` = (before, after) adds frames on either side at the clip's
  own speed and zigzag phase: the clip's past and future had it kept moving.
  """
  horizontal = attrs["direction"] in ("left", "right")
  sign = 1.0 if attrs["direction"] in ("right", "down") else -1.0
  along_len, perp_len = (width, height) if horizontal else (height, width)
  half = extent / 2
  margin = 1.0
  amp = ZIGZAG_AMPLITUDE * min(height, width) if attrs["motion"] == "zigzag" else 0.0

  room = max(along_len - extent - 2 * margin, 0.0)
  disp = min(rng.uniform(*DISPLACEMENT_RANGE) * along_len, room)
  lo = half + margin
  start = lo + rng.uniform(0.0, room - disp)  # distance from the start edge
  if sign < 0:
    start = along_len - start
  perp_room = max(perp_len - extent - 2 * margin - 2 * amp, 0.0)
  perp = half + margin + amp + rng.uniform(0.0, perp_room)
  crossing = ""
  u = rng.uniform() if exit_fraction > 0 or enter_fraction > 0 else 1.0
  if u < exit_fraction + enter_fraction:
    depth = half + margin if exit_depth <= 0 else max(min(exit_depth * disp, disp - half - margin), half + margin)
    entering = u >= exit_fraction
    if not (entering and frames == 1):  # an image shows its start position, which an entering shape has outside
      # The start's distance from the start edge: an exit's travel ends past the far edge; an entry starts on
      # the start edge (half the shape out) to just fully outside.
      begin = -rng.uniform(0.0, depth) if entering else rng.uniform(along_len, along_len + depth) - disp
      start = begin if sign > 0 else along_len - begin
      crossing = "" if frames == 1 else ENTER_TAG if entering else EXIT_TAG  # no crossing to see in an image

  before, after = extend
  index = np.arange(-before, frames + after)
  if frames == 1:  # an image: no motion, so its past and future are the same frame
    index = np.zeros_like(index)
  progress = index / max(frames - 1, 1)
  along = start + sign * disp * progress
  # Two cycles of a cosine centred on the middle frame: symmetric, so a
  # least-squares fit of the perpendicular coordinate has exactly zero slope.
  period = max(4.0, (frames - 1) / 2)
  offset = amp * np.cos(2 * np.pi * (index - (frames - 1) / 2) / period)
  perp = perp + offset
  return ((perp, along) if horizontal else (along, perp)), crossing


def render(attrs: Mapping[str, str], frames: int, height: int, width: int,
           seed: int = 0, exit_fraction: float = 0.0, extend: tuple[int, int] = (0, 0),
           exit_depth: float = 0.0, with_tag: bool = False, enter_fraction: float = 0.0):
  """Renders the clip described by `attrs` as uint8 [frames, height, width, 3].

  Any size works; one frame is an image (the shape at its start position).
  The start position and speed come from `seed`; the shape travels 35-50% of
  the frame along its direction and stays inside the frame, except in the
  `exit_fraction` of clips where it leaves across the far edge (by the end of the clip, or with
  `exit_depth` > 0 anywhere in it, see `_trajectory`) and the `enter_fraction` where it enters across the
  start edge. `with_tag`: also return `EXIT_TAG`, `ENTER_TAG` or "" (neither).
  `extend` = (before, after) also renders that many frames of the clip's past and future, the motion carried
  on at the same speed (the shape may leave the frame there): [before + frames + after, H, W, 3], with
  the clip itself at [before:before + frames]. Evaluation uses it as the true continuation of a clip.
  """
  if frames < 1 or height < 4 or width < 4:
    raise ValueError(f"bad size {(frames, height, width)}")
  if len(extend) != 2 or min(extend) < 0:
    raise ValueError(f"extend must be (frames before, frames after) >= 0, got {extend!r}")
  rng = _rng(seed, 2)
  extent = SIZE_FRACTION[attrs["size"]] * min(height, width)
  (rows, cols), tag = _trajectory(attrs, frames, height, width, extent, rng, exit_fraction, tuple(extend),
                                  exit_depth, enter_fraction)
  rows, cols = rows.astype(np.float32), cols.astype(np.float32)

  # Offsets of pixel centres from the shape centre, [T, H, 1] and [T, 1, W].
  dy = (np.arange(height, dtype=np.float32) + 0.5)[None, :, None] - rows[:, None, None]
  dx = (np.arange(width, dtype=np.float32) + 0.5)[None, None, :] - cols[:, None, None]
  half = np.float32(extent / 2)
  shape = attrs["shape"]
  if shape == "circle":
    mask = dy * dy + dx * dx <= half * half
  elif shape == "square":
    mask = (np.abs(dy) <= half) & (np.abs(dx) <= half)
  elif shape == "triangle":
    # Apex up, base down; half-width grows linearly from 0 to `half`.
    mask = (np.abs(dy) <= half) & (np.abs(dx) <= (dy + half) / 2)
  else:
    raise ValueError(f"unknown shape {shape!r}")

  fg, bg = PALETTE[attrs["color"]], PALETTE[attrs["background"]]
  # Per-channel selects are ~2x faster than one broadcast over [..., 3].
  video = np.empty(mask.shape + (3,), np.uint8)
  for c in range(3):
    video[..., c] = np.where(mask, np.uint8(fg[c]), np.uint8(bg[c]))
  return (video, tag) if with_tag else video


def _clip_seed(seed: int, index: int, split: str) -> int:
  return int(np.random.SeedSequence([seed & 0xFFFFFFFF, index, _SPLITS[split], 3])
             .generate_state(1)[0])


class SyntheticVideos:
  """Random-access source of captioned synthetic clips (grain protocol).

  Each index picks one of `sizes` ((frames, height, width) tuples) with
  probability proportional to `size_weights`, its attributes from `split`, and
  its start position and speed; all deterministically from (seed, index).
  `exit_fraction`: the share of clips whose shape leaves the frame, `exit_depth` how far past the edge,
  `enter_fraction` the share whose shape enters it (see `render`). Examples are {video, caption, labels,
  index, tags}; `tags` is "exits" for a clip whose shape leaves the frame, "enters" for one whose shape
  enters it, else "" (`cond.tag_strategies` can give such clips their own frame conditioning).
  """

  def __init__(self, num_samples: int, sizes: Sequence[tuple[int, int, int]],
               size_weights: Sequence[float] | None = None, split: str = "train",
               seed: int = 0, exit_fraction: float = 0.0, exit_depth: float = 0.0, enter_fraction: float = 0.0):
    if split not in _SPLITS:
      raise ValueError(f"split must be one of {tuple(_SPLITS)}, got {split!r}")
    if not sizes:
      raise ValueError("sizes must be non-empty")
    self.num_samples = int(num_samples)
    self.sizes = [tuple(int(x) for x in s) for s in sizes]
    weights = np.ones(len(self.sizes)) if size_weights is None else np.asarray(
        size_weights, np.float64)
    if weights.shape != (len(self.sizes),) or (weights < 0).any() or weights.sum() <= 0:
      raise ValueError(f"bad size_weights {size_weights!r} for {len(self.sizes)} sizes")
    self._cdf = np.cumsum(weights / weights.sum())
    self.split = split
    self.seed = int(seed)
    if not 0.0 <= exit_fraction <= 1.0:
      raise ValueError(f"exit_fraction must be in [0, 1], got {exit_fraction!r}")
    self.exit_fraction = float(exit_fraction)
    if not 0.0 <= enter_fraction <= 1.0 - self.exit_fraction:
      raise ValueError(f"enter_fraction must be in [0, 1 - exit_fraction] = [0, {1.0 - self.exit_fraction}], "
                       f"got {enter_fraction!r}")
    self.enter_fraction = float(enter_fraction)
    if not 0.0 <= exit_depth <= 1.0:
      raise ValueError(f"exit_depth must be in [0, 1], got {exit_depth!r}")
    self.exit_depth = float(exit_depth)

  def __len__(self) -> int:
    return self.num_samples

  def size_of(self, index: int) -> tuple[int, int, int]:
    """The (frames, height, width) used for `index`."""
    u = _rng(self.seed, index, _SPLITS[self.split], 4).random()
    return self.sizes[min(int(np.searchsorted(self._cdf, u, side="right")),
                          len(self.sizes) - 1)]

  def _render(self, index: int, extend: tuple[int, int] = (0, 0)) -> tuple[dict[str, str], np.ndarray, bool]:
    if not 0 <= index < self.num_samples:
      raise IndexError(f"index {index} out of range [0, {self.num_samples})")
    attrs = sample_attributes(index, self.split, self.seed)
    frames, height, width = self.size_of(index)
    video, tag = render(attrs, frames, height, width, _clip_seed(self.seed, index, self.split),
                        self.exit_fraction, extend, self.exit_depth, with_tag=True,
                        enter_fraction=self.enter_fraction)
    return attrs, video, tag

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    attrs, video, tag = self._render(index)
    return dict(video=video, caption=caption(attrs), labels=labels_of(attrs), index=index,
                tags=tag)

  def extended(self, index: int, before: int, after: int) -> np.ndarray:
    """Clip `index` with `before` frames of its past and `after` of its future (see `render`'s `extend`)."""
    return self._render(int(index), (before, after))[1]

  def __repr__(self) -> str:
    return (f"SyntheticVideos(num_samples={self.num_samples}, sizes={self.sizes}, "
            f"split={self.split!r}, seed={self.seed})")


def as_map_dataset(num_samples: int, sizes: Sequence[tuple[int, int, int]],
                   size_weights: Sequence[float] | None = None, split: str = "train",
                   seed: int = 0):
  """`grain.MapDataset` over `SyntheticVideos`."""
  import grain  # Lazy: keeps this module importable without grain.
  return grain.MapDataset.source(
      SyntheticVideos(num_samples, sizes, size_weights, split, seed))


def heldout_prompts(n: int, size: tuple[int, int, int] = (9, 32, 32),
                    seed: int = 0) -> list[dict]:
  """`n` prompt records with held-out combos, cycling through all of them.

  Each record has caption, labels, attrs, seed (for `render`), frames, height
  and width: what the sampler needs to generate and the scorer to judge.
  """
  frames, height, width = size
  records = []
  for i in range(n):
    attrs = sample_attributes(i, "heldout", seed)
    # Cycle the combos so a small n still covers every held-out combination.
    attrs["color"], attrs["shape"], attrs["direction"] = HELDOUT_COMBOS[
        i % len(HELDOUT_COMBOS)]
    records.append(dict(caption=caption(attrs), labels=labels_of(attrs), attrs=attrs,
                        seed=_clip_seed(seed, i, "heldout"), frames=frames,
                        height=height, width=width))
  return records
