"""Tests for the pixel-level prompt-adherence scorer."""

import itertools

import numpy as np
import pytest

from sora_jax.data import synthetic
from sora_jax.eval import scorer

SIZES = [(9, 32, 32), (9, 32, 48), (17, 64, 64)]


def _grid(frames, height, width):
  """Every colour x direction x background x motion; shape and size cycle."""
  videos, labels = [], []
  for k, (color, direction, background, motion) in enumerate(itertools.product(
      synthetic.COLORS, synthetic.DIRECTIONS, synthetic.BACKGROUNDS, synthetic.MOTIONS)):
    attrs = dict(shape=synthetic.SHAPES[k % 3], color=color,
                 size=synthetic.SIZES[(k // 3) % 2], direction=direction,
                 motion=motion, background=background)
    videos.append(synthetic.render(attrs, frames, height, width, seed=k))
    labels.append(synthetic.labels_of(attrs))
  return videos, np.stack(labels)


def _degrade(video, rng, sigma=0.1):
  """uint8 -> float [-1, 1] with a [1, 2, 1] / 4 spatial blur and Gaussian noise."""
  x = video.astype(np.float32) / 127.5 - 1.0
  for axis in (1, 2):
    p = np.pad(x, [(1, 1) if a == axis else (0, 0) for a in range(4)], mode="edge")
    n = x.shape[axis]
    x = sum(w * np.take(p, np.arange(o, o + n), axis=axis)
            for o, w in enumerate((0.25, 0.5, 0.25)))
  return (x + sigma * rng.standard_normal(x.shape)).astype(np.float32)


@pytest.mark.parametrize("size", SIZES)
def test_ground_truth_clips_scored_perfectly(size):
  videos, labels = _grid(*size)
  acc = scorer.prompt_adherence(videos, labels)
  for attr in scorer.SCORED:
    assert acc[attr] == 1.0, (attr, acc)
  assert acc["all"] == 1.0 and acc["mean"] == 1.0


@pytest.mark.parametrize("size", SIZES)
def test_robust_to_noise_and_blur(size):
  rng = np.random.default_rng(0)
  videos, labels = _grid(*size)
  noisy = [_degrade(v, rng) for v in videos]
  acc = scorer.prompt_adherence(noisy, labels)
  for attr in ("color", "direction", "size", "motion", "background"):
    assert acc[attr] == 1.0, (attr, acc)
  assert acc["shape"] >= 0.99, acc  # Measured 0.999-1.0: a 7-pixel square can look round.


def test_every_shape_and_size():
  videos, labels = [], []
  for k, (shape, size) in enumerate(itertools.product(synthetic.SHAPES, synthetic.SIZES)):
    for j, color in enumerate(synthetic.COLORS):
      attrs = dict(shape=shape, color=color, size=size,
                   direction=synthetic.DIRECTIONS[j % 4], motion="straight",
                   background=synthetic.BACKGROUNDS[j % 3])
      videos.append(synthetic.render(attrs, 9, 32, 32, seed=10 * k + j))
      labels.append(synthetic.labels_of(attrs))
  acc = scorer.prompt_adherence(videos, np.stack(labels), attributes=("shape", "size"))
  assert acc == dict(shape=1.0, size=1.0, mean=1.0, all=1.0)


def test_float_input_matches_uint8():
  attrs = synthetic.sample_attributes(3)
  video = synthetic.render(attrs, 9, 32, 48, seed=1)
  as_float = video.astype(np.float32) / 127.5 - 1.0
  assert scorer.score_video(video) == scorer.score_video(as_float)
  assert scorer.score_video(video) == {k: attrs[k] for k in scorer.SCORED}


def test_deterministic():
  rng = np.random.default_rng(1)
  video = _degrade(synthetic.render(synthetic.sample_attributes(9), 9, 32, 32, 2), rng)
  assert scorer.score_video(video) == scorer.score_video(video.copy())


def test_image_has_no_direction():
  attrs = dict(shape="circle", color="cyan", size="large", direction="up",
               motion="zigzag", background="navy")
  image = synthetic.render(attrs, 1, 32, 32, seed=0)
  scored = scorer.score_video(image)
  assert scored["direction"] is None and scored["motion"] is None
  assert scored["color"] == "cyan" and scored["background"] == "navy"
  assert scorer.score_video(image[0]) == scored  # [H, W, 3] is a 1-frame video.
  # Direction and motion of images are not counted, not counted as wrong.
  acc = scorer.prompt_adherence([image], synthetic.labels_of(attrs)[None])
  assert "direction" not in acc and "motion" not in acc
  assert acc["color"] == 1.0 and acc["all"] == 1.0


def test_static_and_blank_clips_score_none():
  attrs = dict(shape="square", color="red", size="large", direction="left",
               motion="straight", background="gray")
  frame = synthetic.render(attrs, 1, 32, 32, seed=0)
  static = np.repeat(frame, 9, axis=0)
  assert scorer.score_video(static)["direction"] is None
  blank = np.full((9, 32, 32, 3), 90, np.uint8)
  scored = scorer.score_video(blank)
  assert scored["color"] is None and scored["background"] == "gray"
  labels = np.stack([synthetic.labels_of(attrs)] * 2)
  acc = scorer.prompt_adherence(np.stack([static, blank]), labels)
  # Missing predictions count as wrong.
  assert acc["direction"] == 0.0 and acc["color"] == 0.5 and acc["background"] == 1.0


def test_unknown_labels_are_skipped():
  videos, labels = _grid(9, 32, 32)
  labels = labels[:8].copy()
  labels[:, synthetic.ATTRIBUTE_NAMES.index("shape")] = -1
  acc = scorer.prompt_adherence(videos[:8], labels)
  assert "shape" not in acc and acc["color"] == 1.0


def test_wrong_labels_lower_accuracy():
  videos, labels = _grid(9, 32, 32)
  wrong = labels.copy()
  j = synthetic.ATTRIBUTE_NAMES.index("color")
  wrong[::2, j] = (wrong[::2, j] + 1) % len(synthetic.COLORS)
  acc = scorer.prompt_adherence(videos, wrong)
  assert acc["color"] == 0.5 and acc["direction"] == 1.0


def test_attribute_confusion():
  videos, labels = _grid(9, 32, 32)
  conf = scorer.attribute_confusion(videos, labels, "direction")
  assert conf.shape == (4, 5)
  np.testing.assert_array_equal(conf[:, :4], np.diag(conf.sum(1)))
  assert conf.sum() == len(videos)


def test_predict_labels():
  videos, labels = _grid(9, 32, 32)
  preds = scorer.predict_labels(videos[:10])
  assert preds.dtype == np.int32 and preds.shape == (10, len(synthetic.ATTRIBUTE_NAMES))
  np.testing.assert_array_equal(preds, labels[:10])
  only = scorer.predict_labels(videos[:2], attributes=("color",))
  assert (only[:, synthetic.ATTRIBUTE_NAMES.index("color")] >= 0).all()
  assert (np.delete(only, synthetic.ATTRIBUTE_NAMES.index("color"), axis=1) == -1).all()


def test_velocity_is_the_centroid_speed_in_frame_fractions():
  # A 6 x 6 square moving 2 pixels right and 1 down per frame on a 32 x 48 frame; blur and noise keep it.
  video = np.zeros((8, 32, 48, 3), np.uint8)
  for t in range(8):
    video[t, 4 + t:10 + t, 3 + 2 * t:9 + 2 * t] = (255, 60, 0)
  np.testing.assert_allclose(scorer.velocity(video), [1 / 32, 2 / 48], rtol=1e-5)
  np.testing.assert_allclose(scorer.velocity(_degrade(video, np.random.default_rng(0))), [1 / 32, 2 / 48],
                             rtol=0.05)
  np.testing.assert_allclose(scorer.velocity(video[::-1]), [-1 / 32, -2 / 48], rtol=1e-5)
  assert scorer.velocity(np.zeros((8, 32, 48, 3), np.uint8)) is None  # no shape
  assert scorer.velocity(video[:1]) is None  # one frame


def _moving(step, frames=7, size=32):
  """A 6 x 6 square whose left edge moves `step` pixels right per frame."""
  video = np.zeros((frames, size, size, 3), np.uint8)
  for t in range(frames):
    col = 8 + round(step * t)
    video[t, 12:18, col:col + 6] = (255, 255, 0)
  return video


def test_speed_kept_reads_same_half_stopped_and_reversed_motion():
  # tools/bench_solvers.py's continuation_speed: how much of a true continuation's motion a generated one keeps.
  true = [_moving(2)] * 4 + [np.zeros((7, 32, 32, 3), np.uint8)]  # the last does not move: not counted
  generated = [_moving(2), _moving(1), _moving(0), _moving(2)[::-1], _moving(2)]
  got = scorer.speed_kept(generated, true)
  assert got["clips"] == 4
  assert got["true_speed"] == pytest.approx(2 / 32)
  assert got["median"] == pytest.approx((0.5 + 0.0) / 2)  # of 1, 0.5, 0, -1
  assert got["quartiles"] == pytest.approx([-0.25, 0.625])
  assert scorer.speed_kept([_moving(2)], [_moving(0)]) == {"clips": 0}


def test_endpoints_are_the_first_and_last_centroids_from_the_frame_centre():
  video = np.zeros((8, 32, 48, 3), np.uint8)
  for t in range(8):
    video[t, 4 + t:10 + t, 3 + 2 * t:9 + 2 * t] = (255, 60, 0)
  # Centroids (7, 6) in frame 0 and (14, 20) in frame 7, in pixels of a 32 x 48 frame.
  np.testing.assert_allclose(scorer.endpoints(video), [[7 / 32 - 0.5, 6 / 48 - 0.5], [14 / 32 - 0.5, 20 / 48 - 0.5]],
                             atol=1e-6)
  video[:2] = 0  # the shape appears late: its first centroid is where it is first seen
  np.testing.assert_allclose(scorer.endpoints(video)[0], [9 / 32 - 0.5, 10 / 48 - 0.5], atol=1e-6)
  assert scorer.endpoints(np.zeros((8, 32, 48, 3), np.uint8)) is None


def test_layout_tells_which_end_of_a_clip_is_off():
  # In-frame clips start behind the centre and end ahead of it along their direction; the same clips played
  # backwards, with their labels kept, read the other way; shapes leaving the frame start ahead of it.
  src = synthetic.SyntheticVideos(24, [(9, 32, 32)], split="heldout", seed=3)
  clips = [src[i] for i in range(24)]
  videos, labels = [c["video"] for c in clips], [c["labels"] for c in clips]
  got = scorer.layout(videos, labels)
  assert got["clips"] == 24 and got["start_behind"] == 1.0 and got["end_ahead"] == 1.0
  assert got["start"] < -0.1 < 0.1 < got["end"]
  back = scorer.layout([v[::-1] for v in videos], labels)
  assert back["start_behind"] == 0.0 and back["end_ahead"] == 0.0
  assert back["start"] == pytest.approx(got["end"]) and back["end"] == pytest.approx(got["start"])
  leaving = synthetic.SyntheticVideos(24, [(9, 32, 32)], split="heldout", seed=3, exit_fraction=1.0)
  assert scorer.layout([leaving[i]["video"] for i in range(24)], labels)["start_behind"] < 0.1
  # Images and unknown directions are not counted; no shape at all gives no figures.
  unknown = np.array(labels)
  unknown[:, synthetic.ATTRIBUTE_NAMES.index("direction")] = -1
  assert scorer.layout(videos, unknown) == {"clips": 0}
  assert scorer.layout([v[:1] for v in videos], labels) == {"clips": 0}
  assert scorer.layout([np.zeros_like(videos[0])], labels[:1]) == {"clips": 0}
