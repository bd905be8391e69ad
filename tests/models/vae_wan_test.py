"""The Wan2.1 layout (`vae.layout='wan'`) and tools/convert_wan_vae.py, without torch.

Diffusers-format state dicts are synthesised from our own model (`export_weights`); the numerics against
diffusers itself are in vae_wan_parity_test.py.
"""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import config_dict
from safetensors import numpy as st_numpy

from sora_jax.models import vae as vae_lib
from tests.models import vae_test

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("convert_wan_vae", os.path.join(ROOT, "tools", "convert_wan_vae.py"))
convert = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert)

WAN = dict(mid_attention=True, pad_mode="zeros", layout="wan")  # on vae_test.TINY: mults 1/2/4, time /4
# The diffusers config of that model.
DIFFUSERS_CONFIG = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[True, True],
                        latents_mean=[0.1, -0.2, 0.3, -0.4], latents_std=[1.0, 2.0, 3.0, 4.0])


def _wan_model(seed=0):
  return vae_test._random_model(seed, **WAN)  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def state_dict(tmp_path_factory):
  """A diffusers-format safetensors file written from a random wan-layout model, read back."""
  path = os.path.join(tmp_path_factory.mktemp("wan"), "diffusion_pytorch_model.safetensors")
  st_numpy.save_file(convert.export_weights(_wan_model(seed=1)), path)
  return convert.read_safetensors(path)


def test_default_layout_has_no_wan_parts():
  model = vae_test._random_model(mid_attention=True)  # pylint: disable=protected-access
  assert model.quant_conv is None and model.post_quant_conv is None
  assert not any(isinstance(b, (vae_lib.WanDownsample, vae_lib.WanUpsample)) for b in model.enc_blocks)


@pytest.fixture(scope="module")
def fns():
  graphdef, state = nnx.split(_wan_model())
  encode = jax.jit(lambda s, x, c: nnx.merge(graphdef, s).encode(x, chunk=c), static_argnums=2)
  decode = jax.jit(lambda s, z, c: nnx.merge(graphdef, s).decode(z, chunk=c), static_argnums=2)
  return state, encode, decode


