"""Tests for the procedural captioned video dataset."""

import hashlib
import itertools
import subprocess
import sys
import time

import numpy as np
import pytest

from sora_jax.data import synthetic

ALL_COMBOS = [dict(zip(synthetic.ATTRIBUTE_NAMES, c))
              for c in itertools.product(*synthetic.ATTRIBUTES.values())]


def _centroids(video, bg):
  """Per-frame (row, col) centroid of non-background pixels."""
  mask = (video != np.array(synthetic.PALETTE[bg], np.uint8)).any(-1)
  out = []
  for frame in mask:
    r, c = np.nonzero(frame)
    out.append((r.mean() + 0.5, c.mean() + 0.5))
  return np.array(out)


def test_attribute_tables():
  assert synthetic.ATTRIBUTE_NAMES == (
      "shape", "color", "size", "direction", "motion", "background")
  assert len(synthetic.COLORS) == 6 and len(synthetic.BACKGROUNDS) == 3
  for name in synthetic.COLORS + synthetic.BACKGROUNDS:
    assert len(synthetic.PALETTE[name]) == 3
  # Every foreground colour is far from every background and from each other.
  fg = np.array([synthetic.PALETTE[c] for c in synthetic.COLORS], float)
  bg = np.array([synthetic.PALETTE[c] for c in synthetic.BACKGROUNDS], float)
  assert np.linalg.norm(fg[:, None] - bg[None], axis=-1).min() > 100
  pair = np.linalg.norm(fg[:, None] - fg[None], axis=-1)
  assert pair[~np.eye(len(fg), dtype=bool)].min() > 100


def test_captions_short_ascii_and_unique():
  captions = [synthetic.caption(a) for a in ALL_COMBOS]
  assert len(set(captions)) == len(captions)
  for text in captions:
    assert text == text.lower() and text.isascii()
    assert len(text.encode()) < 64, text
  attrs = dict(shape="circle", color="red", size="large", direction="left",
               motion="zigzag", background="gray")
  assert synthetic.caption(attrs) == (
      "a large red circle zigzagging left on a gray background")


def test_labels_round_trip():
  for attrs in ALL_COMBOS[::37]:
    labels = synthetic.labels_of(attrs)
    assert labels.dtype == np.int32 and labels.shape == (6,)
    assert synthetic.attrs_of(labels) == attrs


@pytest.mark.parametrize("size", [(1, 32, 32), (9, 32, 32), (9, 32, 48), (5, 48, 32),
                                  (17, 64, 64), (2, 17, 23)])
def test_render_shape_inside_and_moves(size):
  frames, height, width = size
  for k, attrs in enumerate(ALL_COMBOS[::11]):
    video = synthetic.render(attrs, frames, height, width, seed=k)
    assert video.dtype == np.uint8 and video.shape == (frames, height, width, 3)
    bg = np.array(synthetic.PALETTE[attrs["background"]], np.uint8)
    fg = np.array(synthetic.PALETTE[attrs["color"]], np.uint8)
    is_bg, is_fg = (video == bg).all(-1), (video == fg).all(-1)
    assert (is_bg | is_fg).all()  # Only two colours, no stray pixels.
    assert is_fg.any((1, 2)).all()  # The shape is visible in every frame.
    # Fully inside the frame: the one-pixel border is background.
    assert is_bg[:, [0, -1], :].all() and is_bg[:, :, [0, -1]].all()
    if frames == 1:
      continue
    c = _centroids(video, attrs["background"])
    d = {"left": (1, -1), "right": (1, 1), "up": (0, -1), "down": (0, 1)}
    axis, sign = d[attrs["direction"]]
    travel = sign * (c[-1, axis] - c[0, axis]) / (width if axis else height)
    assert 0.3 < travel < 0.55, (attrs, travel)
    # The perpendicular coordinate has no net drift (zigzag ends where it began).
    assert abs(c[-1, 1 - axis] - c[0, 1 - axis]) < 1.0


