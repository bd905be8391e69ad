"""Deterministic prompt-adherence scorer for synthetic-dataset videos.

Judges a clip from its pixels alone, with no learned weights, so it scores
generated videos (blurry, noisy) against the attributes named in their prompts:

* background: median of the border pixels, nearest background palette colour.
* foreground: pixels far from the background, relative to the clip's brightest
  foreground (a fraction of a high quantile, so blur and noise shift it little).
* color: direction of (mean core foreground - background) in RGB, compared by
  cosine with each (palette colour - background); blur mixes a shape with the
  background along exactly that line, so mixing does not change the answer.
* direction: least-squares slope of the foreground centroid over frames.
* motion: spread of the centroid perpendicular to the direction.
* size: per-frame bounding box extent, median over frames.
* shape: vertical skew (triangle), then diagonal extent and box fill.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sora_jax.data import synthetic

# Attributes `score_video` predicts; `prompt_adherence` scores these by default.
SCORED = ("shape", "color", "size", "direction", "motion", "background")
# Attributes that need motion: undefined (None) for a 1-frame video.
TEMPORAL = ("direction", "motion")

_FG_QUANTILE = 0.995  # Near-peak foreground distance, even for a small shape.
_FG_THRESHOLD = 0.5  # Foreground = distance above half of that peak.
_CORE_THRESHOLD = 0.75  # Pixels used for the colour estimate.
_MIN_CONTRAST = 40.0  # Peak distance (0-255 RGB units) below which no shape is seen.
_MIN_TRAVEL = 0.08  # Net centroid travel (fraction of frame) to call a direction.
_ZIGZAG_RMS = 0.035  # Perpendicular RMS (fraction of min side) above which: zigzag.
_MAX_RAW_NOISE = 18.0  # Background noise std (0-255) above which shape uses smoothed pixels.
_SIZE_SPLIT = sum(synthetic.SIZE_FRACTION.values()) / 2
# Vertical skewness: triangle ~-0.57, circle and square 0.
_TRIANGLE_MIN_SKEW = 0.25
# Circle vs square midpoints: diagonal / axis extent (circle 1, square sqrt(2))
# and bounding-box fill (circle pi/4, square 1).
_SQUARE_DIAGONAL, _SQUARE_FILL = 1.2, 0.9

_FG_NAMES = synthetic.COLORS
_BG_NAMES = synthetic.BACKGROUNDS
_FG_RGB = np.array([synthetic.PALETTE[c] for c in _FG_NAMES], np.float32)
_BG_RGB = np.array([synthetic.PALETTE[c] for c in _BG_NAMES], np.float32)


def _to_pixels(video) -> np.ndarray:
  """float32 [T, H, W, 3] in 0-255 from uint8, or from float in [-1, 1]."""
  video = np.asarray(video)
  if video.ndim == 3:
    video = video[None]
  if video.ndim != 4 or video.shape[-1] != 3:
    raise ValueError(f"expected a video [T, H, W, 3], got shape {video.shape}")
  if video.dtype == np.uint8:
    return video.astype(np.float32)
  if not np.issubdtype(video.dtype, np.floating):
    raise TypeError(f"expected uint8 or float video, got {video.dtype}")
  return (np.clip(video.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5


def _smooth(pixels: np.ndarray) -> np.ndarray:
  """Separable [1, 2, 1] / 4 spatial filter with edge padding, per frame."""
  p = np.pad(pixels, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  p = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]
  return (p[:, :, :-2] + 2 * p[:, :, 1:-1] + p[:, :, 2:]) * (1 / 16)


def _norm(x: np.ndarray) -> np.ndarray:
  return np.sqrt(np.einsum("...c,...c->...", x, x))


def _border(pixels: np.ndarray) -> np.ndarray:
  return np.concatenate([
      pixels[:, 0].reshape(-1, 3), pixels[:, -1].reshape(-1, 3),
      pixels[:, :, 0].reshape(-1, 3), pixels[:, :, -1].reshape(-1, 3)])


def _noise_level(pixels: np.ndarray, bg: np.ndarray) -> float:
  """Robust per-channel noise std of the background (MAD of border pixels)."""
  return float(1.4826 * np.median(np.abs(_border(pixels) - bg)))


def _background(pixels: np.ndarray) -> np.ndarray:
  return np.median(_border(pixels), axis=0)


def _nearest_color(fg_vec: np.ndarray, bg: np.ndarray) -> str:
  refs = _FG_RGB - bg
  cos = refs @ fg_vec / (np.linalg.norm(refs, axis=1) * np.linalg.norm(fg_vec) + 1e-6)
  return _FG_NAMES[int(np.argmax(cos))]


def _slope(y: np.ndarray, t: np.ndarray) -> float:
  tc = t - t.mean()
  return float((tc * (y - y.mean())).sum() / (tc * tc).sum())


def _occupied(mask: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
  """Per frame, how many distinct values of `index` [H, W] the mask covers."""
  frames = mask.shape[0]
  t = np.broadcast_to(np.arange(frames)[:, None, None], mask.shape)
  flat = (t * n + index[None])[mask]
  return (np.bincount(flat, minlength=frames * n).reshape(frames, n) > 0).sum(1)


def _foreground(dist: np.ndarray, peak: float | None) -> np.ndarray:
  """Foreground mask [T, H, W] from distances to the background."""
  if peak is None:
    peak = float(np.quantile(dist, _FG_QUANTILE))
  return dist > _FG_THRESHOLD * peak


def _shape(mask: np.ndarray) -> str | None:
  """Shape from per-frame foreground masks [T, H, W].

  A triangle is the only shape skewed vertically (apex up: mass sits low);
  blur rounds its apex but keeps the mass low, so the skew survives. A square
  reaches ~sqrt(2) times further along the diagonals than along the axes, a
  circle equally far.
  """
  mask = mask[mask.any((1, 2))]
  if not len(mask):
    return None
  _, height, width = mask.shape
  extent = np.maximum(mask.any(2).sum(1), mask.any(1).sum(1))
  rows = mask.sum(2).astype(np.float32)  # [T, H]
  y = np.arange(height, dtype=np.float32)
  n = rows.sum(1)
  mean = (rows * y).sum(1) / n
  dy = y[None] - mean[:, None]
  var = (rows * dy ** 2).sum(1) / n
  skew = (rows * dy ** 3).sum(1) / n / (var ** 1.5 + 1e-6)
  if abs(float(np.median(skew))) > _TRIANGLE_MIN_SKEW:
    return "triangle"
  yy, xx = np.mgrid[:height, :width]
  diag = (_occupied(mask, yy + xx, height + width) +
          _occupied(mask, yy - xx + width, height + width)) / 2
  ratio = float(np.median(diag / (np.sqrt(2) * extent)))
  # Bounding-box fill (circle pi/4, square 1) as a second vote: small noisy
  # shapes are few pixels wide and either cue alone is sometimes off.
  area = mask.sum((1, 2))
  fill = float(np.median(area / (mask.any(2).sum(1) * mask.any(1).sum(1))))
  vote = (ratio - _SQUARE_DIAGONAL) / 0.2 + (fill - _SQUARE_FILL) / 0.1
  return "square" if vote > 0 else "circle"


def _track(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Frame indices where the foreground `mask` [T, H, W] is non-empty and its centroid (rows, cols) there."""
  _, height, width = mask.shape
  area = mask.sum((1, 2)).astype(np.float32)
  valid = area > 0
  weights = mask[valid].astype(np.float32)
  cy = (weights.sum(2) * (np.arange(height) + 0.5)).sum(1) / area[valid]
  cx = (weights.sum(1) * (np.arange(width) + 0.5)).sum(1) / area[valid]
  return np.nonzero(valid)[0].astype(np.float32), cy, cx


