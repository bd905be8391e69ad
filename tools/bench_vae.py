r"""Encode + decode time and peak memory: sora_jax's VAE vs diffusers `AutoencoderKLWan`, side by side.

  JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python tools/bench_vae.py --ref_python=/tmp/parityvenv/bin/python \
      --base=96 --sizes=17x128x128,33x128x128

Both models: random weights, Wan2.1's shape (base `--base`, mults 1/2/4/4, 2 res blocks, time halved at the
two deepest downsamples, 16 latent channels, 4x8x8); ours in `--layout=wan`, Wan2.1's exact blocks (the
default), or `--layout=default`, sora_jax's own resampling blocks (about 25% more FLOPs). Each
(implementation, size) runs in its own process; time is the best of `--repeats` after one warm-up pass
(JAX's compile excluded) and `peak_rss_mb` is the process's peak RSS during the timed passes (the high-water
mark is reset after the warm-up, so XLA's compile does not count; `lifetime_peak_rss_mb` includes it). Before
the timed passes both sides return the heap pages freed so far to the kernel (`--trim=1`, the default: glibc
keeps large freed blocks mapped, so the compiler's and the warm-up's leftovers would otherwise count as the
pass's memory); ours also reports its RSS after start-up, with weights, and after compiling. Ours runs
with the CPU settings sora_jax's VAE-only processes apply (`sora_jax/runtime.py`; `--cpu_settings=0`:
without). Ours encodes and decodes chunked (first frame alone, then one latent frame per chunk), as diffusers
does. The ref venv needs torch (CPU) and diffusers;
with `--ref_python=''` only ours runs.
Ours also reports XLA's compiled memory analysis (`xla_argument_mb`, `xla_temp_mb`); `--memory_analysis`
reports only that, compiling without running (a minute instead of several); with `--tpu_topology=v5p:2x2x1`
(or another libtpu topology name) it compiles ours for one chip of that TPU instead, on this host.
`--rounds=N` runs N rounds of the two processes per size, alternating which goes first, and reports the
median of the per-round time ratios (the machine is shared: single runs move by about 1 s in 15).
Last line: one JSON object with `time_ratio` and `peak_memory_ratio` (ours / peer, at the first size), and
`pass_memory_ratio`: the same for `pass_memory_mb`, the peak RSS of the timed passes minus the RSS just before
them, i.e. what a pass holds above the loaded model (weights, runtime and, for ours, the executable).

`--layers` says where a pass's time goes: ours' worker records the conv calls of one steady-state chunk
(encode's and decode's scan bodies, at the first size's resolution) and times each alone, the peer's worker
times the same calls in torch, and both time a matmul. Per conv class: calls per chunk, ms per call,
GFLOP/s and the ratio; `time_ratio` is then the conv time of a chunk, ours / peer:

  JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python tools/bench_vae.py --layers --sizes=17x128x128
"""
import argparse
import collections
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_env  # noqa: E402  (tools/, next to this script)


def _peak_rss_mb() -> float:
  """Lifetime peak RSS of this process (for ours it includes XLA's compile)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak_rss() -> None:
  """Restarts the kernel's high-water mark (VmHWM), so the next reading covers only the timed passes."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def _status_mb(field: str) -> float:
  """A memory field of /proc/self/status (VmRSS: now; VmHWM: peak since the last reset), in MB."""
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024.0


def _pass_peak_rss_mb() -> float:
  return _status_mb("VmHWM")


def _rss_mb() -> float:
  return _status_mb("VmRSS")


def _trim_heap() -> None:
  """Hands the allocator's freed pages back to the kernel (glibc keeps large freed blocks mapped)."""
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc: nothing to trim
    pass


def memory_ratios(ours: list[dict], peer: list[dict]) -> dict[str, float]:
  """Ours / peer, medians over rounds: of the peak RSS, and of what the passes held above the loaded model.

  `peak_memory_ratio` is the target's figure; it includes each side's runtime and fp32 weights, which a
  pass cannot shrink. `pass_memory_ratio` compares the passes' own buffers (activations, conv states,
  work space): peak RSS minus the RSS just before the timed passes.
  """
  def median(runs, key):
    return float(statistics.median([r[key] for r in runs]))
  return {"peak_memory_ratio": median(ours, "peak_rss_mb") / median(peer, "peak_rss_mb"),
          "pass_memory_ratio": median(ours, "pass_memory_mb") / median(peer, "pass_memory_mb")}