@pytest.mark.parametrize("size", [(9, 32, 32), (9, 32, 48), (17, 64, 64)])
def test_render_exit_leaves_the_frame_in_its_direction(size):
  frames, height, width = size
  d = {"left": (1, -1), "right": (1, 1), "up": (0, -1), "down": (0, 1)}
  for k, attrs in enumerate(ALL_COMBOS[::11]):
    video = synthetic.render(attrs, frames, height, width, seed=k, exit_fraction=1.0)
    fg = (video == np.array(synthetic.PALETTE[attrs["color"]], np.uint8)).all(-1)
    area = fg.sum((1, 2))
    assert area[0] > 0 and area[-1] < 0.7 * area[0], attrs  # visible at first, then at least half gone
    axis, sign = d[attrs["direction"]]
    seen = area > 0
    c = _centroids(video[seen], attrs["background"])
    assert sign * (c[-1, axis] - c[0, axis]) > 0, attrs  # the visible part still moves the captioned way
    # On its last visible frame the shape touches the far edge.
    profile = fg[seen][-1].any(1 - axis)  # occupied rows (vertical travel) or columns (horizontal)
    assert profile[-1 if sign > 0 else 0], attrs


def test_exit_depth_lets_the_shape_leave_anywhere_and_tags_the_clip():
  src = synthetic.SyntheticVideos(240, [(9, 32, 32), (9, 32, 48), (1, 32, 32)], exit_fraction=0.5, exit_depth=1.0)
  crossed = []
  for i in range(len(src)):
    item = src[i]
    attrs = synthetic.sample_attributes(i, "train", 0)
    area = (item["video"] == np.array(synthetic.PALETTE[attrs["color"]], np.uint8)).all(-1).sum((1, 2))
    if item["video"].shape[0] == 1:
      assert item["tags"] == ""  # an image shows no motion, so it never leaves
      continue
    if item["tags"] != synthetic.EXIT_TAG:
      assert item["tags"] == "" and area[-1] > 0.7 * area[0]
      continue
    assert area[0] >= 0.7 * area.max() > 0  # the whole shape is in the first frame (up to rasterisation)
    gone = np.flatnonzero(area == 0)
    crossed.append(gone[0] if len(gone) else 9)
  assert len(crossed) > 50
  # The shape may be gone after only a few frames, or still be leaving in the last one.
  assert min(crossed) <= 6 and max(crossed) == 9
  # exit_depth 0 is the original exit: gone at most in the last frame.
  src0 = synthetic.SyntheticVideos(40, [(9, 32, 32)], exit_fraction=1.0)
  for i in range(40):
    attrs = synthetic.sample_attributes(i, "train", 0)
    area = (src0[i]["video"] == np.array(synthetic.PALETTE[attrs["color"]], np.uint8)).all(-1).sum((1, 2))
    assert src0[i]["tags"] == synthetic.EXIT_TAG and (area[:-1] > 0).all()
  with pytest.raises(ValueError, match="exit_depth must be in"):
    synthetic.SyntheticVideos(4, [(9, 32, 32)], exit_depth=2.0)


def test_exit_fraction_zero_keeps_clips_and_mixes_by_share():
  attrs = ALL_COMBOS[100]
  for seed in range(5):
    np.testing.assert_array_equal(synthetic.render(attrs, 9, 32, 32, seed=seed),
                                  synthetic.render(attrs, 9, 32, 32, seed=seed, exit_fraction=0.0))
  src = synthetic.SyntheticVideos(200, [(9, 32, 32)], exit_fraction=0.5)
  border = [(item["video"][-1, [0, -1]] != item["video"][-1, 1, 1]).any() or
            (item["video"][-1, :, [0, -1]] != item["video"][-1, 1, 1]).any() for item in map(src.__getitem__, range(200))]
  assert 0.3 < np.mean(border) < 0.7
  with pytest.raises(ValueError, match="exit_fraction must be in"):
    synthetic.SyntheticVideos(4, [(9, 32, 32)], exit_fraction=1.5)


def test_render_sizes_differ():
  base = dict(shape="square", color="red", direction="right", motion="straight",
              background="black")
  area = {s: (synthetic.render(dict(base, size=s), 1, 64, 64, 0) != 0).any(-1).sum()
          for s in synthetic.SIZES}
  assert 2 * area["small"] < area["large"]


