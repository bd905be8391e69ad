"""Builds sora_jax's C++ kernels for XLA:CPU on first use and registers them as FFI targets.

The sources ship inside the package. The first call compiles them with the host's C++ compiler (`$CXX`,
default `g++`) for the host's CPU (`-march=native`, or `$SORA_JAX_KERNEL_ARCH`) into a cache directory
(`$SORA_JAX_KERNEL_CACHE`, default `~/.cache/sora_jax/kernels`). The file name carries a hash of the
source, the flags, the CPU's model and feature flags and the jax version, so a shared home directory serves
machines of different kinds and a changed source rebuilds. The build writes to a temporary file and renames
it, so processes that start together (several hosts, test workers) never load a half-written library.

`load()` raises `KernelUnavailable` with a one-line reason (no compiler, compile error, not x86-64/aarch64);
`available()` answers the same question without raising, for callers that can fall back to XLA.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import jax
from absl import logging

SOURCE = Path(__file__).with_name("flash_attention_cpu.cc")
# FFI target names registered for the CPU platform.
FLASH_FORWARD = "sora_jax_flash_attention_forward"
FLASH_BACKWARD = "sora_jax_flash_attention_backward"
# The same with q and k RMS-normalised and rotated inside the kernel (attention.QKNormRope).
FLASH_NORM_ROPE_FORWARD = "sora_jax_flash_attention_norm_rope_forward"
FLASH_NORM_ROPE_BACKWARD = "sora_jax_flash_attention_norm_rope_backward"
# Exported handler symbols in SOURCE, by target name.
_SYMBOLS = {FLASH_FORWARD: "SoraJaxFlashForward", FLASH_BACKWARD: "SoraJaxFlashBackward",
            FLASH_NORM_ROPE_FORWARD: "SoraJaxFlashNormRopeForward",
            FLASH_NORM_ROPE_BACKWARD: "SoraJaxFlashNormRopeBackward"}


class KernelUnavailable(RuntimeError):
  """The CPU kernels could not be built or loaded on this machine."""


def cache_dir() -> Path:
  if os.environ.get("SORA_JAX_KERNEL_CACHE"):
    return Path(os.environ["SORA_JAX_KERNEL_CACHE"])
  try:
    return Path.home() / ".cache" / "sora_jax" / "kernels"
  except RuntimeError:  # no home directory (some batch systems)
    return Path(tempfile.gettempdir()) / "sora_jax_kernels"


def _compiler() -> str:
  cxx = os.environ.get("CXX", "g++")
  if shutil.which(cxx) is None:
    raise KernelUnavailable(f"no C++ compiler {cxx!r} on PATH (set $CXX) to build {SOURCE.name}")
  return cxx


def _flags() -> list[str]:
  # $SORA_JAX_KERNEL_ARCH (default native) picks the instruction set, e.g. x86-64-v3 (AVX2) for a cache
  # shared by machines of different kinds.
  arch = os.environ.get("SORA_JAX_KERNEL_ARCH") or "native"
  # -fno-signed-zeros lets `vf{} + x` be a plain broadcast (the tile loops' hot instruction otherwise).
  return ["-O3", f"-march={arch}", "-std=c++17", "-ffp-contract=fast", "-fno-math-errno", "-fno-signed-zeros",
          "-shared", "-fPIC", "-isystem", jax.ffi.include_dir()]


def cpu_info() -> dict[str, str]:
  """The first processor's fields in /proc/cpuinfo ("model name", "flags", ...); {} where it cannot be read."""
  info = {}
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if not line.strip():  # the first processor's block is enough
          if info:
            break
          continue
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  return info


def _cpu_signature() -> str:
  """Model name and feature flags of this CPU (what -march=native compiles for)."""
  info = cpu_info()
  keep = ("model name", "flags", "Features", "CPU implementer", "CPU part")
  return platform.machine() + "".join(f"{k}: {info[k]}\n" for k in keep if k in info)


def library_path() -> Path:
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), " ".join(_flags()).encode(), _cpu_signature().encode(),
               jax.__version__.encode()):
    key.update(part)
  return cache_dir() / f"{SOURCE.stem}-{key.hexdigest()[:16]}.so"


def build() -> Path:
  """Compiles SOURCE into the cache unless already there; returns the library's path."""
  path = library_path()
  if path.exists():
    return path
  if platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
    raise KernelUnavailable(f"the CPU kernels are not built for machine {platform.machine()!r}")
  cxx = _compiler()
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
  except OSError as e:
    raise KernelUnavailable(f"cannot write the kernel cache {path.parent} (set $SORA_JAX_KERNEL_CACHE): {e}") from e
  os.close(fd)
  start = time.time()
  try:
    proc = subprocess.run([cxx, *_flags(), str(SOURCE), "-o", tmp], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
      errors = [l for l in proc.stderr.splitlines() if "error" in l] or proc.stderr.splitlines() or ["?"]
      raise KernelUnavailable(f"{cxx} failed on {SOURCE.name}: {errors[0].strip()}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  logging.info("Built %s in %.1f s: %s", SOURCE.name, time.time() - start, path)
  return path


@functools.cache
def load() -> Path:
  """Builds (once per machine kind and source) and registers the FFI targets; returns the library path."""
  path = build()
  try:
    lib = ctypes.cdll.LoadLibrary(str(path))
  except OSError as e:
    raise KernelUnavailable(f"cannot load {path}: {e}") from e
  for target, symbol in _SYMBOLS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return path


@functools.cache
def available() -> bool:
  """Whether `load()` succeeds here; logs the reason once when it does not."""
  try:
    load()
    return True
  except KernelUnavailable as e:
    logging.warning("CPU kernels unavailable, attention falls back to XLA: %s", e)
    return False
