"""Class-conditional DiT: label embedding with a null class, no cross-attention, variant strings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import dit_class_video
from configs import dit_image
from sora_jax.data import packing
from sora_jax.models import dit as dit_lib
from sora_jax.models import t2v
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.train import train_dit


def test_decode_variant():
  assert dit_lib.decode_variant("XL/2") == dict(width=1152, depth=28, num_heads=16, patch=2)
  assert dit_lib.decode_variant("S/8")["patch"] == 8
  with pytest.raises(ValueError, match="variant"):
    dit_lib.decode_variant("M/2")


@pytest.fixture(scope="module")
def setup():
  config = dit_image.get_config("runlocal")
  mesh = mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    model = t2v.TextToVideo(config, patch_dim=t2v.patch_dim(config), rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # Perturb the zero-initialised adaLN and output layers so classes can change the output.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  return config, mesh, graphdef, params, rest


def _batch(config, classes):
  # One latent for every sample: only the class differs between segments.
  lat = np.random.default_rng(0).standard_normal((1, 8, 8, config.vae.latent_channels)).astype(np.float32)
  samples = []
  for i, c in enumerate(classes):
    tokens, coords, grid = packing.patchify(lat, config.dit.patch_size)
    labels = np.full(6, -1, np.int32)
    labels[config.text.class_column] = c
    samples.append(packing.sample_features(tokens, coords, grid, np.array([1], np.int32), labels, i))
  t = config.train_dit
  return packing.stack_rows(packing.pack_list(samples, seq_len=t.seq_len, text_seq_len=t.text_seq_len,
                                              max_segments=t.max_segments))


def _forward(graphdef, params, rest, rows, config):
  model = nnx.merge(graphdef, params, rest)
  S = config.train_dit.max_segments
  states, ids = model.encode_text(rows["text"], rows["text_segment_ids"], rows["text_positions"], S,
                                  labels=jnp.asarray(rows["labels"]))
  t_table = jnp.full(rows["grid"].shape[:2], 0.5)
  return ids, model(rows["tokens"], rows["coords"], rows["tokens_segment_ids"], t_table, states,
                    rows["text_segment_ids"], ids)


def test_class_path_has_no_text_branch(setup):
  config, _, graphdef, params, _ = setup
  names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
  assert not any("cross" in n or n.startswith("text") for n in names), names
  assert params["dit"]["class_embed"].shape == (config.text.num_classes + 1, config.dit.width)


def test_class_changes_output_and_unknown_is_null(setup):
  config, mesh, graphdef, params, rest = setup
  n = config.text.num_classes
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    ids, out = _forward(graphdef, params, rest, _batch(config, [0, 1, -1, n]), config)
  ids = np.asarray(ids)[0]
  np.testing.assert_array_equal(ids[:4], [0, 1, n, n])  # -1 (dropped / unconditional) reads as null
  seg = _batch(config, [0, 1, -1, n])["tokens_segment_ids"][0]
  per = [np.asarray(out[0][seg == k]) for k in range(1, 5)]
  assert np.abs(per[0] - per[1]).max() > 1e-4
  np.testing.assert_allclose(per[2], per[3], atol=1e-6)


def test_class_loss_with_label_dropout(setup):
  config, mesh, graphdef, params, rest = setup
  rows = _batch(config, [0, 2])
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    loss = train_dit.denoiser_loss(nnx.merge(graphdef, params, rest), jax.tree.map(jnp.asarray, rows),
                                   jax.random.key(0), config)
  assert np.isfinite(float(loss))


def test_video_config_shapes():
  c = dit_class_video.get_config("variant=B/2")
  assert c.text.num_classes == 101 and not c.dit.cross_attention
  assert c.train_dit.seq_len == 5 * 16 * 16  # 17 frames -> 5 latent frames of 32x32, patch 2