def _tracked(video):
  """(frame indices, centroid rows, centroid cols, height, width) of the shape in `video`, the track that
  `velocity` and `endpoints` read; None when no shape stands out from the background."""
  pixels = _smooth(_to_pixels(video))
  _, height, width, _ = pixels.shape
  dist = _norm(pixels - _background(pixels))
  peak = float(np.quantile(dist, _FG_QUANTILE))
  if peak < _MIN_CONTRAST:
    return None
  return (*_track(_foreground(dist, peak)), height, width)


def velocity(video) -> np.ndarray | None:
  """The shape's mean velocity (rows, cols), in frame heights and widths per frame: the least-squares
  slope of the foreground centroid that `score_video` reads direction from. None when no shape is seen in
  two frames."""
  track = _tracked(video)
  if track is None or len(track[0]) < 2:
    return None
  t, cy, cx, height, width = track
  return np.array([_slope(cy, t) / height, _slope(cx, t) / width])


def endpoints(video) -> np.ndarray | None:
  """Where the shape is first and last seen: float [2, 2], the centroid (row, col) of the first and of the
  last frame showing it, as fractions of the frame from its centre (-0.5 to 0.5). None when no shape is seen."""
  track = _tracked(video)
  if track is None or not len(track[0]):
    return None
  _, cy, cx, height, width = track
  return np.array([[cy[0] / height - 0.5, cx[0] / width - 0.5], [cy[-1] / height - 0.5, cx[-1] / width - 0.5]])