def test_render_deterministic_by_seed():
  attrs = ALL_COMBOS[100]
  a = synthetic.render(attrs, 9, 32, 32, seed=3)
  np.testing.assert_array_equal(a, synthetic.render(attrs, 9, 32, 32, seed=3))
  assert not np.array_equal(a, synthetic.render(attrs, 9, 32, 32, seed=4))


def test_render_fast():
  attrs = ALL_COMBOS[5]
  synthetic.render(attrs, 9, 32, 32, 0)
  start = time.perf_counter()
  for i in range(200):
    synthetic.render(attrs, 9, 32, 32, i)
  per_clip = (time.perf_counter() - start) / 200
  assert per_clip < 2e-3, per_clip  # ~0.1 ms measured; loose for busy CI hosts.


def test_heldout_combos_keep_all_values_and_pairs():
  combos = synthetic.HELDOUT_COMBOS
  total = len(synthetic.COLORS) * len(synthetic.SHAPES) * len(synthetic.DIRECTIONS)
  assert 0.08 * total <= len(combos) <= 0.12 * total
  train = [c for c in itertools.product(synthetic.COLORS, synthetic.SHAPES,
                                        synthetic.DIRECTIONS) if c not in combos]
  # Every pair of values of (color, shape, direction) still co-occurs in train.
  for i, j in [(0, 1), (0, 2), (1, 2)]:
    seen = {(c[i], c[j]) for c in train}
    universe = [synthetic.COLORS, synthetic.SHAPES, synthetic.DIRECTIONS]
    assert seen == set(itertools.product(universe[i], universe[j]))
  for c in combos:
    assert synthetic.is_heldout(dict(color=c[0], shape=c[1], direction=c[2]))


def test_sample_attributes_splits():
  seen = {k: set() for k in synthetic.ATTRIBUTE_NAMES}
  for i in range(3000):
    attrs = synthetic.sample_attributes(i, "train", seed=0)
    assert not synthetic.is_heldout(attrs)
    for k, v in attrs.items():
      seen[k].add(v)
  assert seen == {k: set(v) for k, v in synthetic.ATTRIBUTES.items()}
  heldout = [synthetic.sample_attributes(i, "heldout", seed=0) for i in range(300)]
  assert all(synthetic.is_heldout(a) for a in heldout)
  assert {(a["color"], a["shape"], a["direction"]) for a in heldout} == set(
      synthetic.HELDOUT_COMBOS)
  assert synthetic.sample_attributes(7, "train", 1) == synthetic.sample_attributes(7, "train", 1)
  with pytest.raises(ValueError):
    synthetic.sample_attributes(0, "val")


def test_dataset_item_contract():
  ds = synthetic.SyntheticVideos(50, sizes=[(9, 32, 32), (1, 32, 48)])
  assert len(ds) == 50
  for i in range(50):
    item = ds[i]
    assert set(item) == {"video", "caption", "labels", "index", "tags"}
    assert item["tags"] == ""  # no shape leaves the frame at exit_fraction 0
    assert item["index"] == i
    assert item["video"].dtype == np.uint8
    assert item["video"].shape in [(9, 32, 32, 3), (1, 32, 48, 3)]
    assert item["labels"].dtype == np.int32 and item["labels"].shape == (6,)
    assert item["caption"] == synthetic.caption(synthetic.attrs_of(item["labels"]))
  with pytest.raises(IndexError):
    ds[50]


def test_dataset_deterministic_and_distinct():
  ds = synthetic.SyntheticVideos(100, sizes=[(9, 32, 32)], seed=1)
  again = synthetic.SyntheticVideos(100, sizes=[(9, 32, 32)], seed=1)
  np.testing.assert_array_equal(ds[3]["video"], again[3]["video"])
  assert ds[3]["caption"] == again[3]["caption"]
  videos = [ds[i]["video"].tobytes() for i in range(100)]
  assert len(set(videos)) == 100
  other_seed = synthetic.SyntheticVideos(100, sizes=[(9, 32, 32)], seed=2)
  assert other_seed[3]["video"].tobytes() != videos[3]


