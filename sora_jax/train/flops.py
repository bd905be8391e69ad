"""Analytic FLOPs of the denoiser (text encoder + DiT): the numerator of MFU and `tools/count.py`.

Counts matmul FLOPs (2 per multiply-accumulate) of one forward pass and takes training as 3x forward
(backward = 2x forward); recomputation under remat is not counted, as MFU conventions require.
Element-wise work (norms, RoPE, softmax, modulation) is left out: it is under 1% at these widths
(`tests/train/flops_test.py` checks the count against XLA's cost analysis). The DiT paper's "Gflops" count
multiply-accumulates, i.e. half of these.
"""
from __future__ import annotations

import jax
from flax import nnx

from sora_jax.models import t2v
from sora_jax.parallel import mesh as mesh_lib

TIMESTEP_FEATURES = 256  # sinusoidal features into the timestep MLP (models/dit.py)


def _layer_forward(width: int, mlp: int, tokens: float, attn_len: float, ctx_dim: int = 0,
                   ctx_tokens: float = 0.0, ctx_len: float = 0.0) -> float:
  """One pre-norm block over `tokens` tokens; self-attention spans `attn_len` keys per query.

  With `ctx_dim`, a cross-attention to `ctx_tokens` context tokens of width `ctx_dim`, of which each query
  sees `ctx_len`.
  """
  d = width
  f = 2 * tokens * (4 * d * d + 2 * d * mlp)      # self q k v o, MLP
  f += 2 * 2 * tokens * attn_len * d             # scores and weighted values
  if ctx_dim:
    f += 2 * tokens * 2 * d * d                   # cross q, o
    f += 2 * ctx_tokens * 2 * ctx_dim * d         # cross k, v from the context
    f += 2 * 2 * tokens * ctx_len * d
  return f


def forward_flops_per_row(config, *, video_attn_len: float | None = None, text_attn_len: float | None = None,
                          video_tokens: float | None = None, segments: int = 1) -> float:
  """Forward FLOPs of one packed row holding `segments` samples.

  By default a row is one segment filling `seq_len` video tokens and `text_seq_len` text tokens, so every
  token attends to the whole row; pass the mean per-token attention spans of a packed batch to count only
  what the segment masks keep (packing many short clips into a row makes attention cheaper).
  """
  d, t = config.dit, config.text
  L = config.train_dit.seq_len if video_tokens is None else video_tokens
  video_attn_len = L if video_attn_len is None else video_attn_len
  class_cond = t2v.is_class_conditional(config)
  cross = d.get("cross_attention", True) and not class_cond
  Lt = 0 if class_cond else config.train_dit.text_seq_len
  text_attn_len = Lt if text_attn_len is None else text_attn_len
  w, mlp = d.width, int(d.mlp_ratio * d.width)
  text_proj = cross and d.get("text_proj", False)
  ctx_dim = (w if text_proj else t.width) if cross else 0
  fwd = d.depth * _layer_forward(w, mlp, L, video_attn_len, ctx_dim, Lt, text_attn_len)
  fwd += 2 * L * 2 * t2v.patch_dim(config) * w                    # patch in and out
  if text_proj:
    fwd += 2 * Lt * (t.width * w + w * w)                         # text to the DiT's width, once
  # Per segment: timestep MLP, pooled-text projection, adaLN (shared, or of every block) and the final layer's.
  ada = (1 if d.get("shared_modulation", False) else d.depth) * 6 * w * w
  fwd += 2 * segments * (TIMESTEP_FEATURES * w + w * w + (0 if class_cond else t.width * w) + ada + 2 * w * w)
  if t2v.text_states_used(config):
    fwd += t.depth * _layer_forward(t.width, 4 * t.width, Lt, text_attn_len)
  return fwd


def train_flops_per_row(config, **kw) -> float:
  """Training FLOPs of one packed row (forward + backward); arguments as `forward_flops_per_row`."""
  return 3.0 * forward_flops_per_row(config, **kw)


def train_flops_per_step(config) -> float:
  """Training FLOPs of one global batch of full rows."""
  return config.train_dit.batch_size * train_flops_per_row(config)


def attention_flops_per_step(config) -> float:
  """The part of `train_flops_per_step` in attention scores and weighted values (self and cross).

  What a compiler's cost model leaves out when attention runs in a kernel that declares no cost.
  """
  without = config.train_dit.batch_size * train_flops_per_row(config, video_attn_len=0.0, text_attn_len=0.0)
  return train_flops_per_step(config) - without


def flops_per_token(config) -> float:
  """Training FLOPs per video token of a full row (the per-step log's tokens times this is the step)."""
  return train_flops_per_row(config) / config.train_dit.seq_len


def param_counts(config) -> dict:
  """{'dit', 'text'} parameter counts of the real NNX denoiser, built under `nnx.eval_shape` (no memory)."""
  mesh = mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    model = nnx.eval_shape(lambda: t2v.TextToVideo(config, patch_dim=t2v.patch_dim(config), rngs=nnx.Rngs(0)))
  size = lambda m: sum(int(x.size) for x in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
  return {"dit": size(model.dit), "text": 0 if model.text is None else size(model.text)}


# Dense bf16 peak per chip (public figures), FLOP/s.
PEAK_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12, "h100": 989e12}
