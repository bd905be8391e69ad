"""Parity with diffusers `AutoencoderKLWan`: its weights through tools/convert_wan_vae.py give the same outputs.

Needs torch and diffusers (the `parity` extra; skipped without them). The diffusers model is built with
random weights, offline, at a small size with Wan2.1's structure (mults 1/2/4/4, time halved at the two
deepest levels, so every resampling mode runs), saved with `save_pretrained` (safetensors + config.json, the
layout of the released weights) and loaded back with the converter.
"""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("convert_wan_vae", os.path.join(ROOT, "tools", "convert_wan_vae.py"))
convert = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert)

Z = 4
SMALL = dict(base_dim=16, z_dim=Z, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True],
             latents_mean=[-0.5, 0.1, 0.3, 1.2], latents_std=[0.5, 1.0, 1.5, 2.0])
# Relative to the reference's largest magnitude; measured ~1e-6 (float32 on both sides).
RTOL = 1e-4


def _rel(ours, ref):
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKLWan(**SMALL).eval()
  with torch.no_grad():  # default init leaves norm gains at 1 and biases at 0: make them tell channels apart
    for name, p in ref.named_parameters():
      if name.endswith("gamma"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("wan_vae")
  ref.save_pretrained(path)  # diffusion_pytorch_model.safetensors + config.json
  ours = convert.load(os.path.join(path, "diffusion_pytorch_model.safetensors"))
  return ref, ours


@pytest.fixture(scope="module")
def outputs(models):
  """Reference and ours on one 9-frame 32x32 clip: encode (full and chunked), decode of the reference mean."""
  ref, ours = models
  x = np.random.default_rng(0).uniform(-1, 1, (1, 9, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    post = ref.encode(torch.from_numpy(x.transpose(0, 4, 1, 2, 3))).latent_dist
    decoded = ref.decode(post.mean).sample
  to_ours = lambda t: t.numpy().transpose(0, 2, 3, 4, 1)  # noqa: E731
  r = dict(mean=to_ours(post.mean), logvar=to_ours(post.logvar), decoded=to_ours(decoded))
  graphdef, state = nnx.split(ours)
  encode = jax.jit(lambda s, x, c: nnx.merge(graphdef, s).encode(x, chunk=c), static_argnums=2)
  decode = jax.jit(lambda s, z, c: nnx.merge(graphdef, s).decode(z, chunk=c), static_argnums=2)
  o = {}
  for chunk in (None, 1):
    o[chunk] = dict(zip(("mean", "logvar"), encode(state, x, chunk)))
    # diffusers clamps decoded pixels to [-1, 1]; our decode leaves that to its callers (make_decode_fn).
    o[chunk]["decoded"] = jnp.clip(decode(state, jnp.asarray(r["mean"]), chunk), -1.0, 1.0)
  return r, o


@pytest.mark.parametrize("chunk", [None, 1])
@pytest.mark.parametrize("name", ["mean", "logvar", "decoded"])
def test_matches_diffusers(outputs, name, chunk):
  ref, ours = outputs
  assert ours[chunk][name].shape == ref[name].shape
  err = _rel(ours[chunk][name], ref[name])
  print(f"wan parity {name} chunk={chunk}: max |ours - diffusers| / max |diffusers| = {err:.2e}")
  assert err < RTOL, err


def test_decode_is_not_mostly_clamped(outputs):
  # The clamped comparison above is only meaningful if most decoded values lie inside [-1, 1].
  ref, _ = outputs
  assert np.mean(np.abs(ref["decoded"]) < 1.0) > 0.9


def test_latent_stats_and_every_key_loaded(models):
  ref, ours = models
  np.testing.assert_allclose(ours.latent_mean[...], SMALL["latents_mean"], rtol=1e-6)
  np.testing.assert_allclose(ours.latent_std[...], SMALL["latents_std"], rtol=1e-6)
  # The export of what was loaded is the reference's state dict, key for key (load checked it the other way).
  exported = convert.export_weights(ours)
  ref_sd = ref.state_dict()
  assert set(exported) == set(ref_sd)
  for key, value in exported.items():
    np.testing.assert_array_equal(value, ref_sd[key].numpy(), err_msg=key)