def test_wan_layout_shapes_and_chunked_pass(fns):
  state, encode, decode = fns
  x = vae_test._video((1, 9, 16, 16, 3))  # pylint: disable=protected-access
  mean, logvar = encode(state, x, None)
  assert mean.shape == (1, 3, 4, 4, 4)
  out = decode(state, mean, None)
  assert out.shape == x.shape
  for chunk in (1, 2):  # 2: the second chunk is a shorter tail
    mean_c, logvar_c = encode(state, x, chunk)
    np.testing.assert_allclose(mean_c, mean, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(logvar_c, logvar, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(decode(state, mean, chunk), out, atol=1e-4, rtol=1e-4)


def test_wan_layout_is_causal(fns):
  state, encode, decode = fns
  x = vae_test._video((1, 9, 16, 16, 3))  # pylint: disable=protected-access
  y = x.at[:, 5:].set(0.0)  # changes pixel frames >= 5, i.e. latent frames >= 2 (1 + 4k -> 1 + k)
  mean_x, _ = encode(state, x, None)
  mean_y, _ = encode(state, y, None)
  np.testing.assert_allclose(mean_x[:, :2], mean_y[:, :2], atol=1e-6)
  assert not np.allclose(mean_x[:, 2:], mean_y[:, 2:])
  z = mean_x.at[:, 2:].set(0.0)  # latent frame 2 feeds decoded frames >= 5
  np.testing.assert_allclose(decode(state, mean_x, None)[:, :5], decode(state, z, None)[:, :5], atol=1e-6)


def test_round_trip_through_safetensors(state_dict):
  source = _wan_model(seed=1)
  loaded = convert.build_vae(state_dict, DIFFUSERS_CONFIG)
  ours = nnx.to_flat_state(nnx.state(source, nnx.Param))
  theirs = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
  assert len(ours) == len(theirs) == len(state_dict)
  for path, var in ours:
    np.testing.assert_array_equal(theirs[path].get_value(), var.get_value(), err_msg=str(path))
  np.testing.assert_allclose(loaded.latent_std[...], DIFFUSERS_CONFIG["latents_std"])
  # Key names follow diffusers' AutoencoderKLWan (its flat encoder list, per-level decoder blocks).
  for key, shape in [("encoder.down_blocks.1.resample.1.weight", (8, 8, 3, 3)),
                     ("encoder.down_blocks.1.time_conv.weight", (8, 8, 3, 1, 1)),
                     ("decoder.up_blocks.0.upsamplers.0.time_conv.weight", (64, 32, 3, 1, 1)),
                     ("encoder.down_blocks.2.conv_shortcut.weight", (16, 8, 1, 1, 1)),
                     ("decoder.mid_block.attentions.0.to_qkv.weight", (96, 32, 1, 1)),
                     ("encoder.norm_out.gamma", (32, 1, 1, 1)), ("quant_conv.weight", (8, 8, 1, 1, 1))]:
    assert state_dict[key].shape == shape, key


def test_missing_unexpected_and_misshapen_keys(state_dict):
  bad = dict(state_dict)
  del bad["decoder.up_blocks.1.upsamplers.0.resample.1.bias"]
  with pytest.raises(KeyError, match=r"missing key 'decoder.up_blocks.1.upsamplers.0.resample.1.bias'"):
    convert.build_vae(bad, DIFFUSERS_CONFIG)
  bad = {**state_dict, "encoder.down_blocks.0.avg_shortcut.weight": np.zeros((1,), np.float32)}
  with pytest.raises(KeyError, match=r"unexpected key 'encoder.down_blocks.0.avg_shortcut.weight'"):
    convert.build_vae(bad, DIFFUSERS_CONFIG)
  bad = {**state_dict, "encoder.conv_in.weight": np.zeros((8, 3, 3, 3, 1), np.float32)}
  with pytest.raises(ValueError, match=r"shape mismatch for 'encoder.conv_in.weight': checkpoint \(8, 3, 3, 3, 1\), "
                                       r"expected \(8, 3, 3, 3, 3\)"):
    convert.build_vae(bad, DIFFUSERS_CONFIG)
  # A config of another size: the first weight that does not fit is named.
  with pytest.raises(ValueError, match="shape mismatch for 'encoder.conv_in.weight'"):
    convert.build_vae(state_dict, {**DIFFUSERS_CONFIG, "base_dim": 16})


def test_unsupported_configs():
  with pytest.raises(ValueError, match="is_residual=True: Wan2.2"):
    convert.vae_config({"is_residual": True})
  with pytest.raises(ValueError, match="latents_mean has 16 entries, z_dim is 4"):
    convert.latent_stats({"z_dim": 4}, 4)
  default = convert.vae_config({})  # no config.json: AutoencoderKLWan() = Wan2.1, our configs/vae_wan.py shape
  assert default["base_channels"] == 96 and default["channel_mults"] == (1, 2, 4, 4)
  assert default["temporal_downsample"] == (False, True, True) and default["latent_channels"] == 16


def test_check_config_names_the_field():
  vae = config_dict.ConfigDict(dict(base_channels=96, layout="wan"))
  convert.check_config(vae, {"base_channels": 96, "layout": "wan"})
  with pytest.raises(ValueError, match=r"config.vae.base_channels=96 but the Wan checkpoint needs 8"):
    convert.check_config(vae, {"base_channels": 8})
  with pytest.raises(ValueError, match=r"config.vae.layout='default'"):
    convert.check_config(config_dict.ConfigDict(dict(base_channels=96)), {"layout": "wan"})


def _wan_source(config):
  """A random-weight VAE at `config.vae`'s architecture."""
  arch = {k: v for k, v in config.vae.items() if k != "inference_dtype"}
  return vae_test._random_model(seed=2, **arch)  # pylint: disable=protected-access


def test_workdir_checkpoint_loads_through_train_vae_restore(tmp_path):
  # The converter's output is an ordinary VAE workdir: the launcher's restore path reads it back.
  from configs import vae_wan  # pylint: disable=g-import-not-at-top
  from sora_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from sora_jax.train import train_vae  # pylint: disable=g-import-not-at-top
  config = vae_wan.get_config("runlocal,wan21")
  source = _wan_source(config)
  diffusers_config = dict(base_dim=8, z_dim=16, num_res_blocks=1)  # the rest: Wan2.1's defaults
  convert.write_workdir(config, convert.export_weights(source), diffusers_config, str(tmp_path))
  _, params, rest = train_vae.restore(config, str(tmp_path), mesh_lib.make_mesh(config.mesh))
  restored = dict(nnx.to_flat_state(params))
  for path, var in nnx.to_flat_state(nnx.state(source, nnx.Param)):
    np.testing.assert_array_equal(restored[path].get_value(), var.get_value(), err_msg=str(path))
  np.testing.assert_allclose(rest["latent_mean"].get_value(), convert.WAN21_DEFAULTS["latents_mean"])
  with pytest.raises(FileExistsError):
    convert.write_workdir(config, convert.export_weights(source), diffusers_config, str(tmp_path))
  with pytest.raises(ValueError, match=r"config.vae.layout='default' but the Wan checkpoint needs 'wan'"):
    convert.write_workdir(vae_wan.get_config("runlocal"), {}, diffusers_config, str(tmp_path / "other"))


def test_bfloat16_inference_restores_cast_weights_and_matches_float32(tmp_path):
  # `vae.inference_dtype=bfloat16`: the restored weights are the stored ones rounded to bfloat16, the model
  # computes in bfloat16, and its latents and pixels stay within bfloat16's rounding of the float32 pass.
  from configs import vae_wan  # pylint: disable=g-import-not-at-top
  from sora_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from sora_jax.train import train_vae  # pylint: disable=g-import-not-at-top
  config = vae_wan.get_config("runlocal,wan21")
  mesh = mesh_lib.make_mesh(config.mesh)
  source = _wan_source(config)
  convert.write_workdir(config, convert.export_weights(source), dict(base_dim=8, z_dim=16, num_res_blocks=1),
                        str(tmp_path))
  video = np.random.default_rng(0).uniform(-1, 1, (1, 5, 32, 32, 3)).astype(np.float32)
  out = {}
  for dtype in ("float32", "bfloat16"):
    config.vae.inference_dtype = dtype
    graphdef, params, rest = train_vae.restore(config, str(tmp_path), mesh)
    assert {v.get_value().dtype for _, v in nnx.to_flat_state(params)} == {np.dtype(dtype)}
    with mesh_lib.use(mesh, mesh_lib.VAE_RULES):
      z = train_vae.make_encode_fn(graphdef, mesh, chunk=1)(params, rest, video)
      out[dtype] = (np.asarray(z), np.asarray(train_vae.make_decode_fn(graphdef, mesh, chunk=1)(params, rest, z)))
    out[dtype + "_params"] = params
  stored = dict(nnx.to_flat_state(out["float32_params"]))
  for path, var in nnx.to_flat_state(out["bfloat16_params"]):
    np.testing.assert_array_equal(var.get_value(), stored[path].get_value().astype(jnp.bfloat16), str(path))
  for i, name in enumerate(("latents", "pixels")):
    full, half = out["float32"][i], out["bfloat16"][i]
    assert half.dtype == np.float32, name
    err = np.abs(half - full).max() / np.abs(full).max()
    assert 1e-4 < err < 0.05, (name, err)  # bfloat16 keeps 8 bits of mantissa: about 0.4% per rounding
