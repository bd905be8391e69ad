"""The VAE-pass process settings: the XLA flag goes into the environment and glibc's threshold stays fixed."""
import os
import subprocess
import sys

import pytest

from sora_jax import runtime

# Frees an 8 MB block (which makes glibc raise its dynamic mmap threshold to 8 MB), then asks for 1 MB and
# prints whether glibc served it by mmap (bit 2 of the chunk's size word).
_PROBE = r"""
import ctypes, sys
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
if sys.argv[1] == "apply":
  from sora_jax import runtime
  print(runtime.apply_vae_pass_settings({})["mmap_threshold"])
libc.free(libc.malloc(8 << 20))
p = libc.malloc(1 << 20)
print("mmapped" if ctypes.c_size_t.from_address(p - 8).value & 2 else "heap")
"""


def _probe(mode):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env, capture_output=True, text=True,
                       check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout
  return out.split()


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="glibc probe")
def test_fixed_mmap_threshold_keeps_freed_work_space_out_of_the_heap():
  # glibc's default: after a large free, a 1 MB block comes from the heap (and stays resident once freed).
  assert _probe("default") == ["heap"]
  assert _probe("apply") == [str(runtime.MMAP_THRESHOLD), "mmapped"]


def test_conv_flag_is_appended_before_the_backend_starts(monkeypatch):
  monkeypatch.setattr(runtime, "_backends_initialized", lambda: False)
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1"}
  done = runtime.apply_vae_pass_settings(env)
  assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 " + runtime.CONV_FLAG
  assert done == {"xla_flags": runtime.CONV_FLAG, "mmap_threshold": "kept (GLIBC_TUNABLES sets it)"}


def test_settings_the_user_made_are_kept(monkeypatch):
  monkeypatch.setattr(runtime, "_backends_initialized", lambda: False)
  env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=", "LD_PRELOAD": "/x/libmimalloc.so"}
  done = runtime.apply_vae_pass_settings(env)
  assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="
  assert done["xla_flags"].startswith("kept") and "libmimalloc" in done["mmap_threshold"]


def test_no_flag_once_jax_runs(monkeypatch):
  monkeypatch.setattr(runtime, "_backends_initialized", lambda: True)
  env = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}
  assert runtime.apply_vae_pass_settings(env)["xla_flags"].startswith("not set")
  assert "XLA_FLAGS" not in env
