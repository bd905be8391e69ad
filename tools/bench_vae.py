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
reports only that, compiling without running (a minute instead of several).
`--rounds=N` runs N rounds of the two processes per size, alternating which goes first, and reports the
median of the per-round time ratios (the machine is shared: single runs move by about 1 s in 15).
Last line: one JSON object with `time_ratio` and `peak_memory_ratio` (ours / peer, at the first size).
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
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return {"seconds": min(times), "peak_rss_mb": _pass_peak_rss_mb(), "lifetime_peak_rss_mb": _peak_rss_mb(), **out}


def run_ours(args, t, h, w) -> dict:
  settings = {}
  if args.cpu_settings:  # what sora_jax's VAE-only processes run with, applied before JAX starts
    from sora_jax import runtime  # pylint: disable=g-import-not-at-top
    settings = runtime.apply_vae_pass_settings()
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
    model = nnx.jit(lambda: vae_lib.VAE(
        base_channels=args.base, channel_mults=(1, 2, 4, 4), num_res_blocks=2,
        temporal_downsample=(False, True, True), latent_channels=16, mid_attention=True, pad_mode="zeros",
        layout=args.layout, rngs=nnx.Rngs(0)))()
  graphdef, state = nnx.split(model)
  chunk = args.chunk or None

  @jax.jit
  def encode_decode(state, x):
    m = nnx.merge(graphdef, state)
    mean, _ = m.encode(x, chunk=chunk)
    return m.decode(mean, chunk=chunk)

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


def run_peer(args, t, h, w) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderKLWan  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = AutoencoderKLWan(base_dim=args.base, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                           attn_scales=[], temperal_downsample=[False, True, True]).eval()
  x = torch.rand(1, 3, t, h, w) * 2 - 1

  def encode_decode():
    with torch.no_grad():
      mean = model.encode(x).latent_dist.mean
      return model.decode(mean).sample

  return _time(encode_decode, args.repeats, args.trim)


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
  p.add_argument("--worker", default="", help="internal: ours|peer:TxHxW")
  p.add_argument("--memory_analysis", action="store_true",
                 help="only compile ours and report XLA's memory analysis (arguments, temporaries) per size")
  args = p.parse_args()

  if args.worker:
    impl, size = args.worker.split(":")
    t, h, w = (int(v) for v in size.split("x"))
    print(json.dumps((run_ours if impl == "ours" else run_peer)(args, t, h, w)))
    return

  common = ["--base", str(args.base), "--repeats", str(args.repeats), "--chunk", str(args.chunk),
            "--layout", args.layout, "--trim", str(args.trim), "--fold_taps", args.fold_taps,
            "--cpu_settings", str(args.cpu_settings)]
  if args.memory_analysis:
    common.append("--memory_analysis")
  ours_env = bench_env.parse_pairs(args.ours_env)
  results, rounds = {}, collections.defaultdict(list)
  sides = [("ours", sys.executable), ("peer", args.ref_python)]
  for size in args.sizes.split(","):
    for r in range(args.rounds):
      # Alternate which side goes first: a neighbour's load that comes and goes then hits both alike.
      for impl, python in (sides if r % 2 == 0 else sides[::-1]):
        if not python or (impl == "peer" and args.memory_analysis):
          continue
        env = dict(os.environ, JAX_PLATFORMS="cpu", **(ours_env if impl == "ours" else {}))
        out = subprocess.run([python, __file__, "--worker", f"{impl}:{size}", *common], env=env, check=True,
                             capture_output=True, text=True).stdout
        rounds[f"{impl}/{size}"].append(json.loads(out.strip().splitlines()[-1]))
        print(f"round {r + 1}/{args.rounds}", impl, size, rounds[f"{impl}/{size}"][-1], flush=True)
  for key, runs in rounds.items():  # the median round by time stands for the side
    results[key] = sorted(runs, key=lambda x: x["seconds"])[(len(runs) - 1) // 2]
  summary = {"base": args.base, "chunk": args.chunk, "layout": args.layout, "trim": args.trim,
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
      summary[f"peak_memory_ratio/{size}"] = (float(statistics.median([o["peak_rss_mb"] for o in ours]))
                                              / float(statistics.median([q["peak_rss_mb"] for q in peer])))
  first = args.sizes.split(",")[0]
  summary["time_ratio"] = summary.get(f"time_ratio/{first}")
  summary["peak_memory_ratio"] = summary.get(f"peak_memory_ratio/{first}")
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
