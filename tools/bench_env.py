"""Environment settings for one side of a side-by-side benchmark (`--ours_env KEY=VALUE`)."""
from __future__ import annotations

import os
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
