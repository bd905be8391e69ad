"""Tests for sora_jax.models.attention: every backend agrees with the reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.models import attention as attention_lib
from sora_jax.models.attention import attention, segment_mask

H, D = 2, 8


def _packed_ids(lengths, total):
  """Segment ids 1..len(lengths) laid out contiguously, then 0 padding."""
  ids = np.zeros(total, np.int32)
  pos = 0
  for i, n in enumerate(lengths):
    ids[pos:pos + n] = i + 1
    pos += n
  return ids


def _qkv(lq, lk, batch=2, dtype=jnp.float32, seed=0):
  rng = np.random.RandomState(seed)
  q = jnp.asarray(rng.randn(batch, lq, H, D), dtype)
  k = jnp.asarray(rng.randn(batch, lk, H, D), dtype)
  v = jnp.asarray(rng.randn(batch, lk, H, D), dtype)
  return q, k, v


def _naive(q, k, v, qseg, kseg):
  """Per-segment softmax attention in numpy, one segment at a time."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  qseg, kseg = np.asarray(qseg), np.asarray(kseg)
  out = np.zeros_like(q)
  for b in range(q.shape[0]):
    for s in np.unique(qseg[b]):
      qi, ki = np.nonzero(qseg[b] == s)[0], np.nonzero(kseg[b] == s)[0]
      if s == 0 or ki.size == 0:
        continue
      logits = np.einsum("qhd,khd->hqk", q[b, qi], k[b, ki]) / np.sqrt(q.shape[-1])
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[b, qi] = np.einsum("hqk,khd->qhd", p, v[b, ki])
  return out


# Self-attention: 3 and 2 segments of uneven lengths, with padding.
SELF_SEG = np.stack([_packed_ids([13, 20, 7], 45), _packed_ids([30, 9], 45)])
# Cross-attention: video rows of 45 tokens to text rows of 21 tokens. Row 1's
# segment 3 has no text: its queries see no key and must output 0.
CROSS_Q = np.stack([_packed_ids([13, 20, 7], 45), _packed_ids([10, 9, 11], 45)])
CROSS_KV = np.stack([_packed_ids([5, 6, 4], 21), _packed_ids([8, 3], 21)])


def _run(backend, q, k, v, qseg, kseg):
  return attention(q, k, v, jnp.asarray(qseg), jnp.asarray(kseg), backend=backend,
                   block_q=16, block_kv=16)


def _value_and_grads(backend, q, k, v, qseg, kseg, w):
  """Jitted (output, d<out * w>/d(q, k, v)): one compile instead of many eager ops."""

  @jax.jit
  def f(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: _run(backend, q, k, v, qseg, kseg), q, k, v)
    return out, vjp(w.astype(out.dtype))

  return f(q, k, v)


def test_segment_mask():
  m = segment_mask(jnp.array([[1, 1, 2, 0]]), jnp.array([[1, 2, 0]]))
  assert m.shape == (1, 1, 4, 3) and m.dtype == jnp.bool_
  np.testing.assert_array_equal(
      m[0, 0], [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]])


@pytest.mark.parametrize("qseg,kseg", [(SELF_SEG, SELF_SEG), (CROSS_Q, CROSS_KV)],
                         ids=["self", "cross"])
def test_xla_matches_naive(qseg, kseg):
  q, k, v = _qkv(qseg.shape[1], kseg.shape[1])
  out = _run("xla", q, k, v, qseg, kseg)
  np.testing.assert_allclose(out, _naive(q, k, v, qseg, kseg), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["xla", "blockwise"])
def test_padding_and_keyless_queries_are_exactly_zero(backend):
  q, k, v = _qkv(45, 21)
  out = np.asarray(_run(backend, q, k, v, CROSS_Q, CROSS_KV))
  assert not np.isnan(out).any()
  assert (out[0, 40:] == 0).all()  # Padding queries.
  assert (out[1, 30:] == 0).all()  # Padding queries.
  assert (out[1, 19:30] == 0).all()  # Segment 3 has no text keys.
  assert (np.abs(out[1, :19]) > 0).any()


@pytest.mark.parametrize("qseg,kseg", [(SELF_SEG, SELF_SEG), (CROSS_Q, CROSS_KV)],
                         ids=["self", "cross"])
def test_blockwise_matches_xla_fwd_and_grads(qseg, kseg):
  # 45 and 21 are not multiples of the block size 16.
  q, k, v = _qkv(qseg.shape[1], kseg.shape[1])
  w = jnp.asarray(np.random.RandomState(1).randn(*q.shape), jnp.float32)
  out_ref, grads_ref = _value_and_grads("xla", q, k, v, qseg, kseg, w)
  out, grads = _value_and_grads("blockwise", q, k, v, qseg, kseg, w)
  np.testing.assert_allclose(out, out_ref, atol=1e-5, rtol=1e-5)
  for g, g_ref in zip(grads, grads_ref):
    assert not np.isnan(np.asarray(g)).any()
    np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-4)


def test_blockwise_bf16():
  q, k, v = _qkv(45, 21, dtype=jnp.bfloat16)
  w = jnp.ones(q.shape, jnp.float32)
  out, grads = _value_and_grads("blockwise", q, k, v, CROSS_Q, CROSS_KV, w)
  _, grads_ref = _value_and_grads("xla", q, k, v, CROSS_Q, CROSS_KV, w)
  ref = _naive(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
               CROSS_Q, CROSS_KV)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2, rtol=3e-2)
  for g, g_ref in zip(grads, grads_ref):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32),
                               atol=6e-2, rtol=6e-2)


