"""Chunked (causal conv-state cache) and tiled VAE passes, and the patch_size / spatial options."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax.models import vae as vae_lib
from tests.models import vae_test


@pytest.fixture(scope="module")
def model():
  return vae_test._random_model(mid_attention=True)  # pylint: disable=protected-access


@pytest.mark.parametrize("chunk,pad_mode,extra", [
    (1, "replicate", {}), (2, "replicate", {}), (1, "zeros", {}),
    # The demo's layout: single-tap convs (no cached frames) next to the 3-tap temporal resampling ones.
    (2, "replicate", {"temporal_kernel": 1, "head_norm": False})])
def test_chunked_encode_decode_equal_full_pass(model, chunk, pad_mode, extra):
  if pad_mode != "replicate" or extra:
    model = vae_test._random_model(mid_attention=True, pad_mode=pad_mode, **extra)  # pylint: disable=protected-access
  graphdef, state = nnx.split(model)
  x = vae_test._video((1, 13, 16, 16, 3))  # pylint: disable=protected-access
  encode = jax.jit(lambda s, x, c: nnx.merge(graphdef, s).encode(x, chunk=c), static_argnums=2)
  decode = jax.jit(lambda s, z, c: nnx.merge(graphdef, s).decode(z, chunk=c), static_argnums=2)
  mean, logvar = encode(state, x, None)
  mean_c, logvar_c = encode(state, x, chunk)  # 13 frames: 1 + 4*3, so chunk=2 also runs a tail chunk.
  np.testing.assert_allclose(mean_c, mean, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(logvar_c, logvar, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(decode(state, mean, chunk), decode(state, mean, None), atol=1e-4, rtol=1e-4)


def test_chunked_memory_is_flat_in_frames(model):
  # XLA's temp buffer size for the chunked decode must not grow with the number of latent frames.
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z, chunk=1))
  temp = [fn.lower(state, jax.ShapeDtypeStruct((1, t, 4, 4, 4), jnp.float32)).compile()
          .memory_analysis().temp_size_in_bytes for t in (3, 9)]
  assert temp[1] <= 1.1 * temp[0], temp


def test_tiled_decode_matches_untiled_away_from_seams_and_is_smooth(model):
  graphdef, state = nnx.split(model)
  z = jax.random.normal(jax.random.key(3), (1, 1, 8, 8, 4))
  full = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))(state, z)
  tiled = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z, tile=6, tile_overlap=2))(state, z)
  assert tiled.shape == full.shape
  # Tiles see a cropped context, so agreement is approximate; a blend bug shows up as O(1) errors.
  assert float(jnp.mean(jnp.abs(tiled - full))) < 0.5 * float(jnp.mean(jnp.abs(full)))


def test_space_to_depth_roundtrip_and_patch_size_shapes():
  x = vae_test._video((2, 3, 8, 12, 3))  # pylint: disable=protected-access
  np.testing.assert_array_equal(vae_lib.depth_to_space(vae_lib.space_to_depth(x, 2), 2), x)
  with vae_test._mesh():  # pylint: disable=protected-access
    model = nnx.eval_shape(lambda: vae_lib.VAE(**{**vae_test.TINY, "patch_size": 2,
                                                  "spatial_downsample": (True, False)}, rngs=nnx.Rngs(0)))
  assert (model.temporal_stride, model.spatial_stride) == (4, 4)
  assert vae_test._abstract_shapes(model, (1, 9, 32, 32, 3)) == (  # pylint: disable=protected-access
      ((1, 3, 8, 8, 4),) * 2 + ((1, 9, 32, 32, 3),))
