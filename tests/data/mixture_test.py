"""Weighted source mixtures (config.data.mixture): proportions, determinism, exact resume, host shards, errors."""
import collections
import os

import jax
import numpy as np
import pytest
from PIL import Image

from configs import tiny_t2v
from sora_jax import configs_lib
from sora_jax.data import latent_cache
from sora_jax.data import pipeline
from sora_jax.data import sources
from sora_jax.train import train_dit


def _image_folder(root, n=6):
  """n small captioned images ('folder image k'): cheap to decode, easy to tell from synthetic clips."""
  os.makedirs(root, exist_ok=True)
  for i in range(n):
    Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(os.path.join(root, f"im{i}.png"))
    with open(os.path.join(root, f"im{i}.txt"), "w") as f:
      f.write(f"folder image {i}")
  return root


def _config(mixture=None, **data):
  c = tiny_t2v.get_config("runlocal")
  c.compilation_cache = ""
  with c.unlocked():
    c.data.update(data)
    if mixture is not None:
      c.data.mixture = mixture
  return c


def _pixel_mix(tmp_path, weights=(0.7, 0.3)):
  root = _image_folder(str(tmp_path / "images"))
  c = _config([dict(source="folder", path=root, weight=weights[0]),
               dict(source="synthetic", weight=weights[1])])
  configs_lib.validate(c)
  return c


def _is_folder(example):
  return example["caption"].startswith("folder image")


def test_pixel_mixture_proportions_match_weights(tmp_path):
  c = _pixel_mix(tmp_path)
  ds = sources.pixel_dataset(c, seed=0, size=(1, 16, 16), shuffle=True, repeat=True)
  frac = np.mean([_is_folder(x) for x in ds[:2000]])
  assert abs(frac - 0.7) < 0.02, frac


def test_pixel_mixture_is_deterministic_by_seed(tmp_path):
  c = _pixel_mix(tmp_path)

  def captions(seed):
    ds = sources.pixel_dataset(c, seed=seed, size=(1, 16, 16), shuffle=True, repeat=True)
    return [x["caption"] for x in ds[:30]]

  assert captions(3) == captions(3)
  assert captions(3) != captions(4)


def test_vae_pipeline_mixture_resumes_mid_stream(tmp_path):
  c = _pixel_mix(tmp_path)
  c.train_vae.update(sizes=[(1, 16, 16)], size_weights=[1.0])
  it = iter(pipeline.vae_dataset(c, seed=0, batch_size=2))
  for _ in range(5):
    next(it)
  state = it.get_state()
  want = [next(it)["video"] for _ in range(4)]
  resumed = iter(pipeline.vae_dataset(c, seed=0, batch_size=2))
  resumed.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(resumed)["video"], w)


def test_mixture_shards_each_part_over_hosts(tmp_path, monkeypatch):
  c = _pixel_mix(tmp_path)
  seen = []
  for host in range(2):
    monkeypatch.setattr(jax, "process_index", lambda host=host: host)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    ds = sources.pixel_dataset(c, seed=0, size=(1, 16, 16), shuffle=True, repeat=True)
    seen.append({x["caption"] for x in ds[:20] if _is_folder(x)})
  # Each host reads its own 3 of the 6 records (over several epochs), none of the other host's.
  assert len(seen[0]) == len(seen[1]) == 3 and not seen[0] & seen[1]


# ------------------------------------------------------------------------------------------------ DiT

def _cache(data_dir, name, first_id, n=40):
  rng = np.random.default_rng(first_id)
  examples = [{"latent": rng.standard_normal((1, 4, 4, 16)).astype(np.float32), "caption": f"{name} {i}",
               "labels": np.full((6,), -1, np.int32), "size": np.array([1, 16, 16], np.int32),
               "source_id": first_id + i} for i in range(n)]
  return latent_cache.write_latent_cache(data_dir, examples, latent_channels=16, name=name)


