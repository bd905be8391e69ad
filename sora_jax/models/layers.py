"""Shared NNX building blocks: dense layers with logical axis names, norms, MLP, attention module.

Every parameter carries logical axis names (see `sora_jax/parallel/mesh.py` for the rules that map them to
mesh axes). Activations are constrained by logical name at block boundaries.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.custom_derivatives import SymbolicZero

from sora_jax import segments
from sora_jax.models import attention as attention_lib
from sora_jax.models import norms
from sora_jax.models import rope as rope_lib
from sora_jax.parallel import mesh as mesh_lib

Shape = int | Sequence[int]


def _tuple(x: Shape) -> tuple[int, ...]:
  return (x,) if isinstance(x, int) else tuple(x)


class Dense(nnx.Module):
  """y = x . W (+ b), contracting the last `len(in_features)` axes of x; W has logical axis `names`.

  The bias starts at zero, or at `bias_init` (an array of shape `out_features`).
  """

  def __init__(self, in_features: Shape, out_features: Shape, names: Sequence[str], *, use_bias=True,
               zero_init=False, bias_init=None, dtype=jnp.float32, rngs: nnx.Rngs):
    self.in_features, self.out_features = _tuple(in_features), _tuple(out_features)
    shape = self.in_features + self.out_features
    assert len(names) == len(shape), (names, shape)
    if zero_init:
      init = nnx.initializers.zeros_init()
    else:
      init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=tuple(
          range(len(self.in_features))), out_axis=tuple(range(len(self.in_features), len(shape))))
    self.kernel = nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=tuple(names))
    bias = (jnp.zeros(self.out_features, jnp.float32) if bias_init is None
            else jnp.broadcast_to(jnp.asarray(bias_init, jnp.float32), self.out_features))
    self.bias = nnx.Param(bias, out_sharding=tuple(names[len(self.in_features):])) if use_bias else None
    self.dtype = dtype

  def __call__(self, x):
    n = len(self.in_features)
    k = self.kernel[...].astype(self.dtype)
    x = x.astype(self.dtype)
    # Only when compiling for CPU (other platforms choose their own layouts; eager calls have no fusions):
    # the input and output are pinned row-major and the weight gradient is contracted from a transposed copy
    # of the input (`_dense_for_cpu`). Both are about XLA:CPU's layouts, experiments/scaling/README.md.
    if isinstance(x, jax.core.Tracer) and x.ndim > n and mesh_lib.target_platform() == "cpu":
      fan_in, fan_out = math.prod(self.in_features), math.prod(self.out_features)
      x2 = mesh_lib.pin_row_major(x.reshape(-1, fan_in))
      y2 = mesh_lib.pin_row_major(_dense_for_cpu(x2, k.reshape(fan_in, fan_out)))
      y = y2.reshape(x.shape[:x.ndim - n] + self.out_features)
    else:
      y = _contract(x, k, n)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def _contract(x, k, n):
  """x . k over the last n axes of x and the first n of k."""
  return jax.lax.dot_general(x, k, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())))


@jax.custom_jvp
def _dense_for_cpu(x, k):
  """x [tokens, fan_in] @ k [fan_in, fan_out], with derivatives that XLA:CPU runs as plain library matmuls.

  The weight gradient contracts the tokens, the major axis of both the input and the output's cotangent,
  so one operand must be transposed for a row-major matmul. Left to autodiff, XLA:CPU's layout assignment
  picks which: sometimes the elementwise fusion producing the operand writes it transposed (a strided loop
  several times slower than the fusion plus a transpose of its own), sometimes it transposes the cotangent
  and keeps the input contracted on its major axis, a form its YNNPACK matmuls do not take, so the MLP's
  weight gradients ran on a slower fallback matmul. Here the tangent of the weight is written as a
  contraction of a row-major transposed copy of the input ([fan_in, tokens]), which reverse mode saves (in
  place of the input) and transposes into `copy @ cotangent`: one plain matmul, and the copy of an input
  shared by several layers (q, k and v) is made once. Both operands are 2D: the input gradient
  `cotangent @ k^T` then reads k as it is stored, where a weight with several output axes (the attention
  projections' [embed, heads, head_dim]) had XLA copy a transposed slice of it every step. Forward mode
  takes the same rule (custom_jvp, not custom_vjp, so `jax.jvp` and `jax.jacfwd` go through the model).
  """
  return x @ k


@functools.partial(_dense_for_cpu.defjvp, symbolic_zeros=True)
def _dense_for_cpu_jvp(primals, tangents):
  x, k = primals
  dx, dk = tangents
  y = x @ k
  terms = []
  if not isinstance(dx, SymbolicZero):
    terms.append(dx @ k)
  if not isinstance(dk, SymbolicZero):
    x_t = mesh_lib.pin_row_major(x.T)
    terms.append(jax.lax.dot_general(x_t, dk, (((0,), (0,)), ((), ()))))
  return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)


class RMSNorm(nnx.Module):
  """RMS normalisation over the last axis, optionally with a learned scale."""

  def __init__(self, dim: int, *, scale=True, eps=1e-6, names=("norm",), rngs: nnx.Rngs | None = None):
    del rngs
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=names) if scale else None
    self.eps = eps

  def __call__(self, x):
    return norms.rms_norm(x, None if self.scale is None else self.scale[...], self.eps)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis without learned parameters (adaLN supplies scale and shift)."""

  def __init__(self, eps=1e-6):
    self.eps = eps

  def __call__(self, x):
    dtype = x.dtype
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return ((x - mean) * jax.lax.rsqrt(var + self.eps)).astype(dtype)


class MLP(nnx.Module):
  """Two-layer GELU MLP: embed -> mlp -> embed."""

  def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.fc1 = Dense(dim, hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.fc2 = Dense(hidden, dim, ("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.gelu(self.fc1(x), approximate=True)
    h = mesh_lib.constrain(h, ("act_batch", "act_len", "act_mlp"))
    return self.fc2(h)


class Attention(nnx.Module):
  """Multi-head attention over packed sequences (self or cross), optional QK-norm and RoPE.

  Uses the project's one attention function, so every backend honours segment ids.
  """

  def __init__(self, dim: int, num_heads: int, *, kv_dim: int | None = None, qk_norm=True,
               backend: str = "xla", dtype=jnp.float32, rngs: nnx.Rngs):
    head_dim = dim // num_heads
    kv_dim = dim if kv_dim is None else kv_dim
    self.num_heads, self.head_dim, self.backend = num_heads, head_dim, backend
    self.q = Dense(dim, (num_heads, head_dim), ("embed", "heads", "kv"), dtype=dtype, rngs=rngs)
    self.k = Dense(kv_dim, (num_heads, head_dim), ("embed", "heads", "kv"), dtype=dtype, rngs=rngs)
    self.v = Dense(kv_dim, (num_heads, head_dim), ("embed", "heads", "kv"), dtype=dtype, rngs=rngs)
    self.o = Dense((num_heads, head_dim), dim, ("heads", "kv", "embed"), dtype=dtype, rngs=rngs)
    self.q_norm = RMSNorm(head_dim, names=("kv",)) if qk_norm else None
    self.k_norm = RMSNorm(head_dim, names=("kv",)) if qk_norm else None

  def __call__(self, x, q_segment_ids, context=None, kv_segment_ids=None, *, rope=None, kv_rope=None):
    """x: [B, Lq, D]; context: [B, Lk, Dk] (None = self-attention); rope: (cos, sin) per token."""
    context = x if context is None else context
    kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
    q, k, v = self.q(x), self.k(context), self.v(context)  # [B, L, H, Dh]
    prologue = None
    if self.q_norm is not None:
      # Norm and rotation go to the attention call, which fuses them into the kernel where it can.
      prologue = attention_lib.QKNormRope(self.q_norm.scale[...], self.k_norm.scale[...], self.q_norm.eps,
                                          rope, None if rope is None else rope if kv_rope is None else kv_rope)
    elif rope is not None:
      q = rope_lib.apply(q, *rope)
      k = rope_lib.apply(k, *(rope if kv_rope is None else kv_rope))
    q = mesh_lib.constrain(q, ("act_batch", "act_len", "act_heads", None))
    out = attention_lib.attention(q, k, v, q_segment_ids, kv_segment_ids, backend=self.backend,
                                  qk_norm_rope=prologue)
    return self.o(out)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of t in [0, 1] (scaled by 1000, as DiT timesteps): [...] -> [..., dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (t.astype(jnp.float32) * 1000.0)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