def test_blockwise_under_jit_single_block():
  # Blocks larger than the sequence: one block each way.
  q, k, v = _qkv(45, 45)
  f = jax.jit(lambda q, k, v: attention(q, k, v, jnp.asarray(SELF_SEG), jnp.asarray(SELF_SEG),
                                        backend="blockwise"))
  np.testing.assert_allclose(f(q, k, v), _run("xla", q, k, v, SELF_SEG, SELF_SEG),
                             atol=1e-5, rtol=1e-5)


def test_auto_resolves_on_cpu():
  assert attention_lib.resolve_backend("auto", 64, 64) == "xla"
  assert attention_lib.resolve_backend("auto", 4096, 77) == "blockwise"
  q, k, v = _qkv(45, 45)
  np.testing.assert_allclose(_run("auto", q, k, v, SELF_SEG, SELF_SEG),
                             _run("xla", q, k, v, SELF_SEG, SELF_SEG), atol=1e-6)


def test_unknown_backend():
  q, k, v = _qkv(8, 8)
  seg = jnp.ones((2, 8), jnp.int32)
  with pytest.raises(ValueError, match="'flash3'"):
    attention(q, k, v, seg, seg, backend="flash3")


@pytest.mark.parametrize("backend", ["cudnn", "splash", "splash_fused"])
def test_accelerator_backends_raise_clearly_on_cpu(backend):
  if jax.default_backend() != "cpu":
    pytest.skip("CPU-only check")
  q, k, v = _qkv(8, 8)
  seg = jnp.ones((2, 8), jnp.int32)
  with pytest.raises(ValueError, match=f"'{backend}' needs a"):
    attention(q, k, v, seg, seg, backend=backend)


@pytest.mark.parametrize("fused_bwd", [False, True])
def test_splash_interpret_matches_xla(fused_bwd):
  # Runs the real splash kernels (forward, and the separate or fused backward) through the Pallas interpreter.
  q, k, v = _qkv(45, 21)
  qs, ks = jnp.asarray(CROSS_Q), jnp.asarray(CROSS_KV)
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))  # noqa: E731
  splash = lambda q, k, v: attention_lib._splash_attention(  # noqa: E731  pylint: disable=protected-access
      q, k, v, qs, ks, 128, 128, interpret=True, fused_bwd=fused_bwd)
  xla = lambda q, k, v: attention(q, k, v, qs, ks, backend="xla")  # noqa: E731
  np.testing.assert_allclose(splash(q, k, v), xla(q, k, v), atol=1e-5, rtol=1e-5)
  grads = jax.grad(loss(splash), argnums=(0, 1, 2))(q, k, v)
  expected = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
  for g, e in zip(grads, expected):
    np.testing.assert_allclose(g, e, atol=1e-4, rtol=1e-4)


def test_shape_errors():
  q, k, v = _qkv(8, 6)
  with pytest.raises(ValueError, match="Segment ids"):
    attention(q, k, v, jnp.ones((2, 6), jnp.int32), jnp.ones((2, 6), jnp.int32))
  with pytest.raises(ValueError, match="Expected q"):
    attention(q, k[:, :, :1], v, jnp.ones((2, 8), jnp.int32), jnp.ones((2, 6), jnp.int32))


def _count_primitive(jaxpr, name):
  from jax.extend import core as jcore  # pylint: disable=import-outside-toplevel
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == name
    for p in eqn.params.values():
      for sub in p if isinstance(p, (list, tuple)) else [p]:
        if isinstance(sub, jcore.ClosedJaxpr):
          n += _count_primitive(sub.jaxpr, name)
        elif isinstance(sub, jcore.Jaxpr):
          n += _count_primitive(sub, name)
  return n


def test_save_attention_remat_keeps_attention_out_of_the_recompute():
  """dit.remat='save_attention' saves the blockwise (and splash) output and log-sum-exp: the backward pass
  recomputes what feeds attention but not attention's own forward loops, and the gradients are unchanged."""
  from sora_jax.models import dit  # pylint: disable=import-outside-toplevel
  q, k, v = _qkv(40, 40)
  seg = jnp.ones((2, 40), jnp.int32)

  def f(q, k, v):
    out = attention(jnp.sin(q), k, v, seg, seg, backend="blockwise", block_q=16, block_kv=16)
    return jnp.sum(jnp.tanh(out))

  scans, grads = {}, {}
  for policy in ("none", "full", "save_attention"):
    fn = f if policy == "none" else jax.checkpoint(f, policy=dit.REMAT_POLICIES[policy])
    g = jax.grad(fn, argnums=(0, 1, 2))
    scans[policy] = _count_primitive(jax.make_jaxpr(g)(q, k, v).jaxpr, "scan")
    grads[policy] = g(q, k, v)
  # The forward is two nested loops (query blocks, key blocks); full remat runs it again in the backward.
  assert scans["full"] >= scans["none"] + 2, scans
  assert scans["save_attention"] <= scans["full"] - 2, scans
  for policy in ("full", "save_attention"):
    for g, e in zip(grads[policy], grads["none"]):
      np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)
