"""Latent cache: VAE latents stored as a tfds dataset in array_record format.

`write_latent_cache` streams examples into a tfds dataset directory
(`dataset_info.json`, `features.json`, `metadata.json` and array_record
shards) without TensorFlow, using `tfds.core.SequentialWriter`. The result is
a regular tfds dataset: `tfds.builder_from_directory(path)` and
`tfds.data_source(name, data_dir=...)` read it. `LatentCacheSource` wraps it as
a grain random-access source.

Features of one example:
  latent     float32 (or float16 on disk) [T', H', W', C]; T', H', W' vary per
             example (an image has T' = 1), C is fixed. Always read as float32.
  caption    str
  labels     int32 [A], A fixed per dataset (all -1 when unknown)
  size       int32 [3]: frames, height, width of the source clip in pixels
  source_id  int64 or str (fixed per dataset, taken from the first example):
             the example's index or key in the source dataset
  tags       str, optional in the examples written ("" when absent): comma-separated facts about
             the clip that training may act on (e.g. "exits", see `cond.tag_strategies`); caches
             written before tags existed read as ""

`metadata.json` holds the caller's `metadata` (e.g. the VAE config) plus a
`latent_cache` entry written here: format, channel count, and per split the
number of examples, per-channel latent sums (so appends merge exactly),
mean/std and a histogram of latent shapes.

Only `Tensor`, `Text` and scalar features are used: tfds encodes and decodes
those with numpy alone (the `Image`/`Video` features need TensorFlow).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Mapping, Sequence
import itertools
import json
import os
import re
import shutil
import tempfile
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

VERSION = "1.0.0"
FORMAT_VERSION = 1
# Key in metadata.json owned by this module; user metadata may not use it.
CACHE_KEY = "latent_cache"
KEYS = ("latent", "caption", "labels", "size", "source_id")
_LATENT_DTYPES = {"float32": np.float32, "float16": np.float16}
# SequentialWriter rewrites dataset_info.json after every add_examples call,
# so examples are handed over in chunks rather than one by one.
_CHUNK = 256
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def dataset_path(data_dir: str, name: str = "latent_cache") -> str:
  """The directory `write_latent_cache` writes `name` to under `data_dir`."""
  return os.path.join(os.fspath(data_dir), name, VERSION)


def _features(latent_channels: int, num_labels: int, latent_dtype: str,
              source_id_is_str: bool) -> tfds.features.FeaturesDict:
  # BYTES, not ZLIB (both decode without TF): array_record already compresses
  # each record, so ZLIB on top saved nothing and wrote 3-10x slower.
  return tfds.features.FeaturesDict({
      "latent": tfds.features.Tensor(
          shape=(None, None, None, latent_channels),
          dtype=_LATENT_DTYPES[latent_dtype],
          encoding=tfds.features.Encoding.BYTES),
      "caption": tfds.features.Text(),
      "labels": tfds.features.Tensor(shape=(num_labels,), dtype=np.int32),
      "size": tfds.features.Tensor(shape=(3,), dtype=np.int32),
      "source_id": (tfds.features.Text() if source_id_is_str
                    else tfds.features.Scalar(dtype=np.int64)),
      "tags": tfds.features.Text(),
  })


def _read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


class _Stats:
  """Streaming per-channel sums and a shape histogram for one split."""

  def __init__(self, channels: int, prev: Mapping[str, Any] | None = None):
    prev = prev or {}
    self.num_examples = int(prev.get("num_examples", 0))
    self.count = int(prev.get("count", 0))
    self.sum = np.asarray(prev.get("sum", np.zeros(channels)), np.float64)
    self.sumsq = np.asarray(prev.get("sumsq", np.zeros(channels)), np.float64)
    self.shapes = collections.Counter(prev.get("shapes", {}))

  def add(self, latent: np.ndarray) -> None:
    flat = latent.reshape(-1, latent.shape[-1]).astype(np.float64)
    self.num_examples += 1
    self.count += flat.shape[0]
    self.sum += flat.sum(0)
    self.sumsq += np.square(flat).sum(0)
    self.shapes["x".join(map(str, latent.shape[:3]))] += 1

  def to_json(self) -> dict[str, Any]:
    n = max(self.count, 1)
    mean = self.sum / n
    var = np.maximum(self.sumsq / n - np.square(mean), 0.0)
    return {
        "num_examples": self.num_examples,
        "count": self.count,
        "sum": self.sum.tolist(),
        "sumsq": self.sumsq.tolist(),
        "mean": mean.tolist(),
        "std": np.sqrt(var).tolist(),
        "shapes": dict(sorted(self.shapes.items())),
    }


def _prepare(ex: Mapping[str, Any], i: int, channels: int, num_labels: int,
             source_id_is_str: bool,
             dtype: type[np.floating], has_tags: bool = True) -> dict[str, Any]:
  """Validates one example and converts it to what the features encode."""
  missing = [k for k in KEYS if k not in ex]
  if missing:
    raise ValueError(f"Latent cache example {i} lacks keys {missing}; "
                     f"expected {list(KEYS)}.")
  # np.asarray(..., float32) also accepts jax / ml_dtypes bfloat16 arrays.
  latent = np.asarray(ex["latent"], np.float32).astype(dtype, copy=False)
  sid = ex["source_id"]
  if (latent.ndim != 4 or latent.shape[-1] != channels
      or 0 in latent.shape):
    raise ValueError(f"Latent cache example {i} (source_id={sid!r}): latent "
                     f"shape {latent.shape} is not [T', H', W', {channels}].")
  if not np.isfinite(latent).all():
    # A NaN latent would silently poison every training step that samples it;
    # checked after the cast, which overflows past 65504 in float16.
    raise ValueError(f"Latent cache example {i} (source_id={sid!r}) has "
                     f"non-finite latent values (stored as {dtype.__name__}).")
  labels = np.asarray(ex["labels"], np.int32).reshape(-1)
  if labels.shape != (num_labels,):
    raise ValueError(f"Latent cache example {i} (source_id={sid!r}): labels "
                     f"shape {labels.shape} != ({num_labels},).")
  size = np.asarray(ex["size"], np.int32).reshape(-1)
  if size.shape != (3,):
    raise ValueError(f"Latent cache example {i} (source_id={sid!r}): size "
                     f"must be [frames, height, width], got {size.shape}.")
  if isinstance(sid, (str, bytes)) != source_id_is_str:
    kind = "str" if source_id_is_str else "int"
    raise ValueError(f"Latent cache example {i}: source_id {sid!r} is not "
                     f"{kind} like the rest of the dataset.")
  if isinstance(sid, bytes):
    sid = sid.decode("utf-8")
  caption = ex["caption"]
  if isinstance(caption, bytes):
    caption = caption.decode("utf-8")
  tags = ex.get("tags") or ""
  if isinstance(tags, bytes):
    tags = tags.decode("utf-8")
  if not isinstance(tags, str):
    raise ValueError(f"Latent cache example {i} (source_id={sid!r}): tags must "
                     f"be a comma-separated str, got {tags!r}.")
  out = {
      "latent": latent,
      "caption": str(caption),
      "labels": labels,
      "size": size,
      "source_id": sid if source_id_is_str else int(sid),
  }
  if has_tags:
    out["tags"] = tags
  elif tags:
    raise ValueError(f"Latent cache example {i} (source_id={sid!r}) has tags "
                     f"{tags!r}, but the cache it is appended to has no tags "
                     f"feature; write a new cache.")
  return out


def write_latent_cache(
    data_dir: str,
    examples: Iterable[Mapping[str, Any]],
    *,
    latent_channels: int,
    name: str = "latent_cache",
    split: str = "train",
    metadata: Mapping[str, Any] | None = None,
    shard_size: int = 1000,
    latent_dtype: str = "float32",
    append: bool = False,
    overwrite: bool = False,
) -> str:
  """Streams `examples` into the tfds dataset `data_dir/name/1.0.0`.

  Args:
    data_dir: tfds data dir; the dataset goes to `dataset_path(data_dir, name)`.
    examples: dicts with the keys in `KEYS` (see the module docstring); any
      iterable, consumed once, never held in memory as a whole.
    latent_channels: C, the last latent dimension.
    name: dataset name (snake_case), used in file names.
    split: split to write.
    metadata: JSON-serialisable dict stored in `metadata.json` (e.g. the VAE
      config). On append it is merged into the stored one (new keys win).
    shard_size: examples per array_record shard.
    latent_dtype: "float32" or "float16" on disk; reads return float32. On
      append the stored dtype is kept.
    append: add `split` to an existing dataset, or add new shards to it.
      A failed append keeps the shards completed before the failure.
    overwrite: replace an existing dataset instead of raising.

  Returns:
    The dataset directory (contains dataset_info.json).
  """
  if not _NAME_RE.match(name):
    raise ValueError(f"Latent cache name {name!r} must be snake_case.")
  if latent_dtype not in _LATENT_DTYPES:
    raise ValueError(f"latent_dtype {latent_dtype!r} not in "
                     f"{sorted(_LATENT_DTYPES)}.")
  if shard_size < 1:
    raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
  user_meta = dict(metadata or {})
  if CACHE_KEY in user_meta:
    raise ValueError(f"metadata key {CACHE_KEY!r} is reserved.")
  json.dumps(user_meta)  # Fail before writing anything.

  path = dataset_path(data_dir, name)
  exists = os.path.exists(os.path.join(path, "dataset_info.json"))
  if exists and not (append or overwrite):
    raise FileExistsError(f"Latent cache already exists at {path}; pass "
                          "append=True or overwrite=True.")
  appending = exists and append

  it = iter(examples)
  first = next(it, None)
  if first is None:
    raise ValueError(f"No examples to write to latent cache {path}.")
  it = itertools.chain([first], it)

  if appending:
    features = tfds.features.FeatureConnector.from_config(path)
    meta = _read_json(os.path.join(path, "metadata.json"))
    info = meta[CACHE_KEY]
    if info["latent_channels"] != latent_channels:
      raise ValueError(f"Latent cache {path} has {info['latent_channels']} "
                       f"channels, not {latent_channels}.")
    num_labels = info["num_labels"]
    source_id_is_str = info["source_id"] == "str"
    latent_dtype = info["latent_dtype"]
    target = path
  else:
    num_labels = int(np.asarray(first.get("labels", ())).size)
    source_id_is_str = isinstance(first.get("source_id"), (str, bytes))
    features = _features(latent_channels, num_labels, latent_dtype,
                         source_id_is_str)
    meta = {CACHE_KEY: {
        "format_version": FORMAT_VERSION,
        "latent_channels": latent_channels,
        "latent_dtype": latent_dtype,
        "num_labels": num_labels,
        "source_id": "str" if source_id_is_str else "int",
        "splits": {},
    }}
    # A fresh dataset is built next to its final place and renamed in at the
    # end, so readers never see a half-written cache.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    target = tempfile.mkdtemp(prefix=f".{VERSION}.incomplete-",
                              dir=os.path.dirname(path))
  meta.update(user_meta)
  cache = meta[CACHE_KEY]
  stats = _Stats(latent_channels, cache["splits"].get(split))

  ds_info = tfds.core.DatasetInfo(
      builder=tfds.core.DatasetIdentity(
          name=name, version=tfds.core.Version(VERSION), data_dir=target,
          module_name=__name__),
      description="VAE latents written by sora_jax.data.latent_cache.",
      features=features,
  )
  try:
    writer = tfds.core.SequentialWriter(
        ds_info, max_examples_per_shard=shard_size,
        overwrite=not appending, file_format="array_record")
    writer.initialize_splits([split], fail_if_exists=False)
    has_tags = "tags" in features.keys()
    prepared = (_prepare(ex, i, latent_channels, num_labels, source_id_is_str,
                         _LATENT_DTYPES[latent_dtype], has_tags)
                for i, ex in enumerate(it))
    while chunk := list(itertools.islice(prepared, _CHUNK)):
      for ex in chunk:
        stats.add(ex["latent"])
      writer.add_examples({split: chunk})
    writer.close_all()
    cache["splits"][split] = stats.to_json()
    # Written last and by hand: the writer's own metadata handling lets the
    # stale file win over new values on append.
    with open(os.path.join(target, "metadata.json"), "w") as f:
      json.dump(meta, f, indent=1)
  except BaseException:
    if not appending:
      shutil.rmtree(target, ignore_errors=True)
    raise
  if not appending:
    if exists:
      shutil.rmtree(path)
    os.replace(target, path)
  return path


def write_dataset(
    data_dir: str,
    name: str,
    features: tfds.features.FeaturesDict,
    examples: Iterable[Mapping[str, Any]],
    *,
    split: str = "train",
    description: str = "",
    shard_size: int = 1000,
    finalize=None,
    overwrite: bool = False,
) -> str:
  """Streams encodable `examples` into a fresh tfds dataset `data_dir/name/1.0.0` (array_record, no TF).

  The generic half of `write_latent_cache` for other per-example data (e.g. `text_embeddings`): the dataset
  is built in a temporary directory next to its place, `finalize(tmp_dir)` (if given) writes any extra files
  (metadata.json, ...) there once every example is written, and the directory is renamed in at the end, so
  readers never see a half-written dataset. Returns the dataset directory.
  """
  if not _NAME_RE.match(name):
    raise ValueError(f"Dataset name {name!r} must be snake_case.")
  path = dataset_path(data_dir, name)
  exists = os.path.exists(path)
  if exists and not overwrite:
    raise FileExistsError(f"Dataset already exists at {path}; pass overwrite=True.")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  target = tempfile.mkdtemp(prefix=f".{VERSION}.incomplete-", dir=os.path.dirname(path))
  ds_info = tfds.core.DatasetInfo(
      builder=tfds.core.DatasetIdentity(
          name=name, version=tfds.core.Version(VERSION), data_dir=target,
          module_name=__name__),
      description=description, features=features)
  try:
    writer = tfds.core.SequentialWriter(
        ds_info, max_examples_per_shard=shard_size, overwrite=True,
        file_format="array_record")
    writer.initialize_splits([split], fail_if_exists=False)
    it = iter(examples)
    while chunk := list(itertools.islice(it, _CHUNK)):
      writer.add_examples({split: chunk})
    writer.close_all()
    if finalize is not None:
      finalize(target)
  except BaseException:
    shutil.rmtree(target, ignore_errors=True)
    raise
  if exists:
    shutil.rmtree(path)
  os.replace(target, path)
  return path


def _resolve(path: str) -> str:
  """Finds the version directory holding dataset_info.json under `path`."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"Latent cache path does not exist: {path}")
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    return path
  # Also accept `data_dir/name`: take its highest complete version.
  versions = []
  for d in os.listdir(path) if os.path.isdir(path) else ():
    if (re.fullmatch(r"\d+\.\d+\.\d+", d)
        and os.path.isfile(os.path.join(path, d, "dataset_info.json"))):
      versions.append(tuple(int(x) for x in d.split(".")))
  if not versions:
    raise FileNotFoundError(f"No latent cache (dataset_info.json) at {path}; "
                            "pass the path write_latent_cache returned")
  return os.path.join(path, ".".join(map(str, max(versions))))


