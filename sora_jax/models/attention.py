"""The one attention function of sora_jax, with backends chosen by config.

Every backend takes segment ids (0 = padding): a query attends to the keys
whose segment id equals its own and is nonzero. Queries with segment 0, or
with no valid key, output exactly 0. Scale 1/sqrt(D), softmax in float32,
output in q.dtype. The same call serves self-attention (q ids == kv ids) and
cross-attention from video tokens to packed text tokens.

Backends:
  xla: reference; materialises [B, H, Lq, Lk] logits.
  blockwise: flash-style online softmax in pure JAX (lax.map over q blocks,
    lax.scan over kv blocks) with a custom VJP that recomputes block logits,
    so forward and backward memory are O(L). Runs on any platform.
  cpu_flash: a fused C++ kernel for XLA:CPU (sora_jax/kernels/flash_attention_cpu.cc, built on first use),
    forward and backward, float32 compute; block logits never leave the cache. CPU only.
  cudnn: jax.nn.dot_product_attention(implementation="cudnn"), GPU only.
  splash: Pallas TPU splash attention with SegmentIds, TPU only; the backward pass runs two kernels (dq, and
    dk/dv), each recomputing the attention probabilities.
  splash_fused: splash with one fused backward kernel that forms dq, dk and dv from one recomputation of the
    probabilities (10 instead of 14 H Lq Lk D backward FLOPs), at the cost of a transient
    [Lk / block_kv, H, Lq, D] buffer of partial dq per layer (6 GB at 32,760 tokens, 12 heads of 128,
    block 512, bf16).
  auto: splash on TPU, cudnn on GPU; on CPU, when the longer side exceeds
    AUTO_BLOCKWISE_MIN_LEN, cpu_flash (or blockwise where the kernel cannot be
    built, or the head dim is not a multiple of 16), else xla.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from sora_jax.models import norms
from sora_jax.models import rope as rope_lib
from sora_jax.parallel import mesh as mesh_lib

BACKENDS = ("xla", "blockwise", "cpu_flash", "cudnn", "splash", "splash_fused", "auto")

# On CPU "auto" uses cpu_flash (or blockwise) above this length (also faster there).
AUTO_BLOCKWISE_MIN_LEN = 1024

# cpu_flash's tiles: query rows per work item and keys per logit tile (a 64 x 256 f32 tile is 64 KB).
CPU_FLASH_BLOCK_Q = 64
CPU_FLASH_BLOCK_KV = 256

# Checkpoint name of what the backward pass of splash, blockwise and cpu_flash needs from the forward (the
# output and the softmax log-sum-exp). The DiT's remat policy "save_attention" keeps exactly these, so the
# backward pass recomputes a block's projections and MLP but not its attention (models/dit.py).
RESIDUALS_NAME = "attention_residuals"

# Finite large negative: keeps exp() at 0 without inf - inf = NaN.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


class QKNormRope(NamedTuple):
  """What attention does to q and k before the logits: RMS norm over the head dim with a learned scale, then
  rotary embedding (`rope.apply`) unless the tables are None (cross-attention to text). cpu_flash fuses both
  into its kernel; the other backends apply them in JAX.

  The rotation tables are constants of the token positions: no gradient flows into them.
  """
  q_scale: jax.Array  # [D]
  k_scale: jax.Array  # [D]
  eps: float
  q_rope: tuple[jax.Array, jax.Array] | None = None  # (cos, sin), [B, Lq, D / 2] each; None: no rotation
  k_rope: tuple[jax.Array, jax.Array] | None = None  # (cos, sin), [B, Lk, D / 2] each; None: no rotation

  def apply(self, q, k):
    """The prologue in JAX: (q, k) normalised and rotated, in their own dtypes."""
    q, k = norms.rms_norm(q, self.q_scale, self.eps), norms.rms_norm(k, self.k_scale, self.eps)
    if self.q_rope is not None:
      q = rope_lib.apply(q, *self.q_rope)
    if self.k_rope is not None:
      k = rope_lib.apply(k, *self.k_rope)
    return q, k

  def tables(self, q, k):
    """(q_cos, q_sin, k_cos, k_sin) for the kernel: identity rotations (cos 1, sin 0) where a table is None."""
    def table(rope, x):
      if rope is not None:
        return rope
      shape = (x.shape[0], x.shape[1], x.shape[-1] // 2)
      return jnp.ones(shape, jnp.float32), jnp.zeros(shape, jnp.float32)
    return (*table(self.q_rope, q), *table(self.k_rope, k))


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
  """Returns bool [B, 1, Lq, Lk]: same segment and nonzero."""
  q = q_segment_ids[:, :, None]
  kv = kv_segment_ids[:, None, :]
  return ((q == kv) & (q != 0))[:, None]


def _xla_attention(q, k, v, q_segment_ids, kv_segment_ids, precision):
  """Reference: materialised [B, H, Lq, Lk] logits."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision,
                      preferred_element_type=jnp.float32) * scale
  mask = segment_mask(q_segment_ids, kv_segment_ids)
  logits = jnp.where(mask, logits, _MASK_VALUE)
  m = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.where(mask, jnp.exp(logits - m), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  # Rows with no valid key have denom 0: divide by 1 so they stay exactly 0.
  p = p / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, precision=precision,
                   preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


def _num_blocks(length: int, block: int) -> tuple[int, int]:
  """Returns (num_blocks, block_size) covering `length` with least padding."""
  n = max(1, -(-length // block))
  size = -(-length // n)
  size = -(-size // 8) * 8  # Multiple of 8 keeps vector loads aligned.
  return n, size


def _to_blocks(x, n, size, fill=0):
  """[B, L, ...] -> [n, B, size, ...], padding L to n * size with `fill`."""
  pad = n * size - x.shape[1]
  if pad:
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    x = jnp.pad(x, widths, constant_values=fill)
  x = x.reshape(x.shape[0], n, size, *x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _block_probs(qi, kj, qs, ks, scale, precision):
  """Masked scaled logits of one block pair: [B, H, bq, bk] f32 and mask."""
  s = jnp.einsum("bhqd,bhkd->bhqk", qi, kj, precision=precision,
                 preferred_element_type=jnp.float32) * scale
  mask = (qs[:, None, :, None] == ks[:, None, None, :]) & (qs[:, None, :, None] != 0)
  return s, mask


def _blockwise_fwd_impl(q, k, v, qseg, kseg, block_q, block_kv, precision):
  """Returns out [B, Lq, H, D] and logsumexp [nq, B, H, bq] (f32)."""
  b, lq, h, d = q.shape
  lk = k.shape[1]
  scale = 1.0 / math.sqrt(d)
  nq, bq = _num_blocks(lq, block_q)
  nk, bk = _num_blocks(lk, block_kv)
  # [n, B, H, blk, D]: heads before length so block matmuls batch over (B, H).
  qb = jnp.swapaxes(_to_blocks(q, nq, bq), 2, 3)
  kb = jnp.swapaxes(_to_blocks(k, nk, bk), 2, 3)
  vb = jnp.swapaxes(_to_blocks(v, nk, bk), 2, 3)
  qsb = _to_blocks(qseg, nq, bq)
  ksb = _to_blocks(kseg, nk, bk)

  def q_block(args):
    qi, qs = args

    def kv_step(carry, kv):
      m, l, acc = carry
      kj, vj, ks = kv
      s, mask = _block_probs(qi, kj, qs, ks, scale, precision)
      s = jnp.where(mask, s, _MASK_VALUE)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      corr = jnp.exp(m - m_new)
      l = l * corr + jnp.sum(p, axis=-1)
      pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(vj.dtype), vj, precision=precision,
                      preferred_element_type=jnp.float32)
      acc = acc * corr[..., None] + pv
      return (m_new, l, acc), None

    init = (jnp.full((b, h, bq), _MASK_VALUE, jnp.float32),
            jnp.zeros((b, h, bq), jnp.float32),
            jnp.zeros((b, h, bq, d), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(kv_step, init, (kb, vb, ksb))
    valid = l > 0
    # No valid key: output 0; lse 0 is harmless since every p there is masked.
    out = acc / jnp.where(valid, l, 1.0)[..., None]
    lse = jnp.where(valid, m + jnp.log(jnp.where(valid, l, 1.0)), 0.0)
    return out.astype(q.dtype), lse

  out, lse = jax.lax.map(q_block, (qb, qsb))  # [nq, B, H, bq, D], [nq, B, H, bq]
  out = jnp.moveaxis(jnp.swapaxes(out, 2, 3), 0, 1).reshape(b, nq * bq, h, d)
  return out[:, :lq], lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _blockwise_attention(q, k, v, qseg, kseg, block_q, block_kv, precision):
  return _blockwise_fwd_impl(q, k, v, qseg, kseg, block_q, block_kv, precision)[0]


def _blockwise_fwd(q, k, v, qseg, kseg, block_q, block_kv, precision):
  out, lse = _blockwise_fwd_impl(q, k, v, qseg, kseg, block_q, block_kv, precision)
  out, lse = (checkpoint_name(x, RESIDUALS_NAME) for x in (out, lse))
  return out, (q, k, v, qseg, kseg, out, lse)


def _blockwise_bwd(block_q, block_kv, precision, res, dout):
  """FlashAttention-2 backward: recomputes block logits, O(L) memory."""
  q, k, v, qseg, kseg, out, lse = res
  b, lq, h, d = q.shape
  lk = k.shape[1]
  scale = 1.0 / math.sqrt(d)
  nq, bq = _num_blocks(lq, block_q)
  nk, bk = _num_blocks(lk, block_kv)
  # delta_i = sum_d dO_i * O_i, the softmax-backward row term.
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, Lq, H]
  qb = jnp.swapaxes(_to_blocks(q, nq, bq), 2, 3)
  dob = jnp.swapaxes(_to_blocks(dout, nq, bq), 2, 3)
  deltab = jnp.swapaxes(_to_blocks(delta, nq, bq), 2, 3)  # [nq, B, H, bq]
  kb = jnp.swapaxes(_to_blocks(k, nk, bk), 2, 3)
  vb = jnp.swapaxes(_to_blocks(v, nk, bk), 2, 3)
  qsb = _to_blocks(qseg, nq, bq)
  ksb = _to_blocks(kseg, nk, bk)

  def kv_block(dq, kv):
    kj, vj, ks = kv

    def q_step(carry, qargs):
      dk, dv = carry
      qi, doi, lsei, deltai, qs = qargs
      s, mask = _block_probs(qi, kj, qs, ks, scale, precision)
      p = jnp.where(mask, jnp.exp(s - lsei[..., None]), 0.0)
      dv = dv + jnp.einsum("bhqk,bhqd->bhkd", p.astype(doi.dtype), doi,
                           precision=precision, preferred_element_type=jnp.float32)
      dp = jnp.einsum("bhqd,bhkd->bhqk", doi, vj, precision=precision,
                      preferred_element_type=jnp.float32)
      ds = (p * (dp - deltai[..., None]) * scale).astype(qi.dtype)
      dk = dk + jnp.einsum("bhqk,bhqd->bhkd", ds, qi, precision=precision,
                           preferred_element_type=jnp.float32)
      dqi = jnp.einsum("bhqk,bhkd->bhqd", ds, kj, precision=precision,
                       preferred_element_type=jnp.float32)
      return (dk, dv), dqi

    init = (jnp.zeros((b, h, bk, d), jnp.float32), jnp.zeros((b, h, bk, d), jnp.float32))
    (dk, dv), dq_part = jax.lax.scan(q_step, init, (qb, dob, lse, deltab, qsb))
    return dq + dq_part, (dk, dv)

  dq0 = jnp.zeros((nq, b, h, bq, d), jnp.float32)
  dq, (dk, dv) = jax.lax.scan(kv_block, dq0, (kb, vb, ksb))

  def unblock(x, length, dtype):
    n, _, _, blk, _ = x.shape
    x = jnp.moveaxis(jnp.swapaxes(x, 2, 3), 0, 1).reshape(b, n * blk, h, d)
    return x[:, :length].astype(dtype)

  return (unblock(dq, lq, q.dtype), unblock(dk, lk, k.dtype), unblock(dv, lk, v.dtype),
          None, None)


_blockwise_attention.defvjp(_blockwise_fwd, _blockwise_bwd)


def _cpu_flash_call(target, results, *args, **attrs):
  from sora_jax.kernels import cpu as cpu_kernels  # pylint: disable=g-import-not-at-top
  cpu_kernels.load()
  return jax.ffi.ffi_call(target, results, vmap_method="sequential")(
      *args, block_q=np.int64(CPU_FLASH_BLOCK_Q), block_kv=np.int64(CPU_FLASH_BLOCK_KV), **attrs)


@jax.custom_vjp
def _cpu_flash(q, k, v, qseg, kseg):
  return _cpu_flash_fwd(q, k, v, qseg, kseg)[0]


def _cpu_flash_fwd(q, k, v, qseg, kseg):
  from sora_jax.kernels import cpu as cpu_kernels  # pylint: disable=g-import-not-at-top
  b, lq, h, _ = q.shape
  out, lse = _cpu_flash_call(cpu_kernels.FLASH_FORWARD,
                             (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                              jax.ShapeDtypeStruct((b, h, lq), jnp.float32)), q, k, v, qseg, kseg)
  out, lse = (checkpoint_name(x, RESIDUALS_NAME) for x in (out, lse))
  return out, (q, k, v, qseg, kseg, out, lse)


def _cpu_flash_bwd(res, dout):
  from sora_jax.kernels import cpu as cpu_kernels  # pylint: disable=g-import-not-at-top
  q, k, v, qseg, kseg, out, lse = res
  dq, dk, dv = _cpu_flash_call(cpu_kernels.FLASH_BACKWARD,
                               tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
                               q, k, v, qseg, kseg, out, lse, dout.astype(jnp.float32))
  return dq, dk, dv, None, None


_cpu_flash.defvjp(_cpu_flash_fwd, _cpu_flash_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(11,))
def _cpu_flash_norm_rope(q, k, v, qseg, kseg, q_scale, k_scale, q_cos, q_sin, k_cos, k_sin, eps):
  return _cpu_flash_norm_rope_fwd(q, k, v, qseg, kseg, q_scale, k_scale, q_cos, q_sin, k_cos, k_sin, eps)[0]


def _cpu_flash_norm_rope_fwd(q, k, v, qseg, kseg, q_scale, k_scale, q_cos, q_sin, k_cos, k_sin, eps):
  from sora_jax.kernels import cpu as cpu_kernels  # pylint: disable=g-import-not-at-top
  b, lq, h, _ = q.shape
  args = (q, k, v, qseg, kseg, q_scale, k_scale, q_cos, q_sin, k_cos, k_sin)
  out, lse = _cpu_flash_call(cpu_kernels.FLASH_NORM_ROPE_FORWARD,
                             (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                              jax.ShapeDtypeStruct((b, h, lq), jnp.float32)), *args, eps=np.float32(eps))
  out, lse = (checkpoint_name(x, RESIDUALS_NAME) for x in (out, lse))
  return out, (args, out, lse)


def _cpu_flash_norm_rope_bwd(eps, res, dout):
  from sora_jax.kernels import cpu as cpu_kernels  # pylint: disable=g-import-not-at-top
  args, out, lse = res
  q, k, v, _, _, q_scale, k_scale = args[:7]
  grads = _cpu_flash_call(cpu_kernels.FLASH_NORM_ROPE_BACKWARD,
                          tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v, q_scale, k_scale)),
                          *args, out, lse, dout.astype(jnp.float32), eps=np.float32(eps))
  dq, dk, dv, dq_scale, dk_scale = grads
  return dq, dk, dv, None, None, dq_scale, dk_scale, None, None, None, None


_cpu_flash_norm_rope.defvjp(_cpu_flash_norm_rope_fwd, _cpu_flash_norm_rope_bwd)


def cpu_flash_supported(head_dim: int) -> bool:
  """Whether cpu_flash can run here: compiling for CPU, head dim a multiple of 16, kernel built."""
  if mesh_lib.target_platform() != "cpu" or head_dim % 16:
    return False
  from sora_jax.kernels import cpu as cpu_kernels  # pylint: disable=g-import-not-at-top
  return cpu_kernels.available()


def _cpu_flash_attention(q, k, v, q_segment_ids, kv_segment_ids, *prologue, eps=None):
  """The fused C++ CPU kernel; computes in float32 and returns q.dtype. `prologue`: the arrays of a
  `QKNormRope` (q_scale, k_scale, q_cos, q_sin, k_cos, k_sin), fused into the kernel, with its `eps`."""
  if mesh_lib.target_platform() != "cpu":
    raise ValueError(f"attention backend 'cpu_flash' runs on CPU only, but the target platform is "
                     f"{mesh_lib.target_platform()!r}; use backend='auto'.")
  if q.shape[-1] % 16:
    raise ValueError(f"attention backend 'cpu_flash' needs a head dim that is a multiple of 16; got "
                     f"{q.shape[-1]}. Use backend='blockwise'.")
  q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
  ids = (q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32))
  if prologue:
    out = _cpu_flash_norm_rope(q32, k32, v32, *ids, *(x.astype(jnp.float32) for x in prologue), eps)
  else:
    out = _cpu_flash(q32, k32, v32, *ids)
  return out.astype(q.dtype)


def _cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids):
  """cuDNN flash attention through `jax.nn.dot_product_attention`.

  The public API has no segment-id argument (its `query_seq_lengths` /
  `key_value_seq_lengths` describe one segment per row), so the segment
  constraint goes in as the boolean `mask`; jax turns it into an additive
  [B, 1, Lq, Lk] bias in the input dtype (memory O(Lq * Lk) bytes, compute
  still fused). cuDNN only takes fp16/bf16: float32 inputs run in bfloat16 and
  the output is cast back to q.dtype.
  """
  if jax.default_backend() != "gpu":
    raise ValueError(
        f"attention backend 'cudnn' needs a GPU, but jax.default_backend() is "
        f"{jax.default_backend()!r}; use backend='xla', 'blockwise' or 'auto'.")
  dtype = q.dtype if q.dtype in (jnp.float16, jnp.bfloat16) else jnp.bfloat16
  mask = segment_mask(q_segment_ids, kv_segment_ids)
  out = jax.nn.dot_product_attention(
      q.astype(dtype), k.astype(dtype), v.astype(dtype), mask=mask,
      implementation="cudnn")
  # Rows with no valid key see a uniform softmax over the bias; zero them.
  valid = jnp.any(mask, axis=-1)[:, 0, :, None, None]  # [B, Lq, 1, 1]
  return jnp.where(valid, out, 0).astype(q.dtype)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _splash_attention(q, k, v, q_segment_ids, kv_segment_ids, block_q, block_kv,
                      interpret=False, fused_bwd=False):
  """TPU splash attention with `SegmentIds`, vmapped over the batch.

  The kernel is single-example ([H, L, D]) and unscaled, so q is pre-scaled and
  the batch is vmapped. Lengths are padded to block multiples (segment 0).
  Plain call on one device's shard; `_per_shard` wraps it in shard_map.
  """
  if mesh_lib.target_platform() != "tpu" and not interpret:
    raise ValueError(
        f"attention backend {'splash_fused' if fused_bwd else 'splash'!r} needs a TPU, but the target "
        f"platform is {mesh_lib.target_platform()!r}; use backend='xla', 'blockwise' or 'auto'.")
  # Imported here: the Pallas TPU ops are only needed (and tested) on TPU.
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=g-import-not-at-top

  b, lq, h, d = q.shape
  lk = k.shape[1]
  # TPU tiles are 128 wide; blocks must divide the (padded) lengths.
  bq = min(_round_up(block_q, 128), _round_up(lq, 128))
  bk = min(_round_up(block_kv, 128), _round_up(lk, 128))
  lq_pad, lk_pad = _round_up(lq, bq), _round_up(lk, bk)

  def pad(x, length):
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, length - x.shape[1])
    return jnp.pad(x, widths)

  scale = 1.0 / math.sqrt(d)
  qp = jnp.swapaxes(pad(q * jnp.asarray(scale, q.dtype), lq_pad), 1, 2)  # [B, H, Lq, D]
  kp = jnp.swapaxes(pad(k, lk_pad), 1, 2)
  vp = jnp.swapaxes(pad(v, lk_pad), 1, 2)
  qs = pad(q_segment_ids.astype(jnp.int32), lq_pad)
  ks = pad(kv_segment_ids.astype(jnp.int32), lk_pad)

  mask = splash.MultiHeadMask([splash.FullMask((lq_pad, lk_pad)) for _ in range(h)])
  dq_blocks = {} if fused_bwd else dict(block_q_dq=bq, block_kv_dq=bk)
  block_sizes = splash.BlockSizes(
      block_q=bq, block_kv=bk, block_kv_compute=bk,
      block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=bk, use_fused_bwd_kernel=fused_bwd, **dq_blocks)
  kernel = splash.make_splash_mha_single_device(
      mask=mask, block_sizes=block_sizes, interpret=interpret, residual_checkpoint_name=RESIDUALS_NAME)
  out = jax.vmap(lambda q_, k_, v_, qs_, ks_: kernel(q_, k_, v_, splash.SegmentIds(q=qs_, kv=ks_)))(
      qp, kp, vp, qs, ks)
  out = jnp.swapaxes(out, 1, 2)[:, :lq]
  # Splash gives fully masked rows (padding, or no key in the segment) a finite
  # uniform average; the contract says 0.
  valid = jnp.any(segment_mask(q_segment_ids, kv_segment_ids)[:, 0], axis=-1)
  return jnp.where(valid[:, :, None, None], out, 0).astype(q.dtype)


def _per_shard(fn, q, k, v, q_segment_ids, kv_segment_ids, *prologue):
  """Runs a kernel without a partitioning rule (splash, cpu_flash) on each shard of the mesh in context.

  Batch goes over ('data', 'fsdp'), heads over 'tensor', queries over 'context'; keys and values are
  gathered along the sequence (all-gather context parallelism), so any segment layout stays exact.
  An axis that does not divide its dimension is left replicated. `prologue`: a `QKNormRope`'s arrays
  (scales replicated, rotation tables split like the tokens they rotate).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(q, k, v, q_segment_ids, kv_segment_ids, *prologue)
  size = dict(zip(mesh.axis_names, mesh.axis_sizes))

  def axis(names, dim):
    names = tuple(n for n in names if n in size)
    return names if names and dim % math.prod(size[n] for n in names) == 0 else None

  batch = axis(("data", "fsdp"), q.shape[0])
  heads = axis(("tensor",), q.shape[2])
  qlen = axis(("context",), q.shape[1])
  qspec, kvspec = P(batch, qlen, heads, None), P(batch, None, heads, None)
  specs = (qspec, kvspec, kvspec, P(batch, qlen), P(batch, None))
  if prologue:
    specs += (P(None), P(None)) + (P(batch, qlen, None),) * 2 + (P(batch, None, None),) * 2
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=qspec, check_vma=False)(
      q, k, v, q_segment_ids, kv_segment_ids, *prologue)


def resolve_backend(backend: str, q_len: int, kv_len: int, head_dim: int | None = None) -> str:
  """Maps "auto" to a concrete backend for the target platform (and, on CPU, the head dim)."""
  if backend != "auto":
    return backend
  platform = mesh_lib.target_platform()
  if platform == "tpu":
    return "splash"
  if platform == "gpu":
    return "cudnn"
  if max(q_len, kv_len) <= AUTO_BLOCKWISE_MIN_LEN:
    return "xla"
  return "cpu_flash" if head_dim is not None and cpu_flash_supported(head_dim) else "blockwise"


def attention(q, k, v, q_segment_ids, kv_segment_ids, *, backend: str = "xla",
              block_q: int = 512, block_kv: int = 512, precision=None,
              qk_norm_rope: QKNormRope | None = None) -> jax.Array:
  """Segment-masked multi-head attention.

  Args:
    q: [B, Lq, H, D] queries.
    k: [B, Lk, H, D] keys.
    v: [B, Lk, H, D] values.
    q_segment_ids: int32 [B, Lq], 0 = padding.
    kv_segment_ids: int32 [B, Lk], same numbering as `q_segment_ids`.
    backend: one of BACKENDS.
    block_q: query block size (blockwise, splash).
    block_kv: key/value block size (blockwise, splash).
    precision: matmul precision passed to einsums (xla, blockwise).
    qk_norm_rope: RMS norm and rotation of q and k before the logits (see `QKNormRope`); cpu_flash runs
      them inside its kernel, the other backends in JAX.

  Returns:
    [B, Lq, H, D] in q.dtype.
  """
  if backend not in BACKENDS:
    raise ValueError(f"Unknown attention backend {backend!r}; expected one of {BACKENDS}.")
  if q.ndim != 4 or k.shape != v.shape or k.shape[::2] != q.shape[::2]:
    raise ValueError(f"Expected q [B, Lq, H, D] and k, v [B, Lk, H, D]; got q {q.shape}, "
                     f"k {k.shape}, v {v.shape}.")
  if q_segment_ids.shape != q.shape[:2] or kv_segment_ids.shape != k.shape[:2]:
    raise ValueError(f"Segment ids must be [B, Lq] {q.shape[:2]} and [B, Lk] {k.shape[:2]}; "
                     f"got {q_segment_ids.shape} and {kv_segment_ids.shape}.")
  backend = resolve_backend(backend, q.shape[1], k.shape[1], q.shape[-1])
  if qk_norm_rope is not None and backend == "cpu_flash":
    p = qk_norm_rope
    return _per_shard(functools.partial(_cpu_flash_attention, eps=p.eps), q, k, v, q_segment_ids,
                      kv_segment_ids, p.q_scale, p.k_scale, *p.tables(q, k))
  if qk_norm_rope is not None:
    q, k = qk_norm_rope.apply(q, k)
  if backend == "xla":
    return _xla_attention(q, k, v, q_segment_ids, kv_segment_ids, precision)
  if backend == "blockwise":
    return _blockwise_attention(q, k, v, q_segment_ids.astype(jnp.int32),
                                kv_segment_ids.astype(jnp.int32), block_q, block_kv,
                                precision)
  if backend == "cudnn":
    return _cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids)
  if backend in ("splash", "splash_fused"):
    fn = functools.partial(_splash_attention, block_q=block_q, block_kv=block_kv,
                           fused_bwd=backend == "splash_fused")
    return _per_shard(fn, q, k, v, q_segment_ids, kv_segment_ids)
  if backend == "cpu_flash":
    return _per_shard(_cpu_flash_attention, q, k, v, q_segment_ids, kv_segment_ids)
  raise ValueError(f"Unknown attention backend {backend!r}; expected one of {BACKENDS}.")