def test_dataset_deterministic_across_processes():
  code = ("import hashlib; from sora_jax.data import synthetic as s; "
          "d = s.SyntheticVideos(10, [(9, 32, 32), (5, 16, 24)], seed=4); "
          "print(hashlib.sha256(b''.join(d[i]['video'].tobytes() + "
          "d[i]['caption'].encode() for i in range(10))).hexdigest())")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True).stdout.strip()
  d = synthetic.SyntheticVideos(10, [(9, 32, 32), (5, 16, 24)], seed=4)
  want = hashlib.sha256(b"".join(d[i]["video"].tobytes() + d[i]["caption"].encode()
                                 for i in range(10))).hexdigest()
  assert out == want


def test_dataset_size_weights():
  sizes = [(9, 32, 32), (5, 32, 48), (1, 64, 64)]
  ds = synthetic.SyntheticVideos(2000, sizes, size_weights=[3, 1, 0])
  picked = [ds.size_of(i) for i in range(2000)]
  assert sizes[2] not in picked
  frac = picked.count(sizes[0]) / len(picked)
  assert 0.7 < frac < 0.8
  with pytest.raises(ValueError):
    synthetic.SyntheticVideos(10, sizes, size_weights=[1, 1])


def test_heldout_split_dataset():
  ds = synthetic.SyntheticVideos(200, [(5, 32, 32)], split="heldout")
  for i in range(200):
    assert synthetic.is_heldout(synthetic.attrs_of(ds[i]["labels"]))


def test_as_map_dataset():
  ds = synthetic.as_map_dataset(20, [(9, 32, 32)], seed=5)
  src = synthetic.SyntheticVideos(20, [(9, 32, 32)], seed=5)
  assert len(ds) == 20
  np.testing.assert_array_equal(ds[7]["video"], src[7]["video"])
  first = next(iter(ds.map(lambda x: x["labels"]).to_iter_dataset()))
  np.testing.assert_array_equal(first, src[0]["labels"])


def test_heldout_prompts():
  records = synthetic.heldout_prompts(10, size=(9, 32, 48), seed=0)
  assert len(records) == 10
  combos = set()
  for r in records:
    assert synthetic.is_heldout(r["attrs"])
    assert r["caption"] == synthetic.caption(r["attrs"])
    np.testing.assert_array_equal(r["labels"], synthetic.labels_of(r["attrs"]))
    assert (r["frames"], r["height"], r["width"]) == (9, 32, 48)
    combos.add((r["attrs"]["color"], r["attrs"]["shape"], r["attrs"]["direction"]))
    video = synthetic.render(r["attrs"], r["frames"], r["height"], r["width"], r["seed"])
    assert video.shape == (9, 32, 48, 3)
  assert combos == set(synthetic.HELDOUT_COMBOS)
  assert synthetic.heldout_prompts(3, seed=1)[2]["caption"] == synthetic.heldout_prompts(
      3, seed=1)[2]["caption"]


@pytest.mark.parametrize("exit_fraction", [0.0, 1.0])
def test_extended_clip_contains_the_clip_and_keeps_its_motion(exit_fraction):
  src = synthetic.SyntheticVideos(40, [(9, 32, 32), (9, 32, 48), (1, 32, 32)], exit_fraction=exit_fraction)
  d = {"left": (1, -1), "right": (1, 1), "up": (0, -1), "down": (0, 1)}
  for i in range(40):
    item = src[i]
    video = src.extended(i, 2, 3)
    t = len(item["video"])
    assert video.shape == (t + 5,) + item["video"].shape[1:]
    np.testing.assert_array_equal(video[2:2 + t], item["video"])  # the clip itself, bit for bit
    if t == 1:
      np.testing.assert_array_equal(video, np.repeat(item["video"], 6, 0))  # an image has no motion
      continue
    attrs = synthetic.attrs_of(item["labels"])
    # Past and future carry the caption's direction: the visible centroid keeps moving that way.
    axis, sign = d[attrs["direction"]]
    seen = (video != np.array(synthetic.PALETTE[attrs["background"]], np.uint8)).any(-1).sum((1, 2)) > 0
    c = _centroids(video[seen], attrs["background"])
    assert sign * (c[-1, axis] - c[0, axis]) > 0, (i, item["caption"])
    assert np.all(sign * np.diff(c[:, axis]) >= -0.5), (i, item["caption"])  # no turning back (edges clip)
    if exit_fraction == 0:  # a shape inside the frame is still partly visible one frame before and after
      assert seen[1] and seen[2 + t], (i, item["caption"])