def read_metadata(path: str) -> dict[str, Any]:
  """The metadata dict stored with the latent cache at `path`."""
  meta_path = os.path.join(_resolve(path), "metadata.json")
  return _read_json(meta_path) if os.path.exists(meta_path) else {}


class LatentCacheSource(Sequence):
  """Grain random-access source over one split of a latent cache.

  Items have the written keys: latent float32 [T', H', W', C], caption str,
  labels int32 [A], size int32 [3], source_id int or str. Pickles by path, so
  grain worker processes reopen the files instead of copying handles.
  """

  def __init__(self, path: str, split: str = "train"):
    self.path = _resolve(path)
    self.split = split
    self.metadata = read_metadata(self.path)
    self._source = None
    builder = tfds.builder_from_directory(self.path)
    splits = list(builder.info.splits.keys())
    # tfds slicing ("train[:10%]") is allowed; the base name must exist.
    self._base_split = re.match(r"[^\[]*", split).group(0)
    if self._base_split not in splits:
      raise ValueError(f"Split {split!r} not in latent cache {self.path}; "
                       f"available: {splits}")
    self._source = builder.as_data_source(split=split)
    self._len = len(self._source)

  @property
  def source(self):
    """The underlying tfds data source, opened lazily (also after pickling)."""
    if self._source is None:
      self._source = tfds.builder_from_directory(self.path).as_data_source(
          split=self.split)
    return self._source

  @property
  def latent_stats(self) -> dict[str, Any]:
    """Per-channel mean/std and shape histogram of this split's latents."""
    return self.metadata[CACHE_KEY]["splits"][self._base_split]

  def __len__(self) -> int:
    return self._len

  def _decode(self, ex: dict[str, Any]) -> dict[str, Any]:
    sid = ex["source_id"]
    return {
        "latent": np.asarray(ex["latent"], np.float32),
        "caption": ex["caption"].decode("utf-8"),
        "labels": ex["labels"],
        "size": ex["size"],
        "source_id": sid.decode("utf-8") if isinstance(sid, bytes) else sid,
        "tags": ex.get("tags", b"").decode("utf-8"),
    }

  def __getitem__(self, i) -> dict[str, Any]:
    i = i.__index__()
    if not -self._len <= i < self._len:
      raise IndexError(f"Index {i} out of range for latent cache of "
                       f"{self._len} examples.")
    return self._decode(self.source[i % self._len])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self._decode(ex) for ex in self.source.__getitems__(indices)]

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return (self[i] for i in range(self._len))

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_source"] = None
    return state

  def __repr__(self) -> str:
    return (f"LatentCacheSource(path={self.path!r}, split={self.split!r}, "
            f"len={self._len})")