def _dit_mix(tmp_path):
  workdir = str(tmp_path / "work")
  good = _cache(str(tmp_path / "caches"), "good", 0)
  # A pixel part encoded by --mode=encode lands in <workdir>/latents/<part name>.
  _cache(train_dit.latent_dir(workdir), "web", 1000)
  c = _config([dict(source="latents", path=good, weight=1.0, name="good"),
               dict(source="folder", path="/unused/until/encode", weight=3.0, name="web")])
  c.mode = "train_dit"
  c.data.update(sizes=[(1, 16, 16)], size_weights=[1.0])
  c.train_dit.update(seq_len=16, text_seq_len=64, max_segments=4, batch_size=2)
  configs_lib.validate(c)
  return c, workdir


def _source_ids(it, n):
  ids = []
  for _ in range(n):
    batch = next(it)
    ids += [int(i) for i, g in zip(batch["index"].ravel(), batch["grid_segment_ids"].ravel()) if g > 0]
  return ids


def test_dit_latent_mixture_proportions_and_resume(tmp_path):
  c, workdir = _dit_mix(tmp_path)
  assert [name for name, _, _ in train_dit.latent_parts(c, workdir)] == ["good", "web"]
  it = iter(train_dit.dit_input(c, workdir, seed=0, batch_size=2))
  ids = _source_ids(it, 40)  # 4 samples of 4 tokens per row: 320 samples
  frac_web = np.mean([i >= 1000 for i in ids])
  assert abs(frac_web - 0.75) < 0.05, frac_web
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  resumed = iter(train_dit.dit_input(c, workdir, seed=0, batch_size=2))
  resumed.set_state(state)
  for w in want:
    got = next(resumed)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k], err_msg=k)


def test_dit_mixture_validation_source_interleaves_parts(tmp_path):
  c, workdir = _dit_mix(tmp_path)
  source = train_dit.latent_source(workdir, c)
  counts = collections.Counter(source[i]["source_id"] >= 1000 for i in range(40))
  assert counts == {True: 30, False: 10}


def test_dit_mixture_missing_cache_names_the_part(tmp_path):
  c, _ = _dit_mix(tmp_path)
  with pytest.raises(FileNotFoundError, match="mixture part 'web'.*--mode=encode"):
    train_dit.latent_caches(c, str(tmp_path / "elsewhere"))


# ------------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("part, match", [
    (dict(source="synthetic", weight=0.0), r"config.data.mixture\[1\].weight=0.0: must be a positive"),
    (dict(source="synthetic", weight=-1), r"config.data.mixture\[1\].weight=-1: must be a positive"),
    (dict(source="webdataset", weight=1), r"config.data.mixture\[1\].source='webdataset': unknown source kind"),
    (dict(source="folder", weight=1), r"config.data.mixture\[1\].path='': is required for source 'folder'"),
    (dict(source="latents", weight=1, path=""), r"config.data.mixture\[1\].path='': is required"),
    (dict(source="synthetic", weight=1, name="Bad Name"), r"config.data.mixture\[1\].name='Bad Name'"),
    (dict(source="synthetic", weight=1, name="synthetic_0"), r"mixture\[1\].name='synthetic_0': is used"),
    (dict(source="synthetic", weight=1, colour="red"), r"config.data.mixture\[1\].colour='red': unknown"),
])
def test_bad_mixture_configs_name_the_field(part, match):
  c = _config([dict(source="synthetic", weight=1.0), part])
  with pytest.raises(configs_lib.ConfigError, match=match):
    configs_lib.validate(c)


def test_latents_only_mixture_cannot_train_the_vae():
  c = _config([dict(source="latents", path="/x", weight=1.0)])
  c.mode = "train_vae"
  with pytest.raises(configs_lib.ConfigError, match="config.data.mixture=.*needs pixels"):
    configs_lib.validate(c)
  c.mode = "train_dit"
  configs_lib.validate(c)
