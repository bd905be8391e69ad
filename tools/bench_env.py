"""Environment settings for one side of a side-by-side benchmark (`--ours_env KEY=VALUE`)."""
from __future__ import annotations

import os
import platform
from collections.abc import Iterable

# Variables a side-by-side run records for each side, besides those that --ours_env sets.
RECORDED = ("XLA_FLAGS", "GLIBC_TUNABLES", "LD_PRELOAD")


def parse_pairs(pairs: Iterable[str], flag: str = "--ours_env") -> dict[str, str]:
  """['K=V', ...] -> {K: V}; a pair without '=' or with an empty key exits with a one-line error."""
  out = {}
  for kv in pairs:
    key, sep, value = kv.partition("=")
    if not sep or not key:
      raise SystemExit(f"{flag}={kv!r}: expected KEY=VALUE")
    out[key] = value
  return out


def sides(ours_env: dict[str, str]) -> dict[str, dict[str, str]]:
  """What each side ran with: ours' variables (this process's, overridden by --ours_env) and the peer's."""
  keys = sorted({*RECORDED, *ours_env})
  base = {k: os.environ.get(k, "") for k in keys}
  return {"ours_env": {**base, **ours_env}, "peer_env": base}


def host() -> dict:
  """The CPU a run measured: model name, whether it has AVX-512, and the cores this process may use.

  Side-by-side ratios depend on it: the peer's matmuls (torch's MKL) run at about 340 GFLOP/s on 2 cores of
  the Intel hosts this project has been measured on and about 160 on the AMD EPYC ones, where sora_jax's
  XLA:CPU matmuls run at about 300 and 200 (experiments/scaling/README.md).
  """
  from sora_jax.kernels import cpu  # pylint: disable=import-outside-toplevel  (jax only when asked)
  info = cpu.cpu_info()
  return {"cpu_model": info.get("model name") or platform.machine(),
          "avx512": "avx512f" in info.get("flags", "").split(), "cores": len(os.sched_getaffinity(0))}
