"""Tests for the cpu_flash attention backend (the C++ kernel of sora_jax/kernels): it agrees with the XLA
reference in value and gradient across block edges, segments, padding and keyless queries, works sharded,
keeps its residuals under save_attention remat, and fails clearly where it cannot run."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sora_jax.kernels import cpu as cpu_kernels
from sora_jax.models import attention as attention_lib
from sora_jax.models import rope as rope_lib
from sora_jax.models.attention import attention
from tests.models.attention_test import _packed_ids as _ids

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler for the CPU kernels")


def _qkv(b, lq, lk, h, d, dtype=jnp.float32, seed=0):
  rng = np.random.RandomState(seed)
  return tuple(jnp.asarray(rng.randn(b, n, h, d), dtype) for n in (lq, lk, lk))


def _value_and_grads(backend, q, k, v, qseg, kseg, w):
  @jax.jit
  def f(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, qseg, kseg, backend=backend), q, k, v)
    return out, vjp(w.astype(out.dtype))

  return f(q, k, v)


# The kernel tiles queries by 64 and keys by 256 (AVX-512; 64 x 256 on AVX2 too): 300 and 77 cross tile
# edges and neither is a multiple of the vector width. Row 0 of the self case packs three segments, one
# straddling a key tile edge, and ends in padding; row 1 is one segment (whole tiles unmasked). In the cross
# case row 1's segment 3 has no keys.
CASES = {
    "self": (np.stack([_ids([100, 170, 20], 300), _ids([300], 300)]),) * 2,
    "cross": (np.stack([_ids([90, 120, 60], 300), _ids([100, 50, 150], 300)]),
              np.stack([_ids([30, 20, 27], 77), _ids([40, 37], 77)])),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("head_dim", [16, 64])
def test_matches_xla_in_value_and_gradient(case, head_dim):
  qseg, kseg = (jnp.asarray(x) for x in CASES[case])
  q, k, v = _qkv(2, qseg.shape[1], kseg.shape[1], 3, head_dim)
  w = jnp.asarray(np.random.RandomState(1).randn(*q.shape), jnp.float32)
  out_ref, grads_ref = _value_and_grads("xla", q, k, v, qseg, kseg, w)
  out, grads = _value_and_grads("cpu_flash", q, k, v, qseg, kseg, w)
  np.testing.assert_allclose(out, out_ref, atol=2e-5, rtol=1e-4)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, atol=2e-5, rtol=1e-4)


def _prologue(qseg, kseg, head_dim, seed=2):
  """A QKNormRope with scales away from 1 and 3D rotation tables of random token coordinates."""
  rng = np.random.RandomState(seed)
  scales = [jnp.asarray(1 + 0.3 * rng.randn(head_dim), jnp.float32) for _ in range(2)]
  tables = [rope_lib.rope_3d(jnp.asarray(rng.randint(0, 30, (*ids.shape, 3))), head_dim) for ids in (qseg, kseg)]
  return attention_lib.QKNormRope(*scales, 1e-6, *tables)


def _prologue_value_and_grads(backend, q, k, v, qseg, kseg, prologue, w):
  """Value and gradients (q, k, v, both norm scales) of a weighted sum of attention with the prologue."""
  def loss(q, k, v, q_scale, k_scale):
    p = prologue._replace(q_scale=q_scale, k_scale=k_scale)
    return jnp.sum(attention(q, k, v, qseg, kseg, backend=backend, qk_norm_rope=p) * w)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, prologue.q_scale, prologue.k_scale)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("rotate", [True, False])
def test_norm_rope_prologue_in_the_kernel_matches_it_in_jax(case, head_dim, rotate):
  """cpu_flash normalises and rotates q and k inside the kernel (and back-propagates through both there,
  scales included); the xla backend applies the same `QKNormRope` in JAX first. Without tables (the DiT's
  cross-attention to text) only the norm is applied."""
  qseg, kseg = (jnp.asarray(x) for x in CASES[case])
  q, k, v = (3 * x for x in _qkv(2, qseg.shape[1], kseg.shape[1], 3, head_dim))  # RMS far from 1
  prologue = _prologue(qseg, kseg, head_dim)
  if not rotate:
    prologue = prologue._replace(q_rope=None, k_rope=None)
  w = jnp.asarray(np.random.RandomState(1).randn(*q.shape), jnp.float32)
  loss_ref, grads_ref = _prologue_value_and_grads("xla", q, k, v, qseg, kseg, prologue, w)
  loss, grads = _prologue_value_and_grads("cpu_flash", q, k, v, qseg, kseg, prologue, w)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  for name, g, g_ref in zip(("q", "k", "v", "q_scale", "k_scale"), grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, atol=2e-5 * float(jnp.max(jnp.abs(g_ref))), rtol=1e-4, err_msg=name)
  # Padding queries (row 0 ends in padding in both cases) get no gradient.
  assert (np.asarray(grads[0])[0, 290:] == 0).all()


def test_padding_and_keyless_queries_are_exactly_zero_with_zero_gradient():
  qseg, kseg = (jnp.asarray(x) for x in CASES["cross"])
  q, k, v = _qkv(2, 300, 77, 2, 16)
  w = jnp.ones(q.shape, jnp.float32)
  out, (dq, _, _) = _value_and_grads("cpu_flash", q, k, v, qseg, kseg, w)
  out, dq = np.asarray(out), np.asarray(dq)
  assert np.isfinite(out).all() and np.isfinite(dq).all()
  assert (out[0, 270:] == 0).all() and (dq[0, 270:] == 0).all()  # padding queries
  assert (out[1, 150:] == 0).all() and (dq[1, 150:] == 0).all()  # segment 3: no keys; then padding
  assert (np.abs(out[1, :150]) > 0).all()


def test_bfloat16_inputs_compute_in_float32():
  qseg, kseg = (jnp.asarray(x) for x in CASES["self"])
  q, k, v = _qkv(2, 300, 300, 2, 16, dtype=jnp.bfloat16)
  out = attention(q, k, v, qseg, kseg, backend="cpu_flash")
  ref = attention(*(x.astype(jnp.float32) for x in (q, k, v)), qseg, kseg, backend="xla")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2, rtol=2e-2)


def test_sharded_over_a_mesh_matches_one_device():
  """A kernel has no partitioning rule: under a mesh it runs per shard (batch over fsdp, heads over tensor)."""
  from sora_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices")
  qseg, kseg = (jnp.asarray(x) for x in CASES["cross"])
  q, k, v = _qkv(2, 300, 77, 2, 16)
  expected = attention(q, k, v, qseg, kseg, backend="xla")
  mesh = mesh_lib.make_mesh([("data", 1), ("fsdp", 2), ("context", 1), ("tensor", 2)], devices=jax.devices()[:4])
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    shard = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    args = [shard(x, P("fsdp", None, "tensor")) for x in (q, k, v)]
    segs = [shard(x, P("fsdp")) for x in (qseg, kseg)]
    out = jax.jit(lambda q, k, v, a, b: attention(q, k, v, a, b, backend="cpu_flash"))(*args, *segs)
  np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-4)


def test_norm_rope_prologue_sharded_sums_the_scale_gradients_over_shards():
  """Under a mesh the scales are replicated into every shard's kernel: their gradient is the sum of the
  shards' partial sums, as on one device."""
  from sora_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices")
  qseg, kseg = (jnp.asarray(x) for x in CASES["self"])
  q, k, v = _qkv(2, 300, 300, 2, 16)
  prologue = _prologue(qseg, kseg, 16)
  w = jnp.asarray(np.random.RandomState(1).randn(*q.shape), jnp.float32)
  expected = _prologue_value_and_grads("xla", q, k, v, qseg, kseg, prologue, w)
  mesh = mesh_lib.make_mesh([("data", 1), ("fsdp", 2), ("context", 1), ("tensor", 2)], devices=jax.devices()[:4])
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    shard = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    q, k, v = (shard(x, P("fsdp", None, "tensor")) for x in (q, k, v))
    got = _prologue_value_and_grads("cpu_flash", q, k, v, qseg, kseg, prologue, w)
  for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, e, atol=2e-5 * float(jnp.max(jnp.abs(e))), rtol=1e-4)


