"""Data sources behind one interface: `grain.MapDataset`s of examples, deterministic by index.

Kinds (`config.data.source`):
  synthetic  the embedded procedural clips (`synthetic.SyntheticVideos`), already decoded.
  folder     `config.data.path`: a directory of videos/images, or a CSV/JSONL captions file listing them.
  tfds       `config.data.path`: a dataset written by `tfds_builders.video_folder` (mp4 bytes or frames).
  latents    a latent cache (`latent_cache.LatentCacheSource`), for the DiT.

Weighted mixtures (`config.data.mixture`, a list of dicts each naming a `source` kind, a `weight` and that
kind's `path`, plus optional per-part data fields such as `frame_stride`, `fps` or `max_skip_fraction`)
combine any of these kinds, e.g. images and videos, or datasets of different quality. Each part is its own
dataset (host shard -> shuffle -> repeat -> decode, seeded per part) and `grain.MapDataset.mix` interleaves
them in exact proportion to the weights; the result is still a MapDataset deterministic by index, so the
iterator state (one index) resumes it exactly. Pixel kinds feed the VAE and `--mode=encode` (one latent
cache per part); 'latents' parts, and the caches encoded from pixel parts, feed the DiT with the same weights.

Folder and tfds sources index cheap *records* (`path`, `caption`, `index`, maybe `data`/`frames`); `DecodeClip`
turns a record into a pixel example `{video uint8 [T, H, W, 3], caption, labels, index, tags}` after shuffle and
repeat, so worker processes do the decoding. The clip's size comes from a `SizePolicy`, a function
`(frames, height, width) of the source -> (frames, height, width) to produce`, so packing can plug in its own.

Bad input (unreadable, truncated or empty files, clips shorter than asked, missing captions) never stops a
run: `DecodeClip` returns None (grain drops it), counts it, warns once per file and fails only when the
skipped fraction passes `config.data.max_skip_fraction`.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import os
from typing import Callable, Sequence

import grain
import numpy as np
from absl import logging

from sora_jax import configs_lib
from sora_jax.data import latent_cache
from sora_jax.data import synthetic
from sora_jax.data import video_io

KINDS = ("synthetic", "folder", "tfds")
# Kinds a `config.data.mixture` part may name: the pixel kinds plus latent caches (DiT input only).
MIXTURE_KINDS = KINDS + ("latents",)
# Fields of a mixture part beyond source/path/weight/name: they override config.data for that part.
PART_FIELDS = ("clip_sampling", "frame_stride", "fps", "max_skip_fraction", "size_policy", "res", "crop",
               "crop_scale")
# Seed offset between mixture parts (other offsets: 7919 between VAE sizes).
_PART_SEED = 104729
CAPTION_FILES = ("captions.csv", "captions.jsonl")
# Label width of every pixel example, so packed `labels` tables keep one shape whatever the source.
NUM_LABELS = len(synthetic.ATTRIBUTE_NAMES)

# (source frames, height, width) -> (frames, height, width) to produce.
SizePolicy = Callable[[int, int, int], tuple[int, int, int]]


class SkipSample(ValueError):
  """A sample that cannot be used; the message says why."""


class TooManySkips(RuntimeError):
  """The skipped fraction passed config.data.max_skip_fraction."""


# ---------------------------------------------------------------------------------------------- size policies

def fixed_size(size: Sequence[int]) -> SizePolicy:
  """Always (frames, height, width) = size: resize to cover, center crop (VAE batches need one shape)."""
  size = tuple(int(s) for s in size)
  return lambda frames, height, width: size


def bucket_policy(sizes: Sequence[Sequence[int]]) -> SizePolicy:
  """Picks from `sizes` the longest clip the source has frames for, then the closest aspect ratio, then area.

  Buckets come from the config, so every produced size is one `configs_lib.validate` checked against the
  VAE strides, the patch size and the sequence length.
  """
  sizes = [tuple(int(x) for x in s) for s in sizes]

  def policy(frames, height, width):
    fit = [s for s in sizes if s[0] <= frames] or [min(sizes)]  # none fits: the shortest, read as too short
    longest = max(s[0] for s in fit)
    aspect = math.log(width / height)
    return min((s for s in fit if s[0] == longest),
               key=lambda s: (abs(math.log(s[2] / s[1]) - aspect), -s[1] * s[2]))

  return policy


def area_policy(*, res: int, max_frames: int, frame_stride: int, multiple: int) -> SizePolicy:
  """Keeps the source aspect ratio at about res*res pixels; sizes round down to what the model divides.

  frames become the largest 1 + frame_stride*k <= min(source frames, max_frames) (an image stays 1 frame);
  height and width the largest multiples of `multiple` (VAE stride x patch) at that area.
  """
  def policy(frames, height, width):
    t = 1 + (min(frames, max_frames) - 1) // frame_stride * frame_stride
    scale = res / math.sqrt(height * width)
    h = max(multiple, int(height * scale) // multiple * multiple)
    w = max(multiple, int(width * scale) // multiple * multiple)
    return t, h, w

  return policy


def size_policy(config) -> SizePolicy:
  """`config.data.size_policy`: 'buckets' (config.data.sizes, the default) or 'area'."""
  kind = config.data.get("size_policy", "buckets")
  if kind == "buckets":
    return bucket_policy(config.data.sizes)
  if kind == "area":
    st, ss = configs_lib.vae_strides(config.vae)
    _, ph, pw = config.dit.patch_size
    return area_policy(res=config.data.get("res", 32), max_frames=max(s[0] for s in config.data.sizes),
                       frame_stride=st, multiple=ss * max(ph, pw))
  raise configs_lib.ConfigError(f"config.data.size_policy={kind!r}: choose 'buckets' or 'area'")


# ---------------------------------------------------------------------------------------------- records

def read_captions(path: str) -> list[dict]:
  """Rows of a CSV (header with `path` and `caption`) or JSONL captions file as records.

  An optional `tags` column / field (comma-separated text, or in JSONL a list of strings) tags the clip for
  `cond.tag_strategies`. A row with a missing or non-text caption, or tags of another type, becomes a
  record with an `error`, so it is skipped and counted like any other bad sample; a file that cannot be
  parsed at all raises.
  """
  root = os.path.dirname(os.path.abspath(path))
  rows = []
  if path.endswith(".csv"):
    with open(path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      if not reader.fieldnames or "path" not in reader.fieldnames or "caption" not in reader.fieldnames:
        raise ValueError(f"{path}: CSV header must name columns 'path' and 'caption', got {reader.fieldnames}")
      for line, row in enumerate(reader, start=2):
        rows.append((line, row.get("path"), row.get("caption"), row.get("tags") or ""))
  elif path.endswith(".jsonl"):
    with open(path, encoding="utf-8") as f:
      for line, text in enumerate(f, start=1):
        if not text.strip():
          continue
        try:
          row = json.loads(text)
        except json.JSONDecodeError:
          row = {}
        row = row if isinstance(row, dict) else {}
        tags = row.get("tags") or ""
        if isinstance(tags, list) and all(isinstance(t, str) for t in tags):
          tags = ",".join(tags)
        rows.append((line, row.get("path"), row.get("caption"), tags))
  else:
    raise ValueError(f"{path}: captions file must end in .csv or .jsonl")
  records = []
  for line, rel, caption, tags in rows:
    error = None
    if not isinstance(rel, str) or not rel.strip():
      error, rel = f"no path: {os.path.basename(path)} line {line}", f"{os.path.basename(path)}:{line}"
    elif not isinstance(caption, str) or not caption.strip():
      error = f"no caption: missing or not text in {os.path.basename(path)} line {line}"
    elif not isinstance(tags, str):
      error = f"bad tags: {tags!r} in {os.path.basename(path)} line {line} is not text or a list of text"
    records.append({"path": os.path.join(root, rel.strip()), "caption": caption if error is None else "",
                    "error": error or "", "tags": ",".join(t.strip() for t in tags.split(",") if t.strip())
                    if error is None else ""})
  return records


def _scan_folder(path: str) -> list[dict]:
  """Media files under `path` (sorted, recursive); captions from a sidecar `<name>.txt` next to each."""
  records = []
  for dirpath, dirnames, filenames in os.walk(path):
    dirnames.sort()
    for name in sorted(filenames):
      if name.startswith(".") or not (video_io.is_video(name) or video_io.is_image(name)):
        continue
      file = os.path.join(dirpath, name)
      sidecar = os.path.splitext(file)[0] + ".txt"
      caption, error = "", ""
      try:
        with open(sidecar, encoding="utf-8") as f:
          caption = f.read().strip()
      except (OSError, UnicodeDecodeError) as e:
        error = f"no caption: cannot read {os.path.basename(sidecar)} ({type(e).__name__})"
      if not error and not caption:
        error = f"no caption: {os.path.basename(sidecar)} is empty"
      records.append({"path": file, "caption": caption, "error": error})
  return records


class VideoFolder(Sequence):
  """Records of a folder (captions.csv/.jsonl inside, else sidecar .txt files) or of a captions file."""

  def __init__(self, path: str):
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
      listed = [os.path.join(path, n) for n in CAPTION_FILES if os.path.isfile(os.path.join(path, n))]
      self.records = read_captions(listed[0]) if listed else _scan_folder(path)
    elif os.path.isfile(path):
      self.records = read_captions(path)
    else:
      raise configs_lib.ConfigPathError(f"config.data.path={path!r}: no such folder or captions file")
    if not self.records:
      raise configs_lib.ConfigError(f"config.data.path={path!r}: no videos or images found")
    self.path = path

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return {**self.records[i], "index": int(i)}

  def __repr__(self):
    return f"VideoFolder({self.path!r}, {len(self)} records)"


class TfdsVideos(Sequence):
  """Records of a `video_folder` tfds dataset, read through tfds.data_source (no TensorFlow)."""

  def __init__(self, path: str, split: str = "train"):
    self.path, self.split = os.path.abspath(os.path.expanduser(path)), split
    if not os.path.isfile(os.path.join(self.path, "dataset_info.json")):
      raise configs_lib.ConfigPathError(f"config.data.path={path!r}: no tfds dataset (dataset_info.json) there")
    self._source = None
    self._len = len(self.source)

  @property
  def source(self):
    if self._source is None:  # reopened lazily in each grain worker
      import tensorflow_datasets as tfds
      self._source = tfds.builder_from_directory(self.path).as_data_source(split=self.split)
    return self._source

  def __len__(self):
    return self._len

  def __getitem__(self, i):
    ex = self.source[int(i)]
    record = {"path": ex["filename"].decode("utf-8"), "caption": ex["caption"].decode("utf-8"),
              "index": int(i), "error": ""}
    if "data" in ex:
      record["data"] = ex["data"].tobytes()
    else:
      record["frames"] = ex["frames"]
    return record

  def __getstate__(self):
    return {**self.__dict__, "_source": None}


def records(config, *, split: str = "train") -> grain.MapDataset:
  """The records of a folder or tfds source (`config.data.source`), one per file."""
  kind, path = config.data.source, config.data.get("path", "")
  if kind not in ("folder", "tfds"):
    raise configs_lib.ConfigError(f"config.data.source={kind!r} has no file records; choose 'folder' or 'tfds'")
  if not path:
    raise configs_lib.ConfigError(f"config.data.path is empty: set it to the {kind} dataset for data.source={kind!r}")
  return grain.MapDataset.source(VideoFolder(path) if kind == "folder" else TfdsVideos(path, split))


# ---------------------------------------------------------------------------------------------- decoding

_WARNED: set[str] = set()  # files already named in a warning by this process


class SkipCounter:
  """Per-process count of used and skipped samples; raises TooManySkips past `max_fraction`.

  The fraction is judged only after `min_samples`, so one bad file among the first few does not end a run.
  """

  def __init__(self, max_fraction: float, min_samples: int = 100, name: str = "data"):
    self.max_fraction, self.min_samples, self.name = max_fraction, min_samples, name
    self.seen, self.skipped = 0, 0
    self.reasons = collections.Counter()

  def ok(self):
    self.seen += 1

  def skip(self, path: str, reason: str, *, warn: bool = True):
    self.seen += 1
    self.skipped += 1
    self.reasons[reason.split(":")[0]] += 1
    if warn and path not in _WARNED:
      _WARNED.add(path)
      logging.warning("%s: skipping %s: %s", self.name, path, reason)
    if self.skipped & (self.skipped - 1) == 0:  # at 1, 2, 4, 8, ... skips: a running summary
      logging.warning("%s", self.summary())
    self.check(final=False)

  def check(self, final: bool = True):
    """Raises when the skipped fraction is past the limit (any count when `final`)."""
    if (final or self.seen >= self.min_samples) and self.seen and self.skipped / self.seen > self.max_fraction:
      raise TooManySkips(f"{self.summary()}: more than config.data.max_skip_fraction={self.max_fraction}; "
                         "fix or remove the files named in the warnings above")

  def summary(self) -> str:
    frac = self.skipped / max(self.seen, 1)
    why = ", ".join(f"{n} {r}" for r, n in self.reasons.most_common())
    return f"{self.name}: skipped {self.skipped} of {self.seen} samples ({frac:.1%})" + (f": {why}" if why else "")


@dataclasses.dataclass
class ClipSpec:
  """How a clip is cut from a video: in time, 'random' (default), 'start' or 'center' with a frame stride or a
  target fps; in space, 'center' (resize to cover, center crop) or 'random' (`video_io.random_crop`: a random
  window whose side is a log-uniform fraction in `crop_scale` of the largest one, never upsampled)."""
  sampling: str = "random"
  frame_stride: int = 1
  fps: float = 0.0  # > 0: resample to this rate instead of using frame_stride
  crop: str = "center"
  crop_scale: tuple[float, float] = (0.1, 1.0)

  @classmethod
  def from_config(cls, data) -> "ClipSpec":
    spec = cls(data.get("clip_sampling", "random"), int(data.get("frame_stride", 1)), float(data.get("fps", 0.0)),
               data.get("crop", cls.crop), tuple(float(x) for x in data.get("crop_scale", cls.crop_scale)))
    if spec.sampling not in ("random", "start", "center"):
      raise configs_lib.ConfigError(f"config.data.clip_sampling={spec.sampling!r}: choose 'random', 'start' "
                                    "or 'center'")
    if spec.frame_stride < 1 or spec.fps < 0:
      raise configs_lib.ConfigError(f"config.data.frame_stride={spec.frame_stride} / fps={spec.fps}: need "
                                    "stride >= 1, fps >= 0")
    if spec.crop not in ("center", "random"):
      raise configs_lib.ConfigError(f"config.data.crop={spec.crop!r}: choose 'center' or 'random'")
    if len(spec.crop_scale) != 2 or not 0 < spec.crop_scale[0] <= spec.crop_scale[1] <= 1:
      raise configs_lib.ConfigError(f"config.data.crop_scale={spec.crop_scale}: need (lo, hi) with 0 < lo <= hi <= 1")
    return spec


class DecodeClip:
  """map_with_index transform: record -> pixel example, or None (skipped and counted) for bad input.

  The clip start is drawn from (seed, index), so a given position of the shuffled, repeated dataset always
  gives the same pixels, in any worker: resumed runs see the same clips.
  """

  def __init__(self, policy: SizePolicy, clip: ClipSpec, *, seed: int, num_records: int,
               max_skip_fraction: float, name: str = "data"):
    self.policy, self.clip, self.seed, self.num_records = policy, clip, seed, num_records
    self.counter = SkipCounter(max_skip_fraction, 100, name)

  def __call__(self, index: int, record: dict) -> dict | None:
    path = record["path"]
    try:
      video = self.decode(record, np.random.default_rng([self.seed, index]))
    except TooManySkips:
      raise
    except Exception as e:  # noqa: BLE001 -- any decoder failure is a bad file; the skip limit catches bugs
      reason = str(e).split("\n")[0] if isinstance(e, SkipSample) else f"unreadable: {type(e).__name__}: {e}"
      # Only the first epoch warns: each file sits once in it, so one worker names it once.
      self.counter.skip(path, reason, warn=index < self.num_records)
      return None
    self.counter.ok()
    return {"video": video, "caption": record["caption"], "labels": np.full((NUM_LABELS,), -1, np.int32),
            "index": int(record["index"]), "tags": record.get("tags", "")}

  def decode(self, record: dict, rng: np.random.Generator) -> np.ndarray:
    if record.get("error"):
      raise SkipSample(record["error"])
    if "frames" in record:  # stored decoded frames
      return self._cut(record["frames"], rng)
    src = record.get("data", record["path"])
    if video_io.is_image(record["path"]):
      return self._cut(video_io.read_image(src), rng)
    if "data" not in record and os.path.getsize(src) == 0:
      raise SkipSample("empty file: 0 bytes")
    info, start, (t, h, w), step = self.plan(src, rng)
    if self.clip.crop == "random":
      frames = video_io.read_clip(src, start=start, num_frames=t, step=step, info=info)
      return video_io.random_crop(frames, h, w, self.clip.crop_scale, rng)
    return video_io.read_clip(src, start=start, num_frames=t, step=step, size=(h, w), info=info)

  def plan(self, src: video_io.Media, rng: np.random.Generator):
    """(info, first source frame, (frames, height, width), source frames per output frame) of a video clip."""
    info = video_io.probe(src)
    step = info.fps / self.clip.fps if self.clip.fps > 0 else float(self.clip.frame_stride)
    available = 1 + int((info.num_frames - 1) / step) if info.num_frames > 0 else 0
    t, h, w = self.policy(max(available, 1), info.height, info.width)
    if available < t:
      raise SkipSample(f"too short: {available} frames at step {step:g}, {t} requested")
    start = self._start(info.num_frames - int(math.ceil((t - 1) * step)), rng)
    return info, start, (t, h, w), step

  def _start(self, choices: int, rng) -> int:
    if self.clip.sampling == "random":
      return int(rng.integers(choices))
    return 0 if self.clip.sampling == "start" else (choices - 1) // 2

  def _cut(self, frames: np.ndarray, rng) -> np.ndarray:
    step = max(1, self.clip.frame_stride)
    t, h, w = self.policy(1 + (len(frames) - 1) // step, frames.shape[1], frames.shape[2])
    if 1 + (len(frames) - 1) // step < t:
      raise SkipSample(f"too short: {len(frames)} frames at step {step}, {t} requested")
    start = self._start(len(frames) - (t - 1) * step, rng)
    clip = np.asarray(frames[start:start + (t - 1) * step + 1:step], np.uint8)
    if self.clip.crop == "random":
      return video_io.random_crop(clip, h, w, self.clip.crop_scale, rng)
    return video_io.resize_crop(clip, h, w)


def decoder(config, policy: SizePolicy | None = None, *, seed: int, num_records: int,
            name: str = "data") -> DecodeClip:
  """The DecodeClip for `config.data` (clip sampling, stride/fps, max_skip_fraction)."""
  return DecodeClip(policy or size_policy(config), ClipSpec.from_config(config.data), seed=seed,
                    num_records=num_records, max_skip_fraction=config.data.get("max_skip_fraction", 0.1),
                    name=name)


# ---------------------------------------------------------------------------------------------- datasets

def synthetic_dataset(config, *, split: str, seed: int, num_samples: int,
                      sizes: Sequence[Sequence[int]] | None = None, size_weights=None) -> grain.MapDataset:
  """The embedded captioned clips (config.data.sizes unless `sizes` is given)."""
  sizes = [tuple(s) for s in (sizes if sizes is not None else config.data.sizes)]
  weights = list(size_weights if size_weights is not None else
                 (config.data.size_weights if sizes == [tuple(s) for s in config.data.sizes] else [1.0] * len(sizes)))
  # Shapes leaving or entering the frame are a training-data option; held-out and evaluation clips stay in
  # frame.
  train = split == "train"
  return grain.MapDataset.source(synthetic.SyntheticVideos(
      num_samples, sizes, weights, split=split, seed=seed,
      exit_fraction=config.data.get("exit_fraction", 0.0) if train else 0.0,
      exit_depth=config.data.get("exit_depth", 0.0),
      enter_fraction=config.data.get("enter_fraction", 0.0) if train else 0.0))


def _is_not_image(record: dict) -> bool:
  return not video_io.is_image(record["path"])


def pixel_dataset(config, *, split: str = "train", seed: int, size: Sequence[int] | None = None,
                  policy: SizePolicy | None = None, shuffle: bool = False, repeat: bool = False,
                  shard: bool = True, num_samples: int | None = None, name: str = "data") -> grain.MapDataset:
  """Pixel examples {video uint8 [T, H, W, 3], caption, labels [A], index, tags} of config.data.source.

  File sources: records -> (host shard) -> (shuffle) -> (repeat) -> decode; bad samples are None (dropped by
  `to_iter_dataset`), sized by `size` if given, else `policy`, else `size_policy(config)`. Synthetic:
  `num_samples` procedural clips at `size` or config.data.sizes. With `config.data.mixture`, the pixel parts
  each built so (part k seeded `seed + 104729 k`) and mixed by weight (see the module docstring).
  """
  import jax
  parts = [p for p in mixture(config) if p["source"] != "latents"]
  if parts:
    datasets = [pixel_dataset(part_config(config, p), split=split, seed=seed + _PART_SEED * k, size=size,
                              policy=policy, shuffle=shuffle, repeat=repeat, shard=shard,
                              num_samples=num_samples, name=f"{name} [{p['name']}]")
                for k, p in enumerate(parts)]
    return mix(datasets, [p["weight"] for p in parts])
  if mixture(config):
    raise ValueError("config.data.mixture has only 'latents' parts: pixel stages (train_vae, encode) need "
                     "a synthetic, folder or tfds part")
  kind = config.data.source
  if size is not None:
    policy = fixed_size(size)
  if kind == "synthetic":
    ds = synthetic_dataset(config, split=split, seed=seed, num_samples=num_samples or (1 << 30),
                           sizes=[tuple(size)] if size is not None else None)
  elif kind in ("folder", "tfds"):
    ds = records(config, split=split)
    if num_samples:
      ds = ds[:num_samples]
    if size is not None and size[0] > 1:
      ds = ds.filter(_is_not_image)  # images cannot fill a multi-frame size: left out, not counted as bad
  else:
    raise configs_lib.ConfigError(f"config.data.source={kind!r}: choose one of {KINDS}")
  if shard:
    ds = ds[jax.process_index()::jax.process_count()]
  num_records = len(ds)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()
  if kind != "synthetic":
    ds = ds.map_with_index(decoder(config, policy, seed=seed + 1, num_records=num_records, name=name))
  return ds


def latent_dataset(path: str, split: str = "train") -> grain.MapDataset:
  """A latent cache as a source of {latent, caption, labels, size, source_id}."""
  return grain.MapDataset.source(latent_cache.LatentCacheSource(path, split))


def mix(datasets: Sequence[grain.MapDataset], weights: Sequence[float]) -> grain.MapDataset:
  """Weighted mixture (e.g. images and videos, or datasets of different quality); deterministic by index."""
  if len(datasets) != len(weights) or not datasets or min(weights) <= 0:
    raise ValueError(f"mixture weights {list(weights)} must be positive, one per dataset ({len(datasets)})")
  return grain.MapDataset.mix(list(datasets), weights=list(weights)) if len(datasets) > 1 else datasets[0]


# ---------------------------------------------------------------------------------------------- mixtures

def mixture(config) -> list[dict]:
  """The parts of `config.data.mixture` as dicts with `name` filled in (`<source>_<k>`); [] without one."""
  parts = config.data.get("mixture") or []
  out = []
  for k, part in enumerate(parts):
    part = dict(part)
    part.setdefault("name", f"{part.get('source', 'part')}_{k}")
    part["weight"] = float(part.get("weight", 1.0))
    out.append(part)
  return out


def part_config(config, part: dict):
  """A copy of `config` whose data section is one mixture part (its fields over config.data, no mixture)."""
  import copy
  c = copy.deepcopy(config)
  with c.unlocked():
    fields = {k: v for k, v in part.items() if k not in ("weight", "name")}
    fields.setdefault("path", "")
    data = {k: v for k, v in c.data.items() if k != "mixture"}
    data.update(fields)
    c.data = data
  return c
