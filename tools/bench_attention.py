"""Benchmarks the attention backends on the local device.

  JAX_PLATFORMS=cpu .venv/bin/python tools/bench_attention.py

1. Speed: xla vs blockwise vs cpu_flash, forward and forward+backward, jitted and warm, at
   B=2, L=1280, H=6, D=64 float32 (one segment per row plus some padding).
2. Packing: blockwise vs cpu_flash with 1, 4 and 16 equal samples packed per row (a query sees only its
   own sample), timed in alternation: cpu_flash skips the tiles whose segments cannot meet, blockwise
   computes every block and masks it.
3. Memory: compiled temp bytes (`memory_analysis().temp_size_in_bytes`, nothing
   is run) of each backend, forward and forward+backward, at B=1, H=6,
   D=64 and L = 4k, 8k, 16k, 32k. cpu_flash's own scratch (keys and values packed per head) is allocated
   inside the kernel and is not in these figures: B H L D floats x 2 in the forward, one head's
   worth x 5 per thread in the backward.
The last line printed is one JSON object with all figures.
"""
import json
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sora_jax.kernels import cpu as cpu_kernels  # noqa: E402
from sora_jax.models.attention import attention  # noqa: E402

BACKENDS = ("xla", "blockwise") + (("cpu_flash",) if cpu_kernels.available() else ())


def _fns(backend, seg):
  fwd = lambda q, k, v: attention(q, k, v, seg, seg, backend=backend)
  loss = lambda q, k, v: jnp.sum(fwd(q, k, v))
  return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _time(f, *args, reps=5):
  jax.block_until_ready(f(*args))
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    best = min(best, time.perf_counter() - t)
  return best


def bench_speed(b=2, length=1280, h=6, d=64):
  rng = np.random.RandomState(0)
  q, k, v = (jnp.asarray(rng.randn(b, length, h, d), jnp.float32) for _ in range(3))
  seg = np.ones((b, length), np.int32)
  seg[:, length - 64:] = 0  # Some padding, as in packed rows.
  seg = jnp.asarray(seg)
  flops = 4 * b * h * length * length * d  # QK^T and PV matmuls.
  res = {}
  for backend in BACKENDS:
    fwd, grad = _fns(backend, seg)
    t_fwd, t_grad = _time(fwd, q, k, v), _time(grad, q, k, v)
    # Backward is ~2.5x the forward matmul flops (dV, dP, dQ, dK).
    res[backend] = {"fwd_ms": round(t_fwd * 1e3, 1), "fwd_bwd_ms": round(t_grad * 1e3, 1),
                    "fwd_gflops": round(flops / t_fwd / 1e9, 1),
                    "fwd_bwd_gflops": round(3.5 * flops / t_grad / 1e9, 1)}
    print(f"speed {backend:9s} L={length}: {res[backend]}", flush=True)
  return res


def bench_packing(segments=(1, 4, 16), b=2, length=1280, h=6, d=64, rounds=5):
  rng = np.random.RandomState(0)
  q, k, v = (jnp.asarray(rng.randn(b, length, h, d), jnp.float32) for _ in range(3))
  cases = {}
  for n in segments:
    seg = jnp.asarray(np.repeat(np.arange(1, n + 1), length // n)[None].repeat(b, 0), jnp.int32)
    for backend in (x for x in BACKENDS if x != "xla"):
      fwd, grad = _fns(backend, seg)
      jax.block_until_ready((fwd(q, k, v), grad(q, k, v)))
      cases[(n, backend)] = (fwd, grad, [], [])
  for _ in range(rounds):  # alternating, so every case sees the same machine
    for fwd, grad, tf, tg in cases.values():
      tf.append(_time(fwd, q, k, v, reps=1))
      tg.append(_time(grad, q, k, v, reps=1))
  res = {}
  for (n, backend), (_, _, tf, tg) in cases.items():
    row = {"fwd_ms": round(statistics.median(tf) * 1e3, 1), "fwd_bwd_ms": round(statistics.median(tg) * 1e3, 1)}
    res.setdefault(f"{n}x{length // n}", {})[backend] = row
    print(f"packing {n:2d} samples of {length // n:4d} tokens, {backend:9s}: {row}", flush=True)
  return res


def bench_memory(lengths=(4096, 8192, 16384, 32768), b=1, h=6, d=64):
  res = {}
  for backend in BACKENDS:
    for length in lengths:
      spec = jax.ShapeDtypeStruct((b, length, h, d), jnp.float32)
      seg = jnp.ones((b, length), jnp.int32)
      fwd, grad = _fns(backend, seg)
      row = {}
      for name, f in (("fwd", fwd), ("fwd_bwd", grad)):
        mem = f.lower(spec, spec, spec).compile().memory_analysis()
        row[name + "_temp_mib"] = round(mem.temp_size_in_bytes / 2**20, 1)
      res.setdefault(backend, {})[str(length)] = row
      print(f"memory {backend:9s} L={length}: {row}", flush=True)
  return res


def main():
  out = {"device": jax.devices()[0].device_kind, "speed": bench_speed(), "packing": bench_packing(),
         "memory": bench_memory()}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