def test_render_extend_rejects_bad_values():
  with pytest.raises(ValueError, match="extend must be"):
    synthetic.render(ALL_COMBOS[0], 9, 32, 32, extend=(-1, 2))


def test_config_exits_reach_training_clips_only():
  from configs import tiny_t2v  # noqa: PLC0415
  from sora_jax.data import sources  # noqa: PLC0415
  config = tiny_t2v.get_config("runlocal")
  config.data.update(exit_fraction=0.5, exit_depth=1.0)
  train = sources.synthetic_dataset(config, split="train", seed=0, num_samples=60)
  heldout = sources.synthetic_dataset(config, split="heldout", seed=0, num_samples=60)
  assert 10 < sum(train[i]["tags"] == synthetic.EXIT_TAG for i in range(60)) < 40
  assert all(heldout[i]["tags"] == "" for i in range(60))


@pytest.mark.parametrize("size", [(9, 32, 32), (9, 32, 48)])
def test_render_enter_is_the_time_mirror_of_an_exit(size):
  # An entering shape is partly outside the start edge in the first frame, moves the captioned way, and is
  # whole (up to rasterisation) by the last; the clip tags say which clips cross.
  frames, height, width = size
  d = {"left": (1, -1), "right": (1, 1), "up": (0, -1), "down": (0, 1)}
  for k, attrs in enumerate(ALL_COMBOS[::11]):
    video, tag = synthetic.render(attrs, frames, height, width, seed=k, enter_fraction=1.0, with_tag=True)
    assert tag == synthetic.ENTER_TAG
    fg = (video == np.array(synthetic.PALETTE[attrs["color"]], np.uint8)).all(-1)
    area = fg.sum((1, 2))
    assert area[-1] > 0 and area[0] < 0.7 * area[-1], attrs  # at least half outside at first, then in
    axis, sign = d[attrs["direction"]]
    seen = area > 0
    c = _centroids(video[seen], attrs["background"])
    assert sign * (c[-1, axis] - c[0, axis]) > 0, attrs
    profile = fg[seen][0].any(1 - axis)  # on its first visible frame the shape touches the start edge
    assert profile[0 if sign > 0 else -1], attrs
  src = synthetic.SyntheticVideos(200, [(9, 32, 32), (1, 32, 32)], exit_fraction=0.25, enter_fraction=0.25)
  tags = [src[i]["tags"] for i in range(len(src))]
  assert 20 < tags.count(synthetic.EXIT_TAG) < 60 and 20 < tags.count(synthetic.ENTER_TAG) < 60
  assert all(t == "" for i, t in enumerate(tags) if src[i]["video"].shape[0] == 1)  # images never cross
  np.testing.assert_array_equal(synthetic.render(ALL_COMBOS[0], 1, 32, 32, seed=3, enter_fraction=1.0),
                                synthetic.render(ALL_COMBOS[0], 1, 32, 32, seed=3))  # nor are they cut
  # Adding entries keeps the exit clips exactly (one draw decides both).
  exits_only = synthetic.SyntheticVideos(200, [(9, 32, 32), (1, 32, 32)], exit_fraction=0.25)
  for i, t in enumerate(tags):
    if t == synthetic.EXIT_TAG or exits_only[i]["tags"] == synthetic.EXIT_TAG:
      np.testing.assert_array_equal(src[i]["video"], exits_only[i]["video"])
  with pytest.raises(ValueError, match=r"enter_fraction must be in \[0, 1 - exit_fraction\]"):
    synthetic.SyntheticVideos(4, [(9, 32, 32)], exit_fraction=0.5, enter_fraction=0.6)
