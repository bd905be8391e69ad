"""Patch discriminator shapes, hinge losses, adaptive weight; a VAE train step with the GAN on."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import tiny_t2v
from sora_jax.data import pipeline
from sora_jax.models import discriminator as disc_lib
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.train import train_vae
from tests.models import vae_test


def test_patch_logits_for_videos_and_images():
  with vae_test._mesh():  # pylint: disable=protected-access
    disc = nnx.eval_shape(lambda: disc_lib.PatchDiscriminator3D(channels=8, num_layers=3, rngs=nnx.Rngs(0)))
  for shape, out in [((2, 9, 32, 32, 3), (2, 3, 4, 4, 1)), ((2, 1, 32, 32, 3), (2, 1, 4, 4, 1))]:
    graphdef, state = nnx.split(disc)
    logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, jax.ShapeDtypeStruct(shape, jnp.float32))
    assert logits.shape == out


def test_hinge_losses_and_adaptive_weight():
  ones = jnp.ones((4,))
  assert float(disc_lib.hinge_d_loss(2 * ones, -2 * ones)) == 0.0  # confident and right: no loss
  np.testing.assert_allclose(disc_lib.hinge_d_loss(0 * ones, 0 * ones), 1.0)
  np.testing.assert_allclose(disc_lib.generator_loss(3 * ones), -3.0)
  np.testing.assert_allclose(disc_lib.adaptive_weight(jnp.full((4,), 2.0), jnp.ones((4,))), 2.0, rtol=1e-4)


def test_vae_step_with_gan_updates_vae_and_discriminator():
  config = tiny_t2v.get_config("runlocal")
  config.compilation_cache = ""
  config.train_vae.update(disc_weight=0.5, disc_start=0, disc_channels=8, disc_layers=2)
  mesh = mesh_lib.make_mesh([(a, -1 if a == "data" else 1) for a in mesh_lib.AXES], devices=jax.devices()[:1])
  created, tx = train_vae.create(config, mesh)
  before = jax.tree.map(np.asarray, created.state.params)
  batch = next(iter(pipeline.vae_dataset(config, seed=0, batch_size=2)))
  with mesh_lib.use(mesh, mesh_lib.VAE_RULES):
    step = train_vae.make_train_step(config, created.graphdef, tx, created.shardings)
    batch = mesh_lib.global_batch(batch, mesh)
    state, metrics = step(step(created.state, batch)[0], batch)  # step 0 has lr 0 (warmup)
  for k in ("gen", "disc", "gan_weight"):
    assert np.isfinite(float(metrics[k])), (k, metrics)
  assert float(metrics["gan_weight"]) > 0
  moved = lambda a, b: float(np.abs(np.asarray(a) - b).max()) > 0
  assert moved(state.params["discriminator"]["out"]["kernel"][...],
               before["discriminator"]["out"]["kernel"][...])
  assert moved(state.params["dec_out"]["kernel"][...], before["dec_out"]["kernel"][...])
