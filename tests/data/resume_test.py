"""Exact resume with grain worker processes: the batches after a restore equal the uninterrupted ones."""
import os

import jax.numpy as jnp
import numpy as np
from absl import flags

from sora_jax.data import latent_cache
from sora_jax.data import pipeline
from sora_jax.data import sources
from sora_jax.train import checkpoint as ckpt_lib
from tests.data import folder_fixture


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _latents(path, n=12):
  rng = np.random.default_rng(0)
  shapes = [(3, 4, 4, 4), (1, 4, 6, 4), (3, 2, 4, 4)]
  examples = [{"latent": rng.standard_normal(shapes[i % 3]).astype(np.float32), "caption": f"clip {i}",
               "labels": np.full((6,), -1, np.int32), "size": np.array([9, 16, 16], np.int32),
               "source_id": i} for i in range(n)]
  return latent_cache.write_latent_cache(path, examples, latent_channels=4)


def test_dit_pipeline_resumes_exactly_with_workers_through_the_checkpointer(tmp_path):
  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  config = folder_fixture.config("runlocal")
  config.data.num_workers = 2
  source = sources.latent_dataset(_latents(str(tmp_path / "latents")))

  def batches():
    return iter(pipeline.dit_dataset(config, source, seed=3, batch_size=2))

  it = batches()
  for _ in range(3):
    next(it)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"))
  state = {"x": jnp.zeros(2)}
  ckpt.save(3, state, data_iter=it, force=True)
  ckpt.wait()
  expected = [next(it) for _ in range(3)]

  resumed = batches()
  _, step = ckpt.restore(state, data_iter=resumed)
  ckpt.close()
  assert step == 3
  for want in expected:
    _assert_same(next(resumed), want)


def test_folder_vae_pipeline_resumes_exactly_with_workers(tmp_path):
  flags.FLAGS.mark_as_parsed()
  root = folder_fixture.make_folder(str(tmp_path / "videos"))
  config = folder_fixture.config(f"runlocal,path={root}")
  config.data.update(num_workers=2, max_skip_fraction=1.0)
  config.train_vae.update(sizes=[(9, 16, 16), (1, 16, 16)], size_weights=[0.5, 0.5])

  it = iter(pipeline.vae_dataset(config, seed=0, batch_size=2))
  for _ in range(2):
    next(it)
  state = it.get_state()
  expected = [next(it)["video"] for _ in range(3)]
  resumed = iter(pipeline.vae_dataset(config, seed=0, batch_size=2))
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["video"], want)