def _count_kernel_calls(jaxpr, target):
  n = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "ffi_call" and eqn.params.get("target_name") == target:
      n += 1
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else [v]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          n += _count_kernel_calls(sub.jaxpr, target)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          n += _count_kernel_calls(sub, target)
  return n


def test_save_attention_remat_keeps_the_kernel_out_of_the_recompute():
  from sora_jax.models import dit  # pylint: disable=import-outside-toplevel
  q, k, v = _qkv(2, 64, 64, 2, 16)
  seg = jnp.ones((2, 64), jnp.int32)

  def f(q, k, v):
    return jnp.sum(jnp.tanh(attention(jnp.sin(q), k, v, seg, seg, backend="cpu_flash")))

  calls, grads = {}, {}
  for policy in ("none", "full", "save_attention"):
    fn = f if policy == "none" else jax.checkpoint(f, policy=dit.REMAT_POLICIES[policy])
    g = jax.grad(fn, argnums=(0, 1, 2))
    calls[policy] = _count_kernel_calls(jax.make_jaxpr(g)(q, k, v).jaxpr, cpu_kernels.FLASH_FORWARD)
    grads[policy] = g(q, k, v)
  assert calls == {"none": 1, "full": 2, "save_attention": 1}, calls
  for policy in ("full", "save_attention"):
    for g, e in zip(grads[policy], grads["none"]):
      np.testing.assert_allclose(g, e, atol=1e-6, rtol=1e-5)


