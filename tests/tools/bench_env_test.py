"""tools/bench_env.py: which allocator ours' benchmark worker runs with, and what each side records."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("bench_env_tool", os.path.join(ROOT, "tools", "bench_env.py"))
bench_env = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_env)


def test_mimalloc_is_preloaded_with_the_demo_settings(monkeypatch, tmp_path):
  lib = tmp_path / "libmimalloc.so"
  lib.write_bytes(b"")
  monkeypatch.setattr(bench_env, "mimalloc_path", lambda: str(lib))
  want = {"LD_PRELOAD": str(lib), "MIMALLOC_PURGE_DELAY": "-1", "MIMALLOC_ALLOW_LARGE_OS_PAGES": "1"}
  assert bench_env.allocator_env("auto") == want
  assert bench_env.allocator_env("mimalloc") == want
  assert bench_env.allocator_env("system") == {}


def test_without_mimalloc_auto_keeps_the_system_malloc_and_mimalloc_fails(monkeypatch):
  monkeypatch.setattr(bench_env, "mimalloc_path", lambda: None)
  assert bench_env.allocator_env("auto") == {}
  with pytest.raises(SystemExit, match=r"--ours_allocator=mimalloc: no libmimalloc.so under .*cmeel.prefix/lib"):
    bench_env.allocator_env("mimalloc")
  with pytest.raises(SystemExit, match=r"--ours_allocator='jemalloc': expected auto, mimalloc or system"):
    bench_env.allocator_env("jemalloc")


def test_sides_record_ours_overrides_and_the_peer_keeps_this_process(monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  monkeypatch.delenv("LD_PRELOAD", raising=False)
  got = bench_env.sides({"LD_PRELOAD": "/lib/x.so", "MIMALLOC_PURGE_DELAY": "-1"})
  assert got["ours_env"]["LD_PRELOAD"] == "/lib/x.so" and got["ours_env"]["MIMALLOC_PURGE_DELAY"] == "-1"
  assert got["peer_env"]["LD_PRELOAD"] == "" and got["peer_env"]["MIMALLOC_PURGE_DELAY"] == ""
  assert got["ours_env"]["GLIBC_TUNABLES"] == got["peer_env"]["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_bad_pair_names_the_flag():
  assert bench_env.parse_pairs(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
  with pytest.raises(SystemExit, match=r"--ours_env='A': expected KEY=VALUE"):
    bench_env.parse_pairs(["A"])
