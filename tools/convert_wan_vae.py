r"""Imports the Wan2.1 VAE (diffusers `AutoencoderKLWan` safetensors) into a sora_jax VAE workdir.

  python tools/convert_wan_vae.py \
      --safetensors=Wan2.1-T2V-1.3B-Diffusers/vae/diffusion_pytorch_model.safetensors --out=/tmp/wan21_vae
  python -m sora_jax.main --config=configs/vae_wan.py:wan21 --workdir=/tmp/wan21_vae --mode=eval

Reads the weights with safetensors' numpy API and the model's shape from the `config.json` next to them
(`--diffusers_config` to point elsewhere; without one, `AutoencoderKLWan()`'s defaults, i.e. Wan2.1). The
sora_jax model is `--config`'s `vae` (default `configs/vae_wan.py:wan21`), which must have `layout='wan'`
and the checkpoint's shape: a mismatch is an error naming the field. Every weight is checked by name and
shape (one-line errors name the diffusers key and both shapes); the latent mean / std of the diffusers config
become the VAE's latent statistics. The result is the VAE checkpoint of a workdir (`<out>/vae/checkpoints`,
step 0, the train state of `--config`), so `--mode=encode`, `eval`, `sample` and `train_dit` load it as
they load a VAE trained here. (`--mode=train_vae` on it is not supported: the checkpoint has no data
iterator state to resume.)

Only Wan2.1's layout: Wan2.2's residual VAE (`is_residual`, `patch_size`) is rejected.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from sora_jax.models import vae as vae_lib  # noqa: E402  pylint: disable=g-import-not-at-top

# `AutoencoderKLWan()`'s defaults (diffusers 0.42): the Wan2.1 VAE.
WAN21_DEFAULTS = dict(
    base_dim=96, decoder_base_dim=None, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], is_residual=False, in_channels=3, out_channels=3, patch_size=None,
    latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
                  0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
                 1.5579, 1.6382, 1.1253, 2.8251, 1.9160])

# Which sora_jax config fields a diffusers config determines (the rest of `vae_config`'s output is fixed).
_SHAPE_FIELDS = ("base_channels", "channel_mults", "num_res_blocks", "temporal_downsample", "latent_channels",
                 "in_channels")


# ------------------------------------------------------------------------------------------------ config
def read_diffusers_config(safetensors_path: str, config_path: str | None = None) -> dict:
  """The diffusers config: `config_path`, else `config.json` next to the weights, else {} (defaults)."""
  path = config_path or os.path.join(os.path.dirname(os.path.abspath(safetensors_path)), "config.json")
  if config_path is None and not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def vae_config(diffusers_config: dict) -> dict:
  """sora_jax `config.vae` for an `AutoencoderKLWan` config (missing fields take Wan2.1's defaults)."""
  c = {**WAN21_DEFAULTS, **{k: v for k, v in diffusers_config.items() if not k.startswith("_")}}
  unsupported = [("is_residual", bool(c["is_residual"]), "Wan2.2's residual VAE"),
                 ("patch_size", c["patch_size"] not in (None, 1), "Wan2.2's pixel patchify"),
                 ("attn_scales", bool(c["attn_scales"]), "attention outside the mid blocks"),
                 ("decoder_base_dim", c["decoder_base_dim"] not in (None, c["base_dim"]), "a wider decoder"),
                 ("out_channels", c["out_channels"] != c["in_channels"], "out_channels != in_channels")]
  for name, bad, what in unsupported:
    if bad:
      raise ValueError(f"diffusers config {name}={c[name]!r}: {what} is not supported (Wan2.1 layout only)")
  return dict(base_channels=int(c["base_dim"]), channel_mults=tuple(int(m) for m in c["dim_mult"]),
              num_res_blocks=int(c["num_res_blocks"]),
              temporal_downsample=tuple(bool(t) for t in c["temperal_downsample"]),
              latent_channels=int(c["z_dim"]), mid_attention=True, in_channels=int(c["in_channels"]),
              patch_size=1, spatial_downsample=None, pad_mode="zeros", layout="wan")


def latent_stats(diffusers_config: dict, latent_channels: int) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) per latent channel from the diffusers config (`latents_mean`, `latents_std`)."""
  c = {**WAN21_DEFAULTS, **diffusers_config}
  mean, std = (np.asarray(c[k], np.float32) for k in ("latents_mean", "latents_std"))
  for name, v in (("latents_mean", mean), ("latents_std", std)):
    if v.shape != (latent_channels,):
      raise ValueError(f"diffusers config {name} has {v.size} entries, z_dim is {latent_channels}")
  return mean, std


def check_config(vae_cfg, expected: dict) -> None:
  """Raises naming the first `config.vae` field that differs from what the checkpoint needs."""
  for name, want in expected.items():
    have = vae_cfg.get(name, vae_lib._OPTIONAL_FIELDS.get(name))  # pylint: disable=protected-access
    have = tuple(have) if isinstance(have, (list, tuple)) else have
    if have != want:
      raise ValueError(f"config.vae.{name}={have!r} but the Wan checkpoint needs {want!r} "
                       f"(pass --config.vae.{name}=... or a config that matches)")


# ------------------------------------------------------------------------------------------------ weights
# Kinds: how a diffusers tensor maps to ours. conv3d: [O, I, kt, kh, kw] <-> [kh, kw, kt, I, O];
# conv2d: [O, I, kh, kw] <-> [kh, kw, 1, I, O]; dense (1x1 Conv2d): [O, I, 1, 1] <-> [I, O];
# gamma3d / gamma2d: [C, 1, 1(, 1)] <-> [C]; bias: [C] <-> [C].
def _torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if kind == "conv3d":
    kh, kw, kt, i, o = shape
    return (o, i, kt, kh, kw)
  if kind == "conv2d":
    kh, kw, _, i, o = shape
    return (o, i, kh, kw)
  if kind == "dense":
    i, o = shape
    return (o, i, 1, 1)
  return {"gamma3d": shape + (1, 1, 1), "gamma2d": shape + (1, 1), "bias": shape}[kind]


def _to_ours(kind: str, w: np.ndarray) -> np.ndarray:
  if kind == "conv3d":  # torch [o, i, kt, kh, kw] -> ours [kh, kw, kt, i, o]
    return w.transpose(3, 4, 2, 1, 0)
  if kind == "conv2d":  # torch [o, i, kh, kw] -> ours [kh, kw, 1, i, o]
    return w.transpose(2, 3, 1, 0)[:, :, None]
  if kind == "dense":
    return w[:, :, 0, 0].T
  return w.reshape(-1)


def _to_torch(kind: str, w: np.ndarray) -> np.ndarray:
  if kind == "conv3d":
    return w.transpose(4, 3, 2, 0, 1)
  if kind == "conv2d":
    return w[:, :, 0].transpose(3, 2, 0, 1)
  if kind == "dense":
    return w.T[:, :, None, None]
  return w.reshape(_torch_shape(kind, w.shape))


def key_map(vae: vae_lib.VAE) -> list[tuple[tuple, str, str]]:
  """(our param path, diffusers key, kind) for every weight of a `layout='wan'` VAE, in model order."""
  if getattr(vae, "layout", "default") != "wan":
    raise ValueError("the Wan converter needs a VAE built with layout='wan'")
  out = []

  def conv(path, key, kind="conv3d"):
    out.extend([(path + ("kernel",), key + ".weight", kind), (path + ("bias",), key + ".bias", "bias")])

  def block(path, key, m):
    if isinstance(m, vae_lib.ResBlock):
      out.append((path + ("norm1", "scale"), key + ".norm1.gamma", "gamma3d"))
      conv(path + ("conv1",), key + ".conv1")
      out.append((path + ("norm2", "scale"), key + ".norm2.gamma", "gamma3d"))
      conv(path + ("conv2",), key + ".conv2")
      if m.skip is not None:
        conv(path + ("skip",), key + ".conv_shortcut")
    elif isinstance(m, vae_lib.SpatialAttention):
      out.extend([(path + ("norm", "scale"), key + ".norm.gamma", "gamma2d"),
                  (path + ("qkv",), key + ".to_qkv.weight", "dense"),
                  (path + ("qkv_bias",), key + ".to_qkv.bias", "bias"),
                  (path + ("out",), key + ".proj.weight", "dense"),
                  (path + ("out_bias",), key + ".proj.bias", "bias")])
    elif isinstance(m, (vae_lib.WanDownsample, vae_lib.WanUpsample)):
      conv(path + ("conv",), key + ".resample.1", "conv2d")
      if m.time_conv is not None:
        conv(path + ("time_conv",), key + ".time_conv")
    else:
      raise TypeError(f"no Wan counterpart for {type(m).__name__} at {path}")

  def mid(name, prefix, blocks):
    n_res = 0
    for i, m in enumerate(blocks):
      if isinstance(m, vae_lib.SpatialAttention):
        block((name, i), f"{prefix}.attentions.0", m)
      else:
        block((name, i), f"{prefix}.resnets.{n_res}", m)
        n_res += 1

  conv(("enc_in",), "encoder.conv_in")
  for j, m in enumerate(vae.enc_blocks):  # Wan's down_blocks are flat, in the same order as ours.
    block(("enc_blocks", j), f"encoder.down_blocks.{j}", m)
  mid("enc_mid", "encoder.mid_block", vae.enc_mid)
  out.append((("enc_norm", "scale"), "encoder.norm_out.gamma", "gamma3d"))
  conv(("enc_out",), "encoder.conv_out")
  conv(("quant_conv",), "quant_conv")
  conv(("post_quant_conv",), "post_quant_conv")
  conv(("dec_in",), "decoder.conv_in")
  mid("dec_mid", "decoder.mid_block", vae.dec_mid)
  level, n_res = 0, 0  # ours are flat; Wan's are grouped per level: up_blocks.{level}.resnets / .upsamplers.0
  for j, m in enumerate(vae.dec_blocks):
    if isinstance(m, vae_lib.WanUpsample):
      block(("dec_blocks", j), f"decoder.up_blocks.{level}.upsamplers.0", m)
      level, n_res = level + 1, 0
    else:
      block(("dec_blocks", j), f"decoder.up_blocks.{level}.resnets.{n_res}", m)
      n_res += 1
  out.append((("dec_norm", "scale"), "decoder.norm_out.gamma", "gamma3d"))
  conv(("dec_out",), "decoder.conv_out")
  return out


def _params(vae: vae_lib.VAE) -> dict:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return {tuple(path): var for path, var in nnx.to_flat_state(nnx.state(vae, nnx.Param))}


def load_weights(vae: vae_lib.VAE, state_dict: dict[str, np.ndarray]) -> None:
  """Assigns a diffusers `AutoencoderKLWan` state dict to `vae` (layout='wan') in place, checking every key."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  entries, params = key_map(vae), _params(vae)
  missing = [key for _, key, _ in entries if key not in state_dict]
  if missing:
    raise KeyError(f"missing key {missing[0]!r} in the Wan checkpoint"
                   + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  known = {key for _, key, _ in entries}
  unexpected = sorted(k for k in state_dict if k not in known)
  if unexpected:
    raise KeyError(f"unexpected key {unexpected[0]!r} in the Wan checkpoint"
                   + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                   + ": not the Wan2.1 AutoencoderKLWan layout of this config")
  for path, key, kind in entries:
    var = params[path]
    shape = tuple(var.get_value().shape)
    w = np.asarray(state_dict[key])
    if tuple(w.shape) != _torch_shape(kind, shape):
      raise ValueError(f"shape mismatch for {key!r}: checkpoint {tuple(w.shape)}, expected "
                       f"{_torch_shape(kind, shape)} (sora_jax {'.'.join(map(str, path))} {shape})")
    var.set_value(jnp.asarray(_to_ours(kind, w.astype(np.float32))))


def export_weights(vae: vae_lib.VAE) -> dict[str, np.ndarray]:
  """The inverse of `load_weights`: `vae`'s weights as a diffusers `AutoencoderKLWan` state dict."""
  params = _params(vae)
  return {key: np.ascontiguousarray(_to_torch(kind, np.asarray(params[path].get_value(), np.float32)))
          for path, key, kind in key_map(vae)}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file as numpy (safetensors' numpy API; bf16 comes back as ml_dtypes')."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  return st_numpy.load_file(path)


def build_vae(state_dict: dict[str, np.ndarray], diffusers_config: dict | None = None) -> vae_lib.VAE:
  """A `layout='wan'` VAE holding the checkpoint's weights and latent statistics (no mesh needed)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  cfg = vae_config(diffusers_config or {})
  with nnx.use_eager_sharding(False):
    vae = nnx.eval_shape(lambda: vae_lib.from_config(cfg, rngs=nnx.Rngs(0)))  # no init compiles: all replaced
  load_weights(vae, state_dict)
  mean, std = latent_stats(diffusers_config or {}, cfg["latent_channels"])
  vae.latent_mean.set_value(jnp.asarray(mean))  # abstract until now: set whole, not in place
  vae.latent_std.set_value(jnp.asarray(std))
  return vae


def load(safetensors_path: str, config_path: str | None = None) -> vae_lib.VAE:
  """The Wan VAE of a diffusers `diffusion_pytorch_model.safetensors` (+ its config.json), ready to run."""
  return build_vae(read_safetensors(safetensors_path), read_diffusers_config(safetensors_path, config_path))


# ------------------------------------------------------------------------------------------------ workdir
def write_workdir(config, state_dict: dict[str, np.ndarray], diffusers_config: dict, out: str) -> str:
  """Writes `<out>/vae/checkpoints/0`: the train state of `config` with the converted VAE in it."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sora_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from sora_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from sora_jax.train import train_vae  # pylint: disable=g-import-not-at-top

  expected = vae_config(diffusers_config)
  check_config(config.vae, {k: expected[k] for k in (*_SHAPE_FIELDS, "layout", "pad_mode", "mid_attention",
                                                     "patch_size")})
  directory = train_vae.checkpoint_dir(out)
  ckpt = ckpt_lib.Checkpointer(directory, async_save=False)
  if ckpt.latest_step() is not None:
    ckpt.close()
    raise FileExistsError(f"{directory} already holds a VAE checkpoint; choose a fresh --out")
  mesh = mesh_lib.make_mesh(config.mesh)
  created, _ = train_vae.create(config, mesh)
  model = nnx.merge(created.graphdef, created.state.params, created.state.rest)
  load_weights(model, state_dict)
  model.set_latent_stats(*latent_stats(diffusers_config, expected["latent_channels"]))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  state = created.state.replace(params=jax.device_put(params, created.shardings.params),
                                rest=jax.device_put(rest, created.shardings.rest))
  ckpt.save(0, state, config=config.to_dict(), force=True)
  ckpt.close()
  return directory


def main(argv):
  del argv
  from absl import logging  # pylint: disable=g-import-not-at-top
  state_dict = read_safetensors(_SAFETENSORS.value)
  diffusers_config = read_diffusers_config(_SAFETENSORS.value, _DIFFUSERS_CONFIG.value)
  directory = write_workdir(_CONFIG.value, state_dict, diffusers_config, _OUT.value)
  n = sum(int(np.prod(v.shape)) for v in state_dict.values())
  logging.info("converted %d tensors (%d weights) into %s", len(state_dict), n, directory)
  print(f"wrote {directory}; use it with --workdir={os.path.abspath(_OUT.value)}")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  _SAFETENSORS = flags.DEFINE_string("safetensors", None, "diffusers AutoencoderKLWan "
                                     "diffusion_pytorch_model.safetensors")
  _DIFFUSERS_CONFIG = flags.DEFINE_string("diffusers_config", None, "its config.json (default: next to it)")
  _OUT = flags.DEFINE_string("out", None, "workdir to write (<out>/vae/checkpoints)")
  _CONFIG = config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs", "vae_wan.py") + ":wan21",
                                            "sora_jax config whose `vae` receives the weights")
  flags.mark_flags_as_required(["safetensors", "out"])
  app.run(main)
