r"""Side-by-side timing of causal-conv formulations inside the demo VAE's train step (fwd + bwd).

  JAX_PLATFORMS=cpu PYTHONPATH=. python tools/bench_vae_conv.py --base_channels=16 --batch=8 --repeats=5
  JAX_PLATFORMS=cpu PYTHONPATH=. python tools/bench_vae_conv.py --candidates=taps_per_frame --patch_size=2

Each candidate replaces `vae.conv3d_time_valid` for the whole model; rounds interleave the candidates so machine
noise hits all of them alike. Last line: one JSON object {candidate: median seconds per step, ...}.
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sora_jax.models import vae as vae_lib


def _dhwio(kernel):
  """The stored kernel [kh, kw, kt, cin, cout] in XLA's 3D layout [kt, kh, kw, cin, cout]."""
  return jnp.transpose(kernel, (2, 0, 1, 3, 4))


def _pad(x, kernel):
  """Spatial 'same' padding; time arrives already causally padded (vae.CausalConv3d does it)."""
  kh, kw = kernel.shape[:2]
  return jnp.pad(x, ((0, 0), (0, 0), ((kh - 1) // 2,) * 2, ((kw - 1) // 2,) * 2, (0, 0)))


def conv3d_xla(x, kernel, strides=(1, 1, 1)):
  """XLA's 3D convolution."""
  return jax.lax.conv_general_dilated(_pad(x, kernel), _dhwio(kernel).astype(x.dtype), tuple(strides), "VALID",
                                      dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def im2col(x, kernel, strides=(1, 1, 1)):
  """All kt*kh*kw taps as shifted views concatenated on channels, then one matmul."""
  k3 = _dhwio(kernel)
  kt, kh, kw, cin, cout = k3.shape
  st, sh, sw = strides
  xp = _pad(x, kernel)
  _, tp, hp, wp, _ = xp.shape
  to, ho, wo = (tp - kt) // st + 1, (hp - kh) // sh + 1, (wp - kw) // sw + 1
  taps = [xp[:, i:i + st * (to - 1) + 1:st, j:j + sh * (ho - 1) + 1:sh, k:k + sw * (wo - 1) + 1:sw]
          for i in range(kt) for j in range(kh) for k in range(kw)]
  cols = jnp.concatenate(taps, axis=-1) if len(taps) > 1 else taps[0]
  return cols @ k3.reshape(kt * kh * kw * cin, cout).astype(x.dtype)


def im2col_hw(x, kernel, strides=(1, 1, 1)):
  """Spatial taps concatenated (kh*kw*cin), a matmul per time tap, summed."""
  k3 = _dhwio(kernel)
  kt, kh, kw, cin, cout = k3.shape
  st, sh, sw = strides
  xp = _pad(x, kernel)
  _, tp, hp, wp, _ = xp.shape
  to, ho, wo = (tp - kt) // st + 1, (hp - kh) // sh + 1, (wp - kw) // sw + 1
  cols = jnp.concatenate([xp[:, :, j:j + sh * (ho - 1) + 1:sh, k:k + sw * (wo - 1) + 1:sw]
                          for j in range(kh) for k in range(kw)], axis=-1)
  k2 = k3.reshape(kt, kh * kw * cin, cout).astype(x.dtype)
  return sum(cols[:, i:i + st * (to - 1) + 1:st] @ k2[i] for i in range(kt))


def fold_time_2d(x, kernel, strides=(1, 1, 1), spatial_pad=None):
  """The kt time-shifted frame stacks concatenated on channels, one 2D conv over [B*T', H, W]."""
  kh, kw, kt, cin, cout = kernel.shape
  st, sh, sw = strides
  b, tp, h, w, _ = x.shape
  t_out = (tp - kt) // st + 1
  xf = jnp.concatenate([x[:, i:i + st * (t_out - 1) + 1:st] for i in range(kt)], axis=-1)
  if spatial_pad is None:
    spatial_pad = (((kh - 1) // 2,) * 2, ((kw - 1) // 2,) * 2)
  y = jax.lax.conv_general_dilated(xf.reshape(b * t_out, h, w, kt * cin), kernel.reshape(kh, kw, kt * cin, cout),
                                   (sh, sw), [tuple(p) for p in spatial_pad],
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y.reshape(b, t_out, *y.shape[1:])


def fold_per_frame(x, kernel, strides=(1, 1, 1), spatial_pad=None):
  """`fold_time_2d` one output frame at a time (no kernel slices: the folded kernel is a reshape)."""
  st, kt = strides[0], kernel.shape[2]
  t_out = (x.shape[1] - kt) // st + 1
  return jnp.concatenate([fold_time_2d(x[:, j * st:j * st + kt], kernel, strides, spatial_pad)
                          for j in range(t_out)], axis=1)


_TAPS = vae_lib.conv3d_time_valid  # candidates swap the module attribute; this keeps the original


def taps_all_frames(x, kernel, strides=(1, 1, 1), spatial_pad=None):
  """vae.py's formulation with every output frame in one call (its accelerator grouping; per tap unless
  `vae.fold_time_taps` folds)."""
  t_out = (x.shape[1] - kernel.shape[2]) // strides[0] + 1
  return _TAPS(x, kernel, strides, spatial_pad, frames_per_call=t_out)


CANDIDATES = {
    # vae.py's formulation on CPU: a frame per call, per time tap except where `vae.fold_time_taps` folds
    # them (wide convs at low resolution, whose kernel slices would outgrow their input).
    "taps_per_frame": _TAPS,
    "taps_all_frames": taps_all_frames,
    "fold_time_2d": fold_time_2d,
    "fold_per_frame": fold_per_frame,
    "xla_conv3d": conv3d_xla,
    "im2col": im2col,
    "im2col_hw": im2col_hw,
}


def _load_config(spec):
  """`path.py[:arg]` -> that module's `get_config(arg)`, as the launcher's --config flag reads it."""
  import importlib.util
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def make_step(conv_fn, args, dtype):
  orig = vae_lib.conv3d_time_valid
  vae_lib.conv3d_time_valid = conv_fn
  try:
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh), nnx.use_eager_sharding(False):
      model = nnx.jit(lambda: vae_lib.from_config(_load_config(args.config).vae, rngs=nnx.Rngs(0), dtype=dtype)
                      if args.config else vae_lib.VAE(
          base_channels=args.base_channels, channel_mults=(1, 2, 4), num_res_blocks=1,
          temporal_downsample=(True, True), latent_channels=4, dtype=dtype,
          patch_size=args.patch_size,
          # Patchified pixels already did one spatial /2: keep the total stride at 4.
          spatial_downsample=(True, False) if args.patch_size == 2 else None,
          rngs=nnx.Rngs(0)))()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(1e-4)
    opt_state = tx.init(params)

    def loss_fn(params, x, rng):
      recon, mean, logvar = nnx.merge(graphdef, params, rest)(x, rng=rng)
      return jnp.mean(jnp.abs(recon - x)) + 1e-6 * vae_lib.kl_loss(mean, logvar)

    @jax.jit
    def step(params, opt_state, x, rng):
      grads = jax.grad(loss_fn)(params, x, rng)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    x = jax.random.uniform(jax.random.key(0), (args.batch, args.frames, args.res, args.res, 3), minval=-1, maxval=1)
    rng = jax.random.key(1)
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, x, rng).compile()
    compile_s = time.perf_counter() - t0
  finally:
    vae_lib.conv3d_time_valid = orig
  flops = compiled.cost_analysis().get("flops", float("nan"))
  return compiled, (params, opt_state, x, rng), flops, compile_s


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--base_channels", type=int, default=16)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--res", type=int, default=32)
  p.add_argument("--patch_size", type=int, default=1)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--candidates", default=",".join(CANDIDATES))
  p.add_argument("--bf16", action="store_true")
  p.add_argument("--config", default="", help="build the VAE of this config (path.py[:arg]) instead of the "
                 "fixed one; --base_channels and --patch_size then do not apply")
  p.add_argument("--frames", type=int, default=9)
  args = p.parse_args()
  dtype = jnp.bfloat16 if args.bf16 else jnp.float32
  runs = {}
  for name in args.candidates.split(","):
    compiled, inputs, flops, compile_s = make_step(CANDIDATES[name], args, dtype)
    runs[name] = (compiled, inputs, flops, [], compile_s)
    jax.block_until_ready(compiled(*inputs))  # warm-up
  for _ in range(args.repeats):
    for name, (compiled, inputs, _, times, _) in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*inputs))
      times.append(time.perf_counter() - t0)
  result = {}
  for name, (_, _, flops, times, compile_s) in runs.items():
    med = float(np.median(times))
    result[name] = {"seconds": round(med, 4), "xla_gflops_per_s": round(flops / med / 1e9, 1),
                    "compile_seconds": round(compile_s, 1)}
    print(name, result[name], flush=True)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