def _best_seconds(fn, repeats: int) -> float:
  """The fastest of `repeats` calls of `fn` (no warm-up)."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def _time(fn, repeats: int, trim: bool) -> dict:
  """Best-of-`repeats` seconds after one warm-up, and the peak RSS of the timed passes alone.

  With `trim`, heap pages freed before the timed passes (compiler and warm-up leftovers that glibc keeps
  mapped) go back to the kernel first, on both sides alike, so the peak counts what a pass itself holds.
  """
  fn()
  before = _rss_mb()
  if trim:
    _trim_heap()
  out = {"rss_after_warmup_mb": before, "rss_before_timed_mb": _rss_mb()}
  _reset_peak_rss()
  seconds = _best_seconds(fn, repeats)
  peak = _pass_peak_rss_mb()
  # What the passes held above the loaded model (weights, runtime, executable): their own buffers.
  return {"seconds": seconds, "peak_rss_mb": peak, "lifetime_peak_rss_mb": _peak_rss_mb(),
          "pass_memory_mb": peak - out["rss_before_timed_mb"], **out}


def _apply_ours_settings(args) -> dict:
  """What sora_jax's VAE-only processes run with (`--cpu_settings=1`), applied before JAX starts."""
  if not args.cpu_settings:
    return {}
  from sora_jax import runtime  # pylint: disable=g-import-not-at-top
  return runtime.apply_vae_pass_settings()


def _ours_vae(args):
  """Ours at Wan2.1's shape (`--base`, `--layout`); built inside `nnx.jit` or `nnx.eval_shape`."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sora_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  return vae_lib.VAE(base_channels=args.base, channel_mults=(1, 2, 4, 4), num_res_blocks=2,
                     temporal_downsample=(False, True, True), latent_channels=16, mid_attention=True,
                     pad_mode="zeros", layout=args.layout, dtype=vae_lib.INFERENCE_DTYPES[args.dtype],
                     rngs=nnx.Rngs(0))


def _run_worker(python: str, impl: str, size: str, common: list, env: dict, *extra: str) -> dict:
  """One worker process of this script (`--worker impl:size`); its last line of output, parsed."""
  out = subprocess.run([python, __file__, "--worker", f"{impl}:{size}", *common, *extra],
                       env=dict(os.environ, JAX_PLATFORMS="cpu", **env), check=True, capture_output=True,
                       text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def _encode_decode(graphdef, chunk):
  """(params, rest, pixels) -> the chunked encode + decode, as both sides run it."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def encode_decode(params, rest, x):
    m = nnx.merge(graphdef, params, rest)
    mean, _ = m.encode(x, chunk=chunk)
    return m.decode(mean, chunk=chunk)
  return encode_decode


