"""Parameter and FLOP counts: the DiT paper's table, and the analytic count against XLA's cost analysis."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import dit_image
from configs import tiny_t2v
from sora_jax.models import t2v
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.train import flops as flops_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# DiT paper (arXiv 2212.09748), Table 4 and Figure 2/Section 4: parameters and forward Gflops at 256x256,
# patch 2, where the paper's Gflops count multiply-accumulates.
PAPER = {"S/2": (33e6, 6.06), "B/2": (130e6, 23.01), "L/2": (458e6, 80.71), "XL/2": (675e6, 118.64)}


@pytest.mark.parametrize("variant", sorted(PAPER))
def test_image_configs_match_dit_paper(variant):
  params, gflops = PAPER[variant]
  config = dit_image.get_config(f"variant={variant}")
  sizes = flops_lib.param_counts(config)
  assert sizes["text"] == 0
  # The paper rounds parameters to 1M (S: 33M); QK-norm and RoPE change ours by < 0.1%.
  assert abs(sizes["dit"] - params) / params < 0.015, sizes
  macs = flops_lib.forward_flops_per_row(config) / 2
  assert abs(macs / 1e9 - gflops) / gflops < 0.005, macs


def test_count_tool_last_line_is_json():
  result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "count.py"),
                           "--config=configs/dit_image.py:variant=S/2"], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120, check=True)
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["params"] == pytest.approx(33e6, rel=0.015) and out["forward_gflops"] == pytest.approx(6.06, rel=0.005)


@pytest.mark.parametrize("variant", ["cross_attention", "class", "demo", "adaln_single_text_proj"])
def test_analytic_forward_flops_match_xla(variant):
  """Unrolled layers (a scanned body would be costed once); XLA also counts element-wise ops."""
  if variant == "demo":
    # Summed word embeddings, no cross-attention: the text encoder's layers are dead code, counted by neither.
    config = tiny_t2v.use_standard_schedule(tiny_t2v.get_config("runlocal"))
    config.dit.cross_attention = False
    config.text.update(width=64, depth=1, num_heads=2)
  elif variant == "class":
    config = dit_image.get_config("runlocal")
  else:
    # The cross-attention path, and no absolute position embedding (element-wise work XLA counts).
    config = tiny_t2v.use_standard_schedule(tiny_t2v.use_cross_attention(tiny_t2v.get_config("runlocal")))
    config.text.update(width=64, depth=1, num_heads=2)
    if variant == "adaln_single_text_proj":  # Wan2.1's layout: one modulation projection, text projected once
      config.dit.update(shared_modulation=True, text_proj=True)
  config.attention = "xla"
  config.dit.update(width=128, depth=2, num_heads=2, scan_layers=False)
  S, L, Lt = 1, 64, 16
  config.train_dit.update(seq_len=L, text_seq_len=Lt)
  mesh = mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    model = t2v.TextToVideo(config, patch_dim=t2v.patch_dim(config), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  P = t2v.patch_dim(config)

  def forward(state, x, text):
    m = nnx.merge(graphdef, state)
    seg = jnp.ones((1, L), jnp.int32)
    text_seg = jnp.ones((1, Lt), jnp.int32)
    coords = jnp.zeros((1, L, 3), jnp.int32)
    states, pooled = m.encode_text(text, text_seg, jnp.arange(Lt)[None], S,
                                   labels=jnp.zeros((1, S, 6), jnp.int32))
    return m(x, coords, seg, jnp.full((1, S), 0.5), states, text_seg, pooled)

  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    compiled = jax.jit(forward).lower(state, jnp.zeros((1, L, P)), jnp.ones((1, Lt), jnp.int32)).compile()
  cost = compiled.cost_analysis()
  xla = float((cost[0] if isinstance(cost, list) else cost)["flops"])
  analytic = flops_lib.forward_flops_per_row(config)
  assert analytic <= xla
  np.testing.assert_allclose(analytic, xla, rtol=0.06)


def test_attention_flops_are_the_scores_and_values():
  """What a compiler leaves out when attention runs in an uncosted kernel: 4 L^2 D per self-attention and
  4 L Lt D per cross-attention, per layer, times 3 for training."""
  config = tiny_t2v.use_standard_schedule(tiny_t2v.use_cross_attention(tiny_t2v.get_config("runlocal")))
  config.text.update(depth=0)
  B, L, Lt = config.train_dit.batch_size, config.train_dit.seq_len, config.train_dit.text_seq_len
  d, depth = config.dit.width, config.dit.depth
  expected = 3 * B * depth * (4 * L * L * d + 4 * L * Lt * d)
  np.testing.assert_allclose(flops_lib.attention_flops_per_step(config), expected, rtol=1e-9)
  assert flops_lib.attention_flops_per_step(config) < flops_lib.train_flops_per_step(config)
