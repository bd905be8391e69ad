"""Tests for the causal 3D conv VAE: shapes, causality, first-frame-alone, training, sharding metadata."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sora_jax.models import vae as vae_lib

AUTO = (jax.sharding.AxisType.Auto,) * 4
AXES = ("data", "fsdp", "context", "tensor")
# Flax 0.12 shards variables at creation: the logical names need rules to the mesh axes, not only a mesh.
REPLICATED_RULES = tuple((name, None) for name in vae_lib.CONV_KERNEL_AXES)
TINY = dict(base_channels=8, channel_mults=(1, 2, 4), num_res_blocks=1, temporal_downsample=(True, True),
            latent_channels=4)


@contextlib.contextmanager
def _mesh(mesh_shape=(1, 1, 1, 1), rules=REPLICATED_RULES):
  with jax.set_mesh(jax.make_mesh(mesh_shape, AXES, axis_types=AUTO)), nnx.logical_axis_rules(rules):
    yield


def _make(seed=0, mesh_shape=(1, 1, 1, 1), rules=REPLICATED_RULES, **overrides):
  with _mesh(mesh_shape, rules):
    return vae_lib.VAE(**{**TINY, **overrides}, rngs=nnx.Rngs(seed))


def _random_model(seed=0, **overrides):
  """A model with random host-drawn weights: no zero branches, and no per-variable init compiles (fast)."""
  with _mesh():
    model = nnx.eval_shape(lambda: vae_lib.VAE(**{**TINY, **overrides}, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  params = nnx.state(model, nnx.Param)
  for path, var in nnx.to_flat_state(params):
    shape = var.get_value().shape
    if len(shape) > 1:  # Kernels: unit-variance activations through the net.
      value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    elif path[-1] == "scale":
      value = 1.0 + 0.1 * rng.normal(size=shape)
    else:
      value = 0.1 * rng.normal(size=shape)
    var.set_value(jnp.asarray(value, jnp.float32))
  nnx.update(model, params)
  nnx.update(model, {"latent_mean": jnp.zeros(model.latent_channels),
                     "latent_std": jnp.ones(model.latent_channels)})
  return model


def _fns(model):
  graphdef, state = nnx.split(model)
  encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x))
  decode = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))
  return (lambda x: encode(state, x)), (lambda z: decode(state, z))


def _video(shape, seed=0):
  return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def model():
  return _random_model(mid_attention=True)


@pytest.fixture(scope="module")
def fns(model):
  return _fns(model)


@pytest.mark.parametrize("fold", [False, True])
def test_causal_conv3d_matches_lax_conv3d(monkeypatch, fold):
  """Both formulations (one 2D conv per time tap, or the taps folded into the input channels) are exact."""
  monkeypatch.setattr(vae_lib, "fold_time_taps", lambda kernel_shape, pixels_per_call: fold)
  x = _video((2, 5, 8, 8, 4))
  for kernel_shape, strides in [((3, 3, 3), (1, 1, 1)), ((3, 3, 3), (2, 2, 2)), ((1, 1, 1), (1, 1, 1)),
                                ((3, 1, 1), (1, 1, 1))]:
    kernel = jax.random.normal(jax.random.key(1), (*kernel_shape, 4, 6))
    kt, kh, kw = kernel_shape
    padded = jnp.concatenate([jnp.repeat(x[:, :1], kt - 1, axis=1), x], axis=1)
    ref = jax.lax.conv_general_dilated(
        padded, kernel, strides, [(0, 0), ((kh - 1) // 2,) * 2, ((kw - 1) // 2,) * 2],
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    got = vae_lib.causal_conv3d(x, jnp.transpose(kernel, (1, 2, 0, 3, 4)), strides)  # stored [kh, kw, kt, ...]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4, err_msg=str((kernel_shape, strides)))


def test_wide_low_resolution_convs_fold_their_time_taps():
  """Fold where a tap's kernel slice outgrows its input: Wan2.1's 384-channel convs at 32 x 32 and below fold,
  its 96- and 192-channel convs at 128 x 128 and 64 x 64 run per tap (one frame per call, batch 1)."""
  assert vae_lib.fold_time_taps((3, 3, 3, 384, 384), 32 * 32)
  assert vae_lib.fold_time_taps((3, 3, 3, 384, 384), 16 * 16)
  assert not vae_lib.fold_time_taps((3, 3, 3, 192, 192), 64 * 64)
  assert not vae_lib.fold_time_taps((3, 3, 3, 96, 96), 128 * 128)
  assert not vae_lib.fold_time_taps((3, 3, 1, 384, 384), 16 * 16)  # one tap: nothing to fold
  assert not vae_lib.fold_time_taps((3, 3, 3, 384, 384), 21 * 32 * 32)  # many frames in one call

  def convs(x_shape, kernel_shape):
    jaxpr = jax.make_jaxpr(vae_lib.conv3d_time_valid)(jax.ShapeDtypeStruct(x_shape, jnp.float32),
                                                     jax.ShapeDtypeStruct(kernel_shape, jnp.float32))
    return sum(e.primitive.name == "conv_general_dilated" for e in jaxpr.jaxpr.eqns)

  # One output frame per call: a folded conv is one 2D conv per frame, an unfolded one three.
  assert convs((1, 3, 16, 16, 384), (3, 3, 3, 384, 384)) == 1
  assert convs((1, 3, 128, 128, 96), (3, 3, 3, 96, 96)) == 3


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("strides", [(1, 1, 1), (2, 2, 2), (2, 1, 1)])
def test_conv_frame_grouping_does_not_change_the_result(monkeypatch, strides, fold):
  """One output frame per conv call (CPU), all in one call (accelerators) and uneven groups agree."""
  monkeypatch.setattr(vae_lib, "fold_time_taps", lambda kernel_shape, pixels_per_call: fold)
  x = _video((2, 9, 8, 8, 4))
  kernel = jax.random.normal(jax.random.key(2), (3, 3, 3, 4, 6))  # [kh, kw, kt, cin, cout]
  t_out = (9 - 3) // strides[0] + 1
  ref = vae_lib.conv3d_time_valid(x, kernel, strides, frames_per_call=t_out)
  assert ref.shape[1] == t_out
  for group in (1, 2, t_out - 1):
    got = vae_lib.conv3d_time_valid(x, kernel, strides, frames_per_call=group)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5, err_msg=f"frames_per_call={group}")


def _abstract_shapes(model, x_shape):
  """Latent and decoded shapes by tracing only (no compile): cheap for shape-contract checks."""
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  mean, logvar = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).encode(x), state, x)
  recon = jax.eval_shape(lambda s, z: nnx.merge(graphdef, s).decode(z), state, mean)
  return mean.shape, logvar.shape, recon.shape


def test_shapes_video_and_image(model):
  assert (model.temporal_stride, model.spatial_stride) == (4, 4)
  assert _abstract_shapes(model, (2, 9, 32, 32, 3)) == ((2, 3, 8, 8, 4),) * 2 + ((2, 9, 32, 32, 3),)
  assert _abstract_shapes(model, (1, 1, 32, 32, 3)) == ((1, 1, 8, 8, 4),) * 2 + ((1, 1, 32, 32, 3),)
  assert _abstract_shapes(model, (1, 5, 16, 24, 3)) == ((1, 2, 4, 6, 4),) * 2 + ((1, 5, 16, 24, 3),)
  assert model.latent_shape(9, 32, 48) == (3, 8, 12, 4)


def test_shapes_partial_temporal_downsample():
  with _mesh():
    model = nnx.eval_shape(lambda: vae_lib.VAE(**{**TINY, "temporal_downsample": (True, False)},
                                               rngs=nnx.Rngs(0)))
  assert (model.temporal_stride, model.spatial_stride) == (2, 4)
  assert _abstract_shapes(model, (1, 9, 16, 16, 3)) == ((1, 5, 4, 4, 4),) * 2 + ((1, 9, 16, 16, 3),)
  assert _abstract_shapes(model, (1, 1, 16, 16, 3)) == ((1, 1, 4, 4, 4),) * 2 + ((1, 1, 16, 16, 3),)


def test_bad_config_and_bad_input_raise(model):
  with pytest.raises(ValueError, match="temporal_downsample"):
    _make(temporal_downsample=(True,))
  with pytest.raises(ValueError, match="T = 1 \\+ 4"):
    model.encode(jnp.zeros((1, 8, 32, 32, 3)))
  with pytest.raises(ValueError, match="divisible by 4"):
    model.encode(jnp.zeros((1, 1, 30, 32, 3)))


def test_encoder_is_causal(fns):
  # Latent frame i depends only on pixel frames <= 4 * i.
  encode, _ = fns
  x = _video((2, 9, 16, 16, 3))
  for first_changed, unchanged in [(5, 2), (1, 1)]:
    x2 = x.at[:, first_changed:].set(_video((2, 9 - first_changed, 16, 16, 3), seed=7))
    (m1, l1), (m2, l2) = encode(x), encode(x2)
    np.testing.assert_allclose(m1[:, :unchanged], m2[:, :unchanged], atol=1e-5)
    np.testing.assert_allclose(l1[:, :unchanged], l2[:, :unchanged], atol=1e-5)
    assert np.abs(m1[:, unchanged] - m2[:, unchanged]).max() > 1e-3


def test_decoder_is_causal(fns):
  # Changing latent frame k (and later) leaves decoded frames <= 4 * (k - 1) unchanged; frame 4k - 3 moves.
  _, decode = fns
  z = jax.random.normal(jax.random.key(2), (2, 3, 4, 4, 4))
  for k in (1, 2):
    z2 = z.at[:, k:].add(1.0)
    y1, y2 = decode(z), decode(z2)
    np.testing.assert_allclose(y1[:, :4 * (k - 1) + 1], y2[:, :4 * (k - 1) + 1], atol=1e-5)
    assert np.abs(y1[:, 4 * (k - 1) + 1] - y2[:, 4 * (k - 1) + 1]).max() > 1e-3


def test_image_is_first_frame_of_video(fns):
  encode, decode = fns
  video = _video((2, 9, 16, 16, 3))
  mean_v, logvar_v = encode(video)
  mean_i, logvar_i = encode(video[:, :1])
  np.testing.assert_allclose(mean_i, mean_v[:, :1], atol=1e-5)
  np.testing.assert_allclose(logvar_i, logvar_v[:, :1], atol=1e-5)
  np.testing.assert_allclose(decode(mean_v[:, :1]), decode(mean_v)[:, :1], atol=1e-5)


def test_latent_stats_are_not_params_and_normalize_roundtrips():
  model = _random_model()
  assert "latent_mean" not in nnx.state(model, nnx.Param)
  stats = nnx.state(model, vae_lib.LatentStats)
  assert set(stats.keys()) == {"latent_mean", "latent_std"}
  z = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (2, 3, 4, 4, 4))
  model.set_latent_stats(*vae_lib.latent_stats(z))
  zn = model.normalize(z)
  np.testing.assert_allclose(jnp.mean(zn, axis=(0, 1, 2, 3)), 0.0, atol=1e-4)
  np.testing.assert_allclose(jnp.std(zn, axis=(0, 1, 2, 3)), 1.0, atol=1e-3)
  np.testing.assert_allclose(model.denormalize(zn), z, atol=1e-4)


def test_kl_loss():
  mean = jnp.zeros((2, 1, 2, 2, 4))
  assert float(vae_lib.kl_loss(mean, jnp.zeros_like(mean))) == 0.0
  mean = jnp.ones((2, 1, 2, 2, 4))
  logvar = jnp.full_like(mean, jnp.log(2.0))
  per_elem = 0.5 * (1.0 + 2.0 - 1.0 - np.log(2.0))
  np.testing.assert_allclose(vae_lib.kl_loss(mean, logvar), 16 * per_elem, rtol=1e-6)
  np.testing.assert_allclose(vae_lib.kl_loss(mean, logvar, reduction="mean"), per_elem, rtol=1e-6)


def test_a_few_adam_steps_lower_the_loss():
  # A 2-level model keeps the compile short; the shape contract is covered above.
  with _mesh():  # One jitted init compiles faster than many eager per-variable ones.
    model = nnx.jit(lambda: vae_lib.VAE(
        **{**TINY, "base_channels": 4, "channel_mults": (1, 2), "temporal_downsample": (True,)},
        rngs=nnx.Rngs(0)))()
  np.testing.assert_array_equal(model.latent_mean[...], np.zeros(4))
  np.testing.assert_array_equal(model.latent_std[...], np.ones(4))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)
  x = _video((2, 5, 16, 16, 3))

  def loss_fn(params, rng):
    recon, mean, logvar = nnx.merge(graphdef, params, rest)(x, rng=rng)
    return jnp.mean(jnp.abs(recon - x)) + 1e-6 * vae_lib.kl_loss(mean, logvar)

  @jax.jit
  def step(params, opt_state, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for i in range(8):
    params, opt_state, loss = step(params, opt_state, jax.random.key(i))
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.9 * losses[0], losses


def test_params_carry_logical_axis_names(model):
  kernel = model.enc_blocks[0].conv1.kernel
  assert kernel.get_metadata()["out_sharding"] == vae_lib.CONV_KERNEL_AXES
  assert model.enc_blocks[0].conv1.bias.get_metadata()["out_sharding"] == ("conv_out",)
  assert model.enc_blocks[0].norm1.scale.get_metadata()["out_sharding"] == ("conv_out",)
  assert model.enc_mid[1].qkv.get_metadata()["out_sharding"] == ("conv_in", "conv_out")
  # Pixel- and latent-facing channel axes stay unnamed (replicated).
  assert model.enc_in.kernel.get_metadata()["out_sharding"][3] is None
  assert model.dec_out.kernel.get_metadata()["out_sharding"][4] is None
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  # Every Param is annotated: one name (or None) per array axis.
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    assert len(var.get_metadata()["out_sharding"]) == var[...].ndim, path
  assert tuple(specs["enc_blocks"][0]["conv1"]["kernel"].get_value()) == vae_lib.CONV_KERNEL_AXES


def test_builds_sharded_on_8_devices():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  rules = (("conv_kt", None), ("conv_kh", None), ("conv_kw", None), ("conv_in", "fsdp"),
           ("conv_out", "tensor"))
  model = _make(mesh_shape=(1, 2, 1, 4), rules=rules, base_channels=4, channel_mults=(1, 2),
                temporal_downsample=(True,), mid_attention=True)
  spec = model.enc_blocks[0].conv1.kernel[...].sharding.spec
  assert tuple(spec) == (None, None, None, "fsdp", "tensor")
  encode, _ = _fns(model)
  mean, _ = encode(_video((1, 5, 16, 16, 3)))
  assert mean.shape == (1, 3, 8, 8, 4)


def test_from_config():
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(dict(TINY, temporal_downsample=(True, False), mid_attention=False))
  with _mesh():
    model = nnx.eval_shape(lambda: vae_lib.from_config(cfg, rngs=nnx.Rngs(0)))
    model_from_dict = nnx.eval_shape(lambda: vae_lib.from_config(dict(TINY), rngs=nnx.Rngs(0)))
  assert (model.temporal_stride, model.spatial_stride, model.latent_channels) == (2, 4, 4)
  assert model_from_dict.temporal_stride == 4