# A direction as a unit vector in (rows, cols).
_UNIT = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}


def layout(videos, labels) -> dict:
  """Where shapes start and end along their prompt's direction: per clip, its `endpoints` projected on the
  labelled direction (frame fractions from the centre; a shape starting on the side its travel comes from
  reads below 0). Medians of both (`start`, `end`) and the share of clips starting below 0 (`start_behind`)
  and ending above it (`end_ahead`), over the clips with a direction label and a shape seen. The embedded
  data's clips that stay in the frame read 1.00 and 0.99 (400 training clips); those leaving it start ahead
  (0.005 behind), those entering it end behind (0.003 ahead).

  A caption's direction is decided by where a generated shape sits early and late in the clip
  (experiments/sampling/README.md), so this says which end of a clip a model lost when direction fails."""
  labels = np.asarray(labels, np.int32).reshape(len(videos), -1)
  j = synthetic.ATTRIBUTE_NAMES.index("direction")
  start, end = [], []
  for video, label in zip(videos, labels):
    if label[j] < 0 or np.ndim(video) == 3 or np.shape(video)[0] < 2:
      continue
    ends = endpoints(video)
    if ends is None:
      continue
    unit = np.array(_UNIT[synthetic.DIRECTIONS[label[j]]])
    start.append(float(ends[0] @ unit))
    end.append(float(ends[1] @ unit))
  if not start:
    return {"clips": 0}
  start, end = np.array(start), np.array(end)
  return {"clips": len(start), "start": float(np.median(start)), "end": float(np.median(end)),
          "start_behind": float((start < 0).mean()), "end_ahead": float((end > 0).mean())}


def speed_kept(videos, true_videos) -> dict:
  """How much of the true continuation's motion the generated one keeps: per clip, its centroid velocity
  projected on the true one's, over the true one's speed (1: same speed and direction, 0: stopped or
  sideways, < 0: reversed; no shape counts 0). Median and quartiles over the clips whose true continuation
  moves, and the true continuations' median speed (frame fractions per frame)."""
  kept, speeds = [], []
  for video, true in zip(videos, true_videos):
    v_true = velocity(true)
    if v_true is None or not np.any(v_true):
      continue
    v = velocity(video)
    speed = float(np.linalg.norm(v_true))
    speeds.append(speed)
    kept.append(0.0 if v is None else float(v @ v_true) / speed ** 2)
  if not kept:
    return {"clips": 0}
  q1, median, q3 = np.quantile(kept, [0.25, 0.5, 0.75])
  return {"clips": len(kept), "median": float(median), "quartiles": [float(q1), float(q3)],
          "true_speed": float(np.median(speeds))}


def score_video(video) -> dict:
  """Predicts attribute values (names from `synthetic.ATTRIBUTES`) of one clip.

  Args:
    video: uint8 [T, H, W, 3], or float in [-1, 1] (chosen by dtype).

  Returns:
    dict attribute -> predicted value name, or None where undefined (no
    visible shape; direction and motion of a 1-frame or static clip).
  """
  raw = _to_pixels(video)
  # Mild smoothing cuts per-pixel noise ~2.7x and moves the half-max edges of a
  # flat shape by well under a pixel: used for everything but the shape, whose
  # corners (a few pixels at 32x32) it would round off.
  pixels = _smooth(raw)
  frames, height, width, _ = pixels.shape
  side = min(height, width)
  bg = _background(pixels)
  out = dict.fromkeys(SCORED)
  out["background"] = _BG_NAMES[int(np.argmin(((_BG_RGB - bg) ** 2).sum(-1)))]

  diff = pixels - bg
  dist = _norm(diff)  # [T, H, W]
  peak = float(np.quantile(dist, _FG_QUANTILE))
  if peak < _MIN_CONTRAST:
    return out
  mask = _foreground(dist, peak)
  core = dist > _CORE_THRESHOLD * peak
  out["color"] = _nearest_color(diff[core].mean(0), bg)

  # Per-frame geometry; frames where the shape vanished are skipped.
  area = mask.sum((1, 2)).astype(np.float32)
  valid = area > 0
  if not valid.any():
    return out
  n_rows, n_cols = mask.any(2).sum(1), mask.any(1).sum(1)
  extent = np.maximum(n_rows, n_cols)[valid] / side
  out["size"] = "large" if np.median(extent) > _SIZE_SPLIT else "small"
  # Raw pixels keep the corners unless noise would break the raw mask apart.
  if _noise_level(raw, bg) < _MAX_RAW_NOISE:
    out["shape"] = _shape(_foreground(_norm(raw - bg), None))
  else:
    out["shape"] = _shape(mask)

  if valid.sum() < 2:
    return out
  t, cy, cx = _track(mask)
  span = t[-1] - t[0]
  travel_x, travel_y = _slope(cx, t) * span, _slope(cy, t) * span
  if abs(travel_x) / width >= abs(travel_y) / height:
    travel, size_along = travel_x, width
    direction = "right" if travel_x > 0 else "left"
    perp = cy
  else:
    travel, size_along = travel_y, height
    direction = "down" if travel_y > 0 else "up"
    perp = cx
  if abs(travel) / size_along < _MIN_TRAVEL:
    return out
  out["direction"] = direction
  # The synthetic zigzag has zero perpendicular slope, so detrended RMS is the
  # oscillation; a straight path leaves only centroid jitter.
  resid = perp - perp.mean() - _slope(perp, t) * (t - t.mean())
  rms = float(np.sqrt((resid * resid).mean())) / side
  out["motion"] = "zigzag" if rms > _ZIGZAG_RMS else "straight"
  return out