def test_auto_picks_the_kernel_for_long_sequences_with_a_supported_head_dim():
  assert attention_lib.resolve_backend("auto", 2048, 77, 64) == "cpu_flash"
  assert attention_lib.resolve_backend("auto", 2048, 77, 8) == "blockwise"  # head dim not a multiple of 16
  assert attention_lib.resolve_backend("auto", 512, 77, 64) == "xla"


def test_head_dim_error_names_the_value():
  q, k, v = _qkv(1, 32, 32, 2, 8)
  seg = jnp.ones((1, 32), jnp.int32)
  with pytest.raises(ValueError, match="multiple of 16; got 8"):
    attention(q, k, v, seg, seg, backend="cpu_flash")


def test_build_failures_are_one_line_errors(tmp_path, monkeypatch):
  monkeypatch.setenv("SORA_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("CXX", "no-such-compiler-here")
  with pytest.raises(cpu_kernels.KernelUnavailable, match="no C\\+\\+ compiler 'no-such-compiler-here'"):
    cpu_kernels.build()
  monkeypatch.delenv("CXX")
  broken = tmp_path / "broken.cc"
  broken.write_text("this is not C++;\n")
  monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
  with pytest.raises(cpu_kernels.KernelUnavailable, match="failed on broken.cc: .*error") as e:
    cpu_kernels.build()
  assert "\n" not in str(e.value)
  assert not any(p.suffix == ".so" for p in (tmp_path / "cache").iterdir())  # nothing half-written is left


def test_library_is_cached_per_source(tmp_path, monkeypatch):
  monkeypatch.setenv("SORA_JAX_KERNEL_CACHE", str(tmp_path))
  first = cpu_kernels.library_path()
  assert first.parent == tmp_path and first.name.startswith("flash_attention_cpu-")
  changed = tmp_path / "flash_attention_cpu.cc"
  changed.write_text(cpu_kernels.SOURCE.read_text() + "\n// changed\n")
  monkeypatch.setattr(cpu_kernels, "SOURCE", changed)
  assert cpu_kernels.library_path() != first
  assert os.path.exists(cpu_kernels.load())  # the real library, loaded once per process


_AVX2_CHECK = """
import jax, jax.numpy as jnp, numpy as np
from sora_jax.models import rope as rope_lib
from sora_jax.models.attention import attention
rng = np.random.RandomState(0)
q, k, v = (jnp.asarray(rng.randn(2, n, 2, 16), jnp.float32) for n in (100, 70, 70))
qs = jnp.asarray(np.stack([np.r_[np.ones(60), 2 * np.ones(30), np.zeros(10)], np.ones(100)]), jnp.int32)
ks = jnp.asarray(np.stack([np.r_[np.ones(40), 2 * np.ones(30)], np.ones(70)]), jnp.int32)
f = lambda b: jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, qs, ks, backend=b))),
                                 argnums=(0, 1, 2))(q, k, v)
for a, e in zip(jax.tree.leaves(f("cpu_flash")), jax.tree.leaves(f("xla"))):
  np.testing.assert_allclose(a, e, atol=2e-5, rtol=1e-4)
from sora_jax.models import attention as A, rope as R
tables = [R.rope_3d(jnp.asarray(rng.randint(0, 9, (2, n, 3))), 16) for n in (100, 70)]
g = lambda b: jax.grad(lambda q, k, s: jnp.sum(jnp.sin(attention(
    q, k, v, qs, ks, backend=b, qk_norm_rope=A.QKNormRope(s, 2 * s, 1e-6, *tables)))), argnums=(0, 1, 2))(
        q, k, jnp.linspace(0.5, 1.5, 16))
for a, e in zip(g("cpu_flash"), g("xla")):
  np.testing.assert_allclose(a, e, atol=2e-5 * float(np.abs(e).max()), rtol=1e-4)
print("ok")
"""


def test_avx2_build_matches_xla(tmp_path):
  """The kernel's 8-wide (AVX2) variant, built for x86-64-v3, in a process of its own (FFI target names are
  per process). Skipped where this CPU cannot run AVX2."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  flags = open("/proc/cpuinfo", encoding="utf-8").read() if os.path.exists("/proc/cpuinfo") else ""
  if " avx2" not in flags or " fma" not in flags:
    pytest.skip("this CPU has no AVX2")
  env = dict(os.environ, SORA_JAX_KERNEL_ARCH="x86-64-v3", SORA_JAX_KERNEL_CACHE=str(tmp_path), XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "-c", _AVX2_CHECK], env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
  assert any(p.suffix == ".so" for p in tmp_path.iterdir())
