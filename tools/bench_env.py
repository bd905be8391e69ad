"""Environment settings for one side of a side-by-side benchmark (`--ours_env KEY=VALUE`)."""
from __future__ import annotations

import os
import platform
import sysconfig
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


# mimalloc's settings when preloaded, as `make demo` runs: freed pages stay mapped, on 2 MB pages.
MIMALLOC_SETTINGS = {"MIMALLOC_PURGE_DELAY": "-1", "MIMALLOC_ALLOW_LARGE_OS_PAGES": "1"}


def _mimalloc_dir() -> str:
  """Where the cmeel-mimalloc wheel puts its library in this interpreter's environment."""
  return os.path.join(sysconfig.get_paths()["purelib"], "cmeel.prefix", "lib")


def mimalloc_path() -> str | None:
  """libmimalloc.so from the cmeel-mimalloc wheel (`make venv` installs it), or None."""
  path = os.path.join(_mimalloc_dir(), "libmimalloc.so")
  return path if os.path.isfile(path) else None


def allocator_env(name: str) -> dict[str, str]:
  """Environment that gives ours' worker the allocator `name`.

  'mimalloc' preloads it as `make demo` does (XLA:CPU frees a step's temporary block at the end of every step,
  and glibc returns a block that large to the kernel, so each step faults it in again), 'system' keeps the
  C library's malloc, 'auto' is mimalloc when it is installed and the system's otherwise.
  """
  if name not in ("auto", "mimalloc", "system"):
    raise SystemExit(f"--ours_allocator={name!r}: expected auto, mimalloc or system")
  path = mimalloc_path() if name != "system" else None
  if path is None and name == "mimalloc":
    raise SystemExit(f"--ours_allocator=mimalloc: no libmimalloc.so under {_mimalloc_dir()} "
                     "(pip install cmeel-mimalloc)")
  return {"LD_PRELOAD": path, **MIMALLOC_SETTINGS} if path else {}


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