def predict_labels(videos, attributes: Sequence[str] = SCORED) -> np.ndarray:
  """int32 [B, len(ATTRIBUTE_NAMES)] predicted indices; -1 = not predicted."""
  preds = np.full((len(videos), len(synthetic.ATTRIBUTE_NAMES)), -1, np.int32)
  for b, video in enumerate(videos):
    scored = score_video(video)
    for k in attributes:
      if scored.get(k) is not None:
        preds[b, synthetic.ATTRIBUTE_NAMES.index(k)] = synthetic.ATTRIBUTES[k].index(scored[k])
  return preds


def _counted(videos, labels, attributes):
  """Predictions, labels and a mask of which (sample, attribute) cells count."""
  labels = np.asarray(labels, np.int32).reshape(len(videos), -1)
  preds = predict_labels(videos, attributes)
  counted = labels >= 0  # -1 marks an unknown label.
  for b, video in enumerate(videos):
    if np.shape(video)[0] == 1 or np.ndim(video) == 3:
      # Motion attributes of an image are not part of what it depicts.
      for k in TEMPORAL:
        counted[b, synthetic.ATTRIBUTE_NAMES.index(k)] = False
  return preds, labels, counted


def prompt_adherence(videos, labels, attributes: Sequence[str] = SCORED) -> dict[str, float]:
  """Per-attribute accuracy of `score_video` against prompt labels.

  Args:
    videos: [B, T, H, W, 3] array or a sequence of clips (sizes may differ).
    labels: int [B, len(ATTRIBUTE_NAMES)] in ATTRIBUTE_NAMES order; -1 = unknown.
    attributes: which attributes to score.

  Returns:
    attribute -> accuracy for each attribute with at least one counted sample
    (an unpredicted value counts as wrong; direction and motion of 1-frame
    videos are not counted), plus 'mean' over those attributes and 'all' (the
    fraction of samples with every counted attribute right).
  """
  preds, labels, counted = _counted(videos, labels, attributes)
  result = {}
  for k in attributes:
    j = synthetic.ATTRIBUTE_NAMES.index(k)
    if counted[:, j].any():
      result[k] = float((preds[counted[:, j], j] == labels[counted[:, j], j]).mean())
  if result:
    result["mean"] = float(np.mean(list(result.values())))
    cols = [synthetic.ATTRIBUTE_NAMES.index(k) for k in attributes]
    ok = (preds[:, cols] == labels[:, cols]) | ~counted[:, cols]
    result["all"] = float(ok.all(1).mean())
  return result


def attribute_confusion(videos, labels, attribute: str) -> np.ndarray:
  """Confusion counts int64 [K, K + 1]: rows = true value, columns = predicted.

  The last column counts clips where nothing was predicted (None).
  """
  preds, labels, counted = _counted(videos, labels, (attribute,))
  j = synthetic.ATTRIBUTE_NAMES.index(attribute)
  k = len(synthetic.ATTRIBUTES[attribute])
  conf = np.zeros((k, k + 1), np.int64)
  for true, pred in zip(labels[counted[:, j], j], preds[counted[:, j], j]):
    conf[true, pred if pred >= 0 else k] += 1
  return conf
