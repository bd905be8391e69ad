"""tools/bench_dit.py: the benchmark's config and FLOP count, and one tiny step of each side."""
import importlib.util
import math
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("bench_dit_tool", os.path.join(ROOT, "tools", "bench_dit.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TINY = dict(width=32, heads=2, layers=1, mlp=64, channels=4, batch=2, text_tokens=4, text_dim=16)


def test_default_config_is_the_benchmark_shape_and_flops():
  from sora_jax.models import t2v
  from sora_jax.train import train_dit
  c = bench.make_config()
  assert (c.dit.width, c.dit.depth, c.dit.num_heads, int(c.dit.mlp_ratio * c.dit.width)) == (384, 12, 6, 1536)
  assert (c.train_dit.batch_size, c.train_dit.seq_len, c.train_dit.text_seq_len) == (2, 5 * 16 * 16, 64)
  assert t2v.patch_dim(c) == 64 and c.text.width == 384 and c.text.depth == 0
  assert c.train_dit.ema_decay == 0 and train_dit.cond_probs(c) is None
  # Hand count of the dominant matmuls: 12 blocks of self q,k,v,o + MLP over 1280 tokens, attention
  # scores and values, cross q,o and attention to 64 text tokens; 3x forward, batch 2.
  L, Lt, d, f = 1280, 64, 384, 1536
  block = 2 * L * (4 * d * d + 2 * d * f) + 4 * L * L * d + 2 * L * 2 * d * d + 4 * Lt * d * d + 4 * L * Lt * d
  hand = 2 * 3 * 12 * block
  assert math.isclose(bench.step_flops(c), hand, rel_tol=0.005), (bench.step_flops(c), hand)


def test_batch_is_one_full_sample_per_row():
  c = bench.make_config(latent=(1, 4, 4), **TINY)
  b = bench.make_batch(c, (1, 4, 4))
  assert b["tokens"].shape == (2, 4, 16) and b["coords"].shape == (2, 4, 3)
  assert (b["tokens_segment_ids"] == 1).all() and b["grid"].tolist() == [[[1, 2, 2]]] * 2
  assert b["text_states"].shape == (2, 4, 16) and b["text_pooled"].shape == (2, 1, 16)


def test_ours_tiny_steps_run():
  c = bench.make_config(latent=(1, 4, 4), **TINY)
  ours = bench.Ours(c, (1, 4, 4), peak_n=32)
  assert ours.step() > 0 and ours.step() > 0
  assert np.isfinite(ours.loss) and ours.params > ours.text_params > 0
  assert ours.peak_gflops() > 0
  parts = ours.parts(1)
  assert {"forward", "forward_backward", "attention_xla_forward_backward"} <= set(parts), parts


def test_peer_tiny_steps_run():
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  args = {**TINY, "latent": "1x4x4", "patch": "1x2x2", "peer_adamw": "default"}
  peer = bench.Peer(args, threads=1, peak_n=32)
  assert peer.step() > 0 and np.isfinite(peer.loss) and peer.params > 0
  assert set(peer.parts(1)) == {"forward", "forward_backward", "attention_sdpa_forward",
                                "attention_sdpa_forward_backward"}


def test_hlo_ops_map_to_sora_jax_lines_forward_and_backward():
  import jax
  import jax.numpy as jnp
  from sora_jax.models import layers
  f = jax.jit(jax.grad(lambda x: jnp.sum(layers.LayerNorm()(x * x) ** 3)))
  sources = bench.hlo_op_sources(f.lower(jnp.ones((4, 8))).compile().as_text())
  kinds = {kind for where, kind in sources.values() if where.startswith("layers.py:LayerNorm.__call__:")}
  assert kinds == {"forward", "backward"}, sources


def test_hlo_matmuls_count_flops_of_dots_and_of_fusions_that_wrap_them():
  import jax
  import jax.numpy as jnp
  f = jax.jit(lambda x, w, v: jnp.tanh(x @ w) @ v + 1.0)
  mm = bench.hlo_matmuls(f.lower(jnp.ones((32, 16)), jnp.ones((16, 8)), jnp.ones((8, 4))).compile().as_text())
  # Whether XLA:CPU emits a matmul as a dot or inside a fusion, its op carries the matmul's shape and FLOPs.
  assert {sig: f for sig, f in mm.values()} == {"32x16 @ 16x8": 2.0 * 32 * 16 * 8, "32x8 @ 8x4": 2.0 * 32 * 8 * 4}, mm


def test_ours_env_pairs_set_ours_side_only_and_bad_pairs_name_the_value(monkeypatch):
  import bench_env  # pylint: disable=import-outside-toplevel  (tools/, put on the path by bench_dit)
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  monkeypatch.delenv("LD_PRELOAD", raising=False)
  env = bench_env.parse_pairs(["LD_PRELOAD=/x/libmimalloc.so", "MIMALLOC_PURGE_DELAY=-1"])
  sides = bench_env.sides(env)
  assert sides["ours_env"]["LD_PRELOAD"] == "/x/libmimalloc.so" and sides["peer_env"]["LD_PRELOAD"] == ""
  assert sides["ours_env"]["GLIBC_TUNABLES"] == sides["peer_env"]["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  with pytest.raises(SystemExit, match="--ours_env='MIMALLOC': expected KEY=VALUE"):
    bench_env.parse_pairs(["MIMALLOC"])


def test_host_names_the_cpu_of_this_run(tmp_path, monkeypatch):
  import builtins  # pylint: disable=import-outside-toplevel
  import bench_env  # pylint: disable=import-outside-toplevel
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text("processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t\t: fpu sse avx2 avx512f\n\n"
                     "processor\t: 1\nmodel name\t: Other CPU\nflags\t\t: fpu\n")
  real_open = builtins.open
  monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(cpuinfo if p == "/proc/cpuinfo" else p, *a, **k))
  host = bench_env.host()
  assert host["cpu_model"] == "Example CPU 9000" and host["avx512"] is True, host
  assert host["cores"] == len(os.sched_getaffinity(0))
