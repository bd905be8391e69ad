"""Tests for sora_jax.data.latent_cache: tfds array_record round trips without TF."""
import os
import pickle
import subprocess
import sys
import textwrap

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from sora_jax.data import latent_cache

C = 4
SHAPES = [(1, 2, 3, C), (3, 4, 2, C), (2, 2, 2, C), (1, 5, 5, C), (4, 1, 3, C)]


def make_examples(n, seed=0, str_ids=False):
  """Yields n tiny examples with shapes cycling through SHAPES."""
  rng = np.random.default_rng(seed)
  for i in range(n):
    shape = SHAPES[i % len(SHAPES)]
    yield {
        "latent": rng.standard_normal(shape).astype(np.float32),
        "caption": f"clip {i} ünïcode",
        "labels": np.array([i, -1, 2], np.int32),
        "size": np.array([1 + 4 * (shape[0] - 1), 8 * shape[1], 8 * shape[2]], np.int32),
        "source_id": f"vid_{i}" if str_ids else 100 + i,
        **({"tags": "exits,night"} if i % 3 == 1 else {}),  # untagged examples may leave the key out
    }


def assert_same(got, want, atol=0.0):
  assert set(got) == set(latent_cache.KEYS) | {"tags"}
  assert got["tags"] == want.get("tags", "")
  assert got["latent"].dtype == np.float32
  np.testing.assert_allclose(got["latent"], want["latent"], atol=atol)
  assert got["caption"] == want["caption"]
  assert got["labels"].dtype == np.int32 and got["size"].dtype == np.int32
  np.testing.assert_array_equal(got["labels"], want["labels"])
  np.testing.assert_array_equal(got["size"], want["size"])
  assert got["source_id"] == want["source_id"]


def test_round_trip_variable_shapes_keeps_order_across_shards(tmp_path):
  want = list(make_examples(11))
  path = latent_cache.write_latent_cache(
      str(tmp_path), make_examples(11), latent_channels=C, shard_size=3)
  assert path == latent_cache.dataset_path(str(tmp_path))
  shards = [f for f in os.listdir(path) if ".array_record-" in f]
  assert len(shards) == 4
  for f in ("dataset_info.json", "features.json", "metadata.json"):
    assert os.path.exists(os.path.join(path, f))
  src = latent_cache.LatentCacheSource(path)
  assert len(src) == 11
  for i in range(11):
    assert_same(src[i], want[i])
  assert src[0]["latent"].shape == (1, 2, 3, C)  # An image: T' = 1.
  assert_same(src[-1], want[-1])
  with pytest.raises(IndexError):
    src[11]
  # The dataset directory, its parent and plain tfds all read the same data.
  assert len(latent_cache.LatentCacheSource(os.path.dirname(path))) == 11
  ds = tfds.data_source("latent_cache", data_dir=str(tmp_path), split="train")
  assert ds[4]["caption"].decode() == want[4]["caption"]


def test_str_source_ids_float16_storage_and_slices(tmp_path):
  want = list(make_examples(6, str_ids=True))
  path = latent_cache.write_latent_cache(
      str(tmp_path), make_examples(6, str_ids=True), latent_channels=C,
      name="small", split="validation", latent_dtype="float16")
  src = latent_cache.LatentCacheSource(path, split="validation")
  for i in range(6):
    assert_same(src[i], want[i], atol=2e-3)
  sliced = latent_cache.LatentCacheSource(path, split="validation[2:5]")
  assert len(sliced) == 3 and sliced[0]["source_id"] == "vid_2"


