"""Process-wide CPU settings for jobs that run only VAE passes (`--mode=encode`, `tools/encode_latents.py`).

Two settings, measured on the Wan-sized VAE's chunked encode + decode (experiments/vae/README.md):
- XLA:CPU hands every convolution to YNNPACK by default; its own convolutions
  (`--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`; matmuls stay in YNNPACK) run the pass
  6-12% faster. The flag touches convolutions only, and the DiT has none.
- Those convolutions allocate their work space on every call. glibc keeps freed blocks in per-thread
  arenas and, once a large block has been freed, raises its mmap threshold, so the resident set grows with
  the number of calls (frames). A fixed threshold (`mallopt(M_MMAP_THRESHOLD, 128 KB)`, which also turns the
  raising off) hands every larger block back when it is freed: peak memory stays flat in frames.

Not for DiT training: the fixed threshold costs its CPU step about 8%, since XLA:CPU then maps the step's
temporaries afresh every step. Both settings are process-wide, so `apply_vae_pass_settings` is called by
entry points whose process does nothing else, before JAX creates its CPU backend (XLA reads its flags
then). A setting the environment already makes (`XLA_FLAGS` naming `ynn_fusion_type`, `GLIBC_TUNABLES`
naming `mmap_threshold`) is left as it is, and so is malloc when another allocator is preloaded.
"""
from __future__ import annotations

import ctypes
import os
import platform
import re
from collections.abc import MutableMapping

from absl import logging

CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3  # <malloc.h>


def _backends_initialized() -> bool:
  import jax._src.xla_bridge as xla_bridge  # pylint: disable=import-outside-toplevel
  return xla_bridge.backends_are_initialized()


def apply_vae_pass_settings(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
  """Applies the two settings to this process; returns {setting: what was done} for the log.

  `env` is the environment to read and to extend with the XLA flag (default `os.environ`).
  """
  env = os.environ if env is None else env
  done = {}
  xla_flags = env.get("XLA_FLAGS", "")
  if "ynn_fusion_type" in xla_flags:
    done["xla_flags"] = "kept (XLA_FLAGS sets ynn_fusion_type)"
  elif _backends_initialized():
    done["xla_flags"] = "not set (JAX's backends are already initialised)"
  else:
    env["XLA_FLAGS"] = f"{xla_flags} {CONV_FLAG}".strip()
    done["xla_flags"] = CONV_FLAG
  preload = env.get("LD_PRELOAD", "")
  if "mmap_threshold" in env.get("GLIBC_TUNABLES", ""):
    done["mmap_threshold"] = "kept (GLIBC_TUNABLES sets it)"
  elif any("malloc" in os.path.basename(lib) for lib in re.split(r"[:\s]+", preload) if lib):
    done["mmap_threshold"] = f"not set (another allocator is preloaded: {preload})"
  elif platform.libc_ver()[0] != "glibc":
    done["mmap_threshold"] = "not set (not glibc)"
  elif ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
    done["mmap_threshold"] = "not set (mallopt refused it)"
  else:
    done["mmap_threshold"] = str(MMAP_THRESHOLD)
  return done


def apply_for_encoding(config) -> None:
  """An encode-only entry point's call: the settings above unless `config.encode.cpu_settings` is False."""
  if config.get("encode", {}).get("cpu_settings", True):
    logging.info("VAE-pass CPU settings %s", apply_vae_pass_settings())