def tpu_memory(args, t, h, w) -> dict:
  """XLA's memory analysis of ours' pass compiled for one chip of the TPU topology `--tpu_topology`
  (libtpu's compiler on this host, as tools/aot_compile.py does; nothing is allocated)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from sora_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  from sora_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  devices = topologies.get_topology_desc(platform="tpu", topology_name=args.tpu_topology).devices
  mesh = mesh_lib.make_mesh((("data", 1), ("fsdp", 1), ("context", 1), ("tensor", 1)), devices=devices[:1])
  dtype = vae_lib.INFERENCE_DTYPES[args.dtype]
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  with mesh_lib.use(mesh, mesh_lib.VAE_RULES):
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: _ours_vae(args)), nnx.Param, ...)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype, sharding=replicated), params)
    rest = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), rest)
    x = jax.ShapeDtypeStruct((1, t, h, w, 3), jnp.float32, sharding=replicated)
    ma = jax.jit(_encode_decode(graphdef, args.chunk or None)).lower(params, rest, x).compile().memory_analysis()
  return {"xla_argument_mb": ma.argument_size_in_bytes / 2**20, "xla_temp_mb": ma.temp_size_in_bytes / 2**20,
          "device_kind": devices[0].device_kind}


def run_ours(args, t, h, w) -> dict:
  if args.tpu_topology:
    return tpu_memory(args, t, h, w)
  settings = _apply_ours_settings(args)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sora_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  if args.fold_taps != "auto":  # A/B of the conv formulation: every conv per time tap, or every one folded
    vae_lib.fold_time_taps = lambda shape, pixels_per_call: args.fold_taps == "always" and shape[2] > 1
  jax.block_until_ready(jnp.zeros(()))
  stages = {"rss_runtime_mb": _rss_mb()}  # the interpreter, jax and XLA's CPU client
  with nnx.use_eager_sharding(False):
    model = nnx.jit(lambda: _ours_vae(args))()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # The weights in the compute dtype, as `train_vae.restore` reads them for `vae.inference_dtype`.
  params = jax.tree.map(lambda a: a.astype(vae_lib.INFERENCE_DTYPES[args.dtype]), params)
  del model
  state = (params, rest)
  encode_decode = jax.jit(lambda state, x: _encode_decode(graphdef, args.chunk or None)(*state, x))
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, t, h, w, 3)).astype(np.float32))
  stages["rss_with_weights_mb"] = _rss_mb()
  compiled = encode_decode.lower(state, x).compile()
  stages["rss_after_compile_mb"] = _rss_mb()
  ma = compiled.memory_analysis()
  memory = {"xla_argument_mb": ma.argument_size_in_bytes / 2**20, "xla_temp_mb": ma.temp_size_in_bytes / 2**20,
            **stages, "xla_flags": os.environ.get("XLA_FLAGS", ""), "cpu_settings": settings}
  if args.memory_analysis:
    return memory
  return {**_time(lambda: jax.block_until_ready(compiled(state, x)), args.repeats, args.trim), **memory}


def _best_ms(fn, repeats: int) -> float:
  fn()  # warm-up (and, for ours, compile)
  return _best_seconds(fn, repeats) * 1e3


def _conv_gflop(layer: dict) -> float:
  """Multiply-adds x 2 of one conv call: output elements x kernel taps x input channels."""
  kh, kw, kt, cin, cout = layer["kernel"]
  b, t_out, h_out, w_out = layer["out"][:4]
  return 2.0 * b * t_out * h_out * w_out * cout * kh * kw * kt * cin / 1e9


def _layer_key(layer: dict) -> str:
  kh, kw, kt, cin, cout = layer["kernel"]
  _, tp, h, w, _ = layer["x"]
  return f"{cin}->{cout} k{kt}x{kh}x{kw} s{'x'.join(map(str, layer['strides']))} in {tp}x{h}x{w}"


def ours_layers(args, t, h, w) -> dict:
  """The conv calls of one steady-state chunk (encode's and decode's scan bodies), each timed alone.

  Chunks of one latent frame (`--chunk` does not apply). The calls are recorded from traces of the chunked
  encode + decode at `1 + temporal_stride` frames (frame 0, then one chunk) and at one frame: the
  difference is what every further chunk runs, whatever `t` is. Each distinct call is then jitted alone as
  `vae.conv3d_time_valid` runs it in the model, and timed best of `--repeats` after a warm-up.
  """
  _apply_ours_settings(args)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sora_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: _ours_vae(args))
  conv = vae_lib.conv3d_time_valid
  calls = []

  def record(x, kernel, strides=(1, 1, 1), spatial_pad=None, frames_per_call=None):
    y = conv(x, kernel, strides, spatial_pad, frames_per_call)
    calls.append(json.dumps({"x": list(x.shape), "kernel": list(kernel.shape), "strides": list(strides),
                             "spatial_pad": None if spatial_pad is None else [list(p) for p in spatial_pad],
                             "out": list(y.shape)}))
    return y

  def trace(frames):
    calls.clear()
    x = jax.ShapeDtypeStruct((1, frames, h, w, 3), jnp.float32)
    graphdef, state = nnx.split(model)

    def encode_decode(state, x):
      m = nnx.merge(graphdef, state)
      return m.decode(m.encode(x, chunk=1)[0], chunk=1)

    jax.eval_shape(encode_decode, state, x)
    return collections.Counter(calls)

  vae_lib.conv3d_time_valid = record
  try:
    body = trace(1 + model.temporal_stride) - trace(1)
  finally:
    vae_lib.conv3d_time_valid = conv
  layers, rng = [], np.random.default_rng(0)
  for call, count in sorted(body.items()):
    layer = json.loads(call)
    x = jnp.asarray(rng.standard_normal(layer["x"], np.float32))
    kernel = jnp.asarray(rng.standard_normal(layer["kernel"], np.float32) * 0.05)
    pad = None if layer["spatial_pad"] is None else tuple(tuple(p) for p in layer["spatial_pad"])
    fn = jax.jit(lambda x, k, s=tuple(layer["strides"]), p=pad: conv(x, k, s, p))
    layer["ms"] = _best_ms(lambda fn=fn, x=x, k=kernel: jax.block_until_ready(fn(x, k)), args.repeats)
    layers.append({**layer, "count": count})
  return {"layers": layers}


def peer_layers(args, layers: list) -> dict:
  """The same conv calls in torch, as diffusers' Wan VAE runs them: the spatial padding applied first
  (`F.pad`), then `conv3d` (`conv2d` over the frames for a conv with one time tap, its upsampling convs)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  out = []
  for layer in layers:
    kh, kw, kt, cin, cout = layer["kernel"]
    b, tp, h, w, _ = layer["x"]
    pad = layer["spatial_pad"] or [[(kh - 1) // 2] * 2, [(kw - 1) // 2] * 2]
    st, sh, sw = layer["strides"]
    bias = torch.zeros(cout)
    if kt == 1 and st == 1 and (kh, kw) != (1, 1):
      x = F.pad(torch.randn(b * tp, cin, h, w), (*pad[1], *pad[0]))
      weight = torch.randn(cout, cin, kh, kw) * 0.05
      fn = lambda x=x, k=weight, s=(sh, sw): F.conv2d(x, k, bias, s)  # noqa: E731
    else:
      x = F.pad(torch.randn(b, cin, tp, h, w), (*pad[1], *pad[0]))
      weight = torch.randn(cout, cin, kt, kh, kw) * 0.05
      fn = lambda x=x, k=weight, s=(st, sh, sw): F.conv3d(x, k, bias, s)  # noqa: E731
    with torch.no_grad():
      out.append({**layer, "ms": _best_ms(fn, args.repeats)})
  return {"layers": out}


def _matmul_gflops(impl: str, repeats: int) -> float:
  """GFLOP/s of a 2048 x 3456 x 384 fp32 matmul (a deep conv's per-frame im2col size) on this side."""
  m, k, n = 2048, 3456, 384
  if impl == "peer":
    import torch  # pylint: disable=g-import-not-at-top
    a, b = torch.randn(m, k), torch.randn(k, n)
    ms = _best_ms(lambda: a @ b, repeats)
  else:
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    a, b = jnp.ones((m, k)), jnp.ones((k, n))
    f = jax.jit(jnp.matmul)
    ms = _best_ms(lambda: jax.block_until_ready(f(a, b)), repeats)
  return 2.0 * m * k * n / ms / 1e6


def compare_layers(ours: list, peer: list) -> dict:
  """Per conv class of a chunk: count, ms per call on each side, the time ratio and ours' GFLOP/s."""
  rows, totals = {}, {"ours": 0.0, "peer": 0.0}
  for o, q in zip(ours, peer):
    gflop = _conv_gflop(o)
    rows[_layer_key(o)] = {"count": o["count"], "ours_ms": round(o["ms"], 2), "peer_ms": round(q["ms"], 2),
                           "time_ratio": round(o["ms"] / q["ms"], 3),
                           "ours_gflops": round(gflop / o["ms"] * 1e3, 1),
                           "peer_gflops": round(gflop / q["ms"] * 1e3, 1)}
    totals["ours"] += o["count"] * o["ms"]
    totals["peer"] += q["count"] * q["ms"]
  return {"layers": rows, "conv_ms_per_chunk": {k: round(v, 1) for k, v in totals.items()},
          "conv_time_ratio": totals["ours"] / totals["peer"]}


def run_peer(args, t, h, w) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderKLWan  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  dtype = getattr(torch, args.ref_dtype or args.dtype)
  model = AutoencoderKLWan(base_dim=args.base, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                           attn_scales=[], temperal_downsample=[False, True, True]).eval().to(dtype)
  x = (torch.rand(1, 3, t, h, w) * 2 - 1).to(dtype)

  def encode_decode():
    with torch.no_grad():
      mean = model.encode(x).latent_dist.mean
      return model.decode(mean).sample

  return _time(encode_decode, args.repeats, args.trim)


def layers_summary(args, common: list, ours_env: dict) -> dict:
  """--layers: ours' worker records and times a chunk's conv calls, then the peer's times the same calls."""
  size = args.sizes.split(",")[0]
  common = [*common, "--repeats", str(max(args.repeats, 5))]  # the last --repeats wins
  ours = _run_worker(sys.executable, "ours_layers", size, common, ours_env)
  summary = {"base": args.base, "layout": args.layout, "size": size, "cpu_settings": args.cpu_settings,
             "host": bench_env.host(), **bench_env.sides(ours_env),
             "ours_matmul_gflops": round(ours["matmul_gflops"], 1)}
  if not args.ref_python:
    return {**summary, "layers": {_layer_key(o): {"count": o["count"], "ours_ms": round(o["ms"], 2)}
                                  for o in ours["layers"]},
            "conv_ms_per_chunk": {"ours": round(sum(o["count"] * o["ms"] for o in ours["layers"]), 1)},
            "time_ratio": None}
  with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
    json.dump(ours["layers"], f)
    f.flush()
    peer = _run_worker(args.ref_python, "peer_layers", size, common, {}, "--layer_file", f.name)
  compared = compare_layers(ours["layers"], peer["layers"])
  for key, row in compared["layers"].items():
    print(f"{key:44s} x{row['count']:<3d} ours {row['ours_ms']:8.2f} ms ({row['ours_gflops']:6.1f} GFLOP/s)  "
          f"peer {row['peer_ms']:8.2f} ms ({row['peer_gflops']:6.1f})  ratio {row['time_ratio']:.2f}", flush=True)
  return {**summary, "peer_matmul_gflops": round(peer["matmul_gflops"], 1), **compared,
          "time_ratio": compared["conv_time_ratio"]}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--base", type=int, default=96)
  p.add_argument("--sizes", default="17x128x128,33x128x128")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--rounds", type=int, default=1,
                 help="alternating rounds of (ours, peer) processes per size; ratios are medians over rounds")
  p.add_argument("--chunk", type=int, default=1, help="latent frames per chunk (0: full pass)")
  p.add_argument("--layout", default="wan", choices=["wan", "default"],
                 help="ours: 'wan' is Wan2.1's exact architecture (the peer's); 'default' is sora_jax's own")
  p.add_argument("--fold_taps", default="auto", choices=["auto", "never", "always"],
                 help="ours: 'auto' folds the time taps of wide low-resolution convs into one conv "
                 "(vae.fold_time_taps); 'never' runs every conv one 2D conv per tap, 'always' folds every one "
                 "(for A/B)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="ours' weights and activations (what `vae.inference_dtype` sets for encode / decode)")
  p.add_argument("--ref_dtype", default="", choices=["", "float32", "bfloat16"],
                 help="the peer's weights and activations (`model.to(dtype)`); '' : the same as --dtype")
  p.add_argument("--ref_python", default="/tmp/parityvenv/bin/python")
  p.add_argument("--trim", type=int, default=1, help="1: return freed heap pages to the kernel after the warm-up, "
                 "on both sides, before the peak RSS of the timed passes is taken; 0: as left by the warm-up")
  p.add_argument("--cpu_settings", type=int, default=1,
                 help="1: ours' worker runs with the settings of sora_jax's VAE-only processes (--mode=encode, "
                 "tools/encode_latents.py; sora_jax/runtime.py: XLA's own convolutions, a fixed mmap "
                 "threshold); 0: the runtime's defaults")
  p.add_argument("--ours_env", action="append", default=[], metavar="KEY=VALUE",
                 help="environment variable set for ours' worker only (repeatable), e.g. XLA_FLAGS or "
                      "GLIBC_TUNABLES; the peer keeps this process's")
  p.add_argument("--layers", action="store_true",
                 help="instead of whole passes, time each conv call of one steady-state chunk alone on both "
                 "sides, at the first size's resolution (best of max(--repeats, 5)), with each side's matmul "
                 "GFLOP/s; the last line's `time_ratio` is then the conv time of a chunk, ours / peer")
  p.add_argument("--layer_file", default="", help="internal: the conv calls ours recorded, for the peer")
  p.add_argument("--worker", default="", help="internal: ours|peer|ours_layers|peer_layers:TxHxW")
  p.add_argument("--memory_analysis", action="store_true",
                 help="only compile ours and report XLA's memory analysis (arguments, temporaries) per size")
  p.add_argument("--tpu_topology", default="",
                 help="with --memory_analysis: compile ours for one chip of this TPU topology instead (e.g. "
                 "v5p:2x2x1; needs libtpu, `pip install -e .[tpu]`)")
  args = p.parse_args()

  if args.worker:
    impl, size = args.worker.split(":")
    t, h, w = (int(v) for v in size.split("x"))
    if impl == "ours_layers":
      out = {**ours_layers(args, t, h, w), "matmul_gflops": _matmul_gflops("ours", args.repeats)}
    elif impl == "peer_layers":
      with open(args.layer_file) as f:
        out = {**peer_layers(args, json.load(f)), "matmul_gflops": _matmul_gflops("peer", args.repeats)}
    else:
      out = (run_ours if impl == "ours" else run_peer)(args, t, h, w)
    print(json.dumps(out))
    return

  common = ["--base", str(args.base), "--repeats", str(args.repeats), "--chunk", str(args.chunk),
            "--layout", args.layout, "--trim", str(args.trim), "--fold_taps", args.fold_taps,
            "--cpu_settings", str(args.cpu_settings), "--dtype", args.dtype, "--ref_dtype", args.ref_dtype]
  if args.tpu_topology and not args.memory_analysis:
    p.error("--tpu_topology compiles without running: add --memory_analysis")
  if args.memory_analysis:
    common += ["--memory_analysis", "--tpu_topology", args.tpu_topology]
  ours_env = bench_env.parse_pairs(args.ours_env)
  if args.layers:
    print(json.dumps(layers_summary(args, common, ours_env)))
    return
  results, rounds = {}, collections.defaultdict(list)
  sides = [("ours", sys.executable), ("peer", args.ref_python)]
  for size in args.sizes.split(","):
    for r in range(args.rounds):
      # Alternate which side goes first: a neighbour's load that comes and goes then hits both alike.
      for impl, python in (sides if r % 2 == 0 else sides[::-1]):
        if not python or (impl == "peer" and args.memory_analysis):
          continue
        rounds[f"{impl}/{size}"].append(
            _run_worker(python, impl, size, common, ours_env if impl == "ours" else {}))
        print(f"round {r + 1}/{args.rounds}", impl, size, rounds[f"{impl}/{size}"][-1], flush=True)
  for key, runs in rounds.items():  # the median round by time stands for the side
    results[key] = sorted(runs, key=lambda x: x.get("seconds", 0.0))[(len(runs) - 1) // 2]
  summary = {"base": args.base, "chunk": args.chunk, "layout": args.layout, "trim": args.trim,
             "dtype": args.dtype, "ref_dtype": args.ref_dtype or args.dtype,
             "fold_taps": args.fold_taps, "cpu_settings": args.cpu_settings, "rounds": args.rounds,
             "host": bench_env.host(),
             **bench_env.sides(ours_env),
             "runs": results}
  for size in args.sizes.split(","):
    if f"peer/{size}" in results:
      ours, peer = rounds[f"ours/{size}"], rounds[f"peer/{size}"]
      per_round = [o["seconds"] / q["seconds"] for o, q in zip(ours, peer)]
      summary[f"time_ratio/{size}"] = float(statistics.median(per_round))
      summary[f"time_ratio_rounds/{size}"] = per_round
      for name, value in memory_ratios(ours, peer).items():
        summary[f"{name}/{size}"] = value
  first = args.sizes.split(",")[0]
  for name in ("time_ratio", "peak_memory_ratio", "pass_memory_ratio"):
    summary[name] = summary.get(f"{name}/{first}")
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