def test_metadata_and_stats_round_trip(tmp_path):
  meta = {"vae": {"latent_channels": C, "scale": 0.5}, "tag": "x"}
  want = list(make_examples(7))
  path = latent_cache.write_latent_cache(
      str(tmp_path), iter(want), latent_channels=C, metadata=meta)
  src = latent_cache.LatentCacheSource(path)
  assert src.metadata["vae"] == meta["vae"] and src.metadata["tag"] == "x"
  assert latent_cache.read_metadata(path) == src.metadata
  # tfds exposes the same dict through DatasetInfo.metadata.
  info_meta = tfds.builder_from_directory(path).info.metadata
  assert info_meta["vae"] == meta["vae"]
  flat = np.concatenate([w["latent"].reshape(-1, C) for w in want])
  stats = src.latent_stats
  np.testing.assert_allclose(stats["mean"], flat.mean(0), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(stats["std"], flat.std(0), rtol=1e-6)
  assert stats["num_examples"] == 7 and stats["count"] == flat.shape[0]
  assert stats["shapes"]["1x2x3"] == 2 and sum(stats["shapes"].values()) == 7
  cache = src.metadata[latent_cache.CACHE_KEY]
  assert cache["latent_channels"] == C and cache["num_labels"] == 3
  with pytest.raises(ValueError, match="reserved"):
    latent_cache.write_latent_cache(str(tmp_path / "b"), make_examples(1), latent_channels=C,
                                    metadata={latent_cache.CACHE_KEY: 1})


def test_append_streams_new_shards_and_splits(tmp_path):
  everything = list(make_examples(9))
  path = latent_cache.write_latent_cache(
      str(tmp_path), make_examples(5), latent_channels=C, shard_size=2,
      metadata={"a": 1})
  with pytest.raises(FileExistsError, match=path):
    latent_cache.write_latent_cache(str(tmp_path), make_examples(1), latent_channels=C)
  consumed = []

  def stream():  # Consumed lazily, one example at a time.
    for i, ex in enumerate(make_examples(9)):
      if i >= 5:
        consumed.append(i)
        yield ex

  latent_cache.write_latent_cache(str(tmp_path), stream(), latent_channels=C,
                                  shard_size=2, append=True, metadata={"b": 2})
  latent_cache.write_latent_cache(str(tmp_path), make_examples(2), latent_channels=C,
                                  split="test", append=True)
  assert consumed == [5, 6, 7, 8]
  src = latent_cache.LatentCacheSource(path)
  assert len(src) == 9
  for i in range(9):
    assert_same(src[i], everything[i])
  assert src.metadata["a"] == 1 and src.metadata["b"] == 2
  flat = np.concatenate([w["latent"].reshape(-1, C) for w in everything])
  np.testing.assert_allclose(src.latent_stats["mean"], flat.mean(0), rtol=1e-6)
  assert src.latent_stats["num_examples"] == 9
  assert len(latent_cache.LatentCacheSource(path, split="test")) == 2
  with pytest.raises(ValueError, match="channels"):
    latent_cache.write_latent_cache(str(tmp_path), make_examples(1), latent_channels=8,
                                    append=True)
  # overwrite replaces the whole dataset.
  latent_cache.write_latent_cache(str(tmp_path), make_examples(3), latent_channels=C,
                                  overwrite=True)
  src = latent_cache.LatentCacheSource(path)
  assert len(src) == 3 and "a" not in src.metadata
  with pytest.raises(ValueError, match="'test'"):
    latent_cache.LatentCacheSource(path, split="test")


def test_bad_examples_raise_and_leave_nothing(tmp_path):
  bad = list(make_examples(3))
  bad[2]["latent"] = np.full((1, 2, 2, C), np.nan, np.float32)
  with pytest.raises(ValueError, match="source_id=102"):
    latent_cache.write_latent_cache(str(tmp_path), bad, latent_channels=C)
  with pytest.raises(ValueError, match=r"\[T', H', W', 8\]"):
    latent_cache.write_latent_cache(str(tmp_path), make_examples(2), latent_channels=8)
  with pytest.raises(ValueError, match="No examples"):
    latent_cache.write_latent_cache(str(tmp_path), [], latent_channels=C)
  with pytest.raises(FileNotFoundError):
    latent_cache.LatentCacheSource(str(tmp_path / "latent_cache"))
  assert os.listdir(tmp_path / "latent_cache") == []  # No partial datasets left.


def test_grain_source_and_pickling(tmp_path):
  path = latent_cache.write_latent_cache(str(tmp_path), make_examples(8), latent_channels=C)
  src = latent_cache.LatentCacheSource(path)
  ds = grain.MapDataset.source(src).shuffle(seed=3)
  ids = sorted(ds[i]["source_id"] for i in range(len(ds)))
  assert ids == list(range(100, 108))
  assert [e["source_id"] for e in src.__getitems__([1, 6])] == [101, 106]
  clone = pickle.loads(pickle.dumps(src))
  assert_same(clone[3], src[3])


def test_missing_path_and_split_errors(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="does not exist: " + missing):
    latent_cache.LatentCacheSource(missing)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=str(empty)) as err:
    latent_cache.LatentCacheSource(str(empty))
  assert "\n" not in str(err.value)
  path = latent_cache.write_latent_cache(str(tmp_path), make_examples(2), latent_channels=C)
  with pytest.raises(ValueError, match="'val'.*available: \\['train'\\]"):
    latent_cache.LatentCacheSource(path, split="val")


def test_write_and_read_without_tensorflow(tmp_path):
  # A fresh interpreter where `import tensorflow` fails (as if not installed)
  # proves TF is not needed. (A None entry in sys.modules would not do: tfds
  # takes any "tensorflow" key there to mean TF is loaded.)
  code = textwrap.dedent(f"""
      import sys

      class HideTF:  # Wraps each import finder; tensorflow is never found.
        def __init__(self, finder):
          self.finder = finder

        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] == "tensorflow":
            return None
          return self.finder.find_spec(name, path, target)

      sys.meta_path[:] = [HideTF(f) for f in sys.meta_path]
      import importlib.util
      assert importlib.util.find_spec("tensorflow") is None
      import numpy as np
      from sora_jax.data import latent_cache
      ex = {{"latent": np.ones((1, 2, 2, 3), np.float32), "caption": "a",
             "labels": np.zeros((0,), np.int32), "size": np.array([1, 16, 16], np.int32),
             "source_id": 0}}
      path = latent_cache.write_latent_cache({str(tmp_path)!r}, [ex, ex], latent_channels=3)
      src = latent_cache.LatentCacheSource(path)
      assert len(src) == 2 and src[1]["latent"].shape == (1, 2, 2, 3)
      assert src[0]["labels"].shape == (0,)
      assert not [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]
      print("ok")
  """)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith("ok")


def test_cache_without_tags_reads_untagged_and_refuses_tagged_appends(tmp_path, monkeypatch):
  # A cache written before `tags` existed: its features have no tags.
  plain = latent_cache._features
  monkeypatch.setattr(latent_cache, "_features",
                      lambda *a: tfds.features.FeaturesDict({k: v for k, v in plain(*a).items() if k != "tags"}))
  untagged = [ex for ex in make_examples(6) if "tags" not in ex]
  path = latent_cache.write_latent_cache(str(tmp_path), untagged, latent_channels=C)
  monkeypatch.setattr(latent_cache, "_features", plain)
  src = latent_cache.LatentCacheSource(path)
  assert [src[i]["tags"] for i in range(len(src))] == [""] * len(untagged)
  with pytest.raises(ValueError, match="example 1 .* has tags 'exits,night', but the cache .* no tags"):
    latent_cache.write_latent_cache(str(tmp_path), make_examples(3), latent_channels=C, append=True)
  assert len(latent_cache.LatentCacheSource(path)) == len(untagged)  # nothing lost
