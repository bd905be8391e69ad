"""tools/aot_compile.py without libtpu: topology names, the OOM parser, and splash attention's declared costs."""
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("aot_compile_tool", os.path.join(ROOT, "tools", "aot_compile.py"))
aot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(aot)


@pytest.mark.parametrize("name,expected", [
    ("v5p-8", ("v5p", "v5p:2x2x1")), ("v5p-64", ("v5p", "v5p:2x4x4")), ("v6e-8", ("v6e", "v6e:2x4")),
    ("v5p:4x4x4", ("v5p", "v5p:4x4x4"))])
def test_topology_names(name, expected):
  assert aot.topology_name(name) == expected


def test_bad_topology_is_named():
  with pytest.raises(ValueError, match=r"--topology='v5p-12': 6 chips is not a power of two"):
    aot.topology_name("v5p-12")
  with pytest.raises(ValueError, match=r"--topology='tpu64'"):
    aot.topology_name("tpu64")


def test_oom_messages_give_the_bytes_wanted():
  assert aot._bytes_from_oom("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 118.19G of "
                             "95.74G hbm.") == int(118.19 * 2**30)
  assert aot._bytes_from_oom("XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
                             "The memory required for HLO temporaries (512.5M) exceeds") == int(512.5 * 2**20)
  assert aot._bytes_from_oom("something else") is None


H, LQ, LK, D = 4, 512, 256, 64


def _operands(dtype=jnp.bfloat16):
  q = jax.ShapeDtypeStruct((H, LQ, D), dtype)
  k = jax.ShapeDtypeStruct((H, LK, D), dtype)
  seg = jax.ShapeDtypeStruct((LQ,), jnp.int32)
  return (None, None, None, q, k, k, seg)


def test_splash_kernel_costs_count_every_matmul_and_reread():
  args = _operands()
  q_bytes, kv_bytes = H * LQ * D * 2, 2 * H * LK * D * 2  # bf16
  scores = H * LQ * LK * D
  out = jax.ShapeDtypeStruct((H, LQ, D), jnp.bfloat16)
  # Forward over 4 query blocks: q K^T and P V; k and v are read once per query block.
  flops, trans, nbytes = aot.splash_kernel_cost("splash_mha_fwd_segmented_no_residuals", args, out, (H, 4, 2))
  assert flops == 4 * scores and trans == H * LQ * LK
  assert nbytes == q_bytes + kv_bytes + LQ * 4 + q_bytes + 3 * kv_bytes
  # dq recomputes the scores: q K^T, dO V^T, dS K.
  flops, _, _ = aot.splash_kernel_cost("splash_mha_dq_segmented", args, out, (H, 4, 2))
  assert flops == 6 * scores
  # dkv: q K^T, P^T dO, dO V^T, dS^T q; and dS K as well when it also forms dq (the fused backward kernel's
  # output of one dq per key block).
  dkv_out = [jax.ShapeDtypeStruct((8, D), jnp.float32), jax.ShapeDtypeStruct((H, LK, D), jnp.bfloat16)]
  assert aot.splash_kernel_cost("splash_mha_dkv_segmented", args, dkv_out, (H, 2, 4))[0] == 8 * scores
  fused = dkv_out + [jax.ShapeDtypeStruct((2, H, LQ, D), jnp.bfloat16)]
  assert aot.splash_kernel_cost("splash_mha_dkv_segmented", args, fused, (H, 2, 4))[0] == 10 * scores


def test_declared_costs_reach_every_splash_kernel_of_a_train_step(monkeypatch):
  """Forward, dq and dkv kernels of the real splash attention (Pallas interpreter on CPU) all get a cost,
  and the splash module is left as it was."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
  from sora_jax.models import attention
  seen = []
  real = aot.splash_kernel_cost

  def spy(name, args, out_shape, grid):
    seen.append(name.split("_")[2])
    return real(name, args, out_shape, grid)

  monkeypatch.setattr(aot, "splash_kernel_cost", spy)
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 128, 2, 32)), jnp.float32) for _ in range(3))
  seg = jnp.ones((1, 128), jnp.int32)
  loss = lambda q, k, v: attention._splash_attention(q, k, v, seg, seg, 128, 128, interpret=True).sum()  # noqa: E731
  before = kernel_lib.pl
  with aot.declared_splash_costs():
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v)
  assert kernel_lib.pl is before
  assert sorted(set(seen)) == ["dkv", "dq", "fwd"], seen


def test_which_attention_backends_are_in_the_estimated_time():
  assert aot.attention_costed("xla", "none")
  assert aot.attention_costed("splash", "declare") and aot.attention_costed("splash_fused", "declare")
  assert not aot.attention_costed("splash", "none") and not aot.attention_costed("splash_fused", "none")
  # Blockwise attention is a scan body, which the compiler costs once per layer, not once per block.
  assert not aot.attention_costed("blockwise", "declare")
