"""Spacetime Diffusion Transformer over packed latent patches.

Tokens of several samples share a row; everything per sample (timestep, pooled text, grid) lives in
per-segment tables [B, S, ...] that are gathered to tokens by segment id. Self-attention stays within a
segment, cross-attention goes only to the text tokens of the same segment, 3D RoPE is computed from each
token's (t, h, w) coordinates, and adaLN-Zero modulation is computed per segment (cheap) then gathered.

Class conditioning (DiT's ImageNet setting, UCF-101-style video benchmarks): with `num_classes`, a label
embedding table of `num_classes + 1` rows (the last is the null class of classifier-free guidance) is added
to the timestep embedding in place of pooled text, and `cross_attention=False` drops the text branch.

Frame conditioning (image-to-video, extension): tokens with `cond_mask == 1` are given clean, so they are
modulated as at t = 0. The per-segment table is then doubled, `[B, 2S, ...]` (rows S.. at t = 0), and a
conditioned token of segment k reads row S + k - 1: still one gather, and no new parameters.

Two knobs for small models on short schedules (the demo's measurements are in experiments/tiny_t2v/README.md):
`gate_init` starts the two residual gates of every block open at that value instead of zero (adaLN-Zero is
gate_init=0, the default; with Adam a zero gate moves about lr per step at most); `rope_theta` is the RoPE base
(10^4 by default; with a small head dim on a grid of a few positions per axis, a base of ~100 leaves more
rotation pairs that turn noticeably across the grid).

`abs_pos` adds a sinusoidal embedding of each token's absolute (t, h, w) to the patch embedding (same base
as RoPE). RoPE only tells attention how far apart two tokens are; with `abs_pos` a token also knows which
frame it is in and where in the frame, so a caption such as "moving left" can be turned into "on the right
early, on the left late" directly (experiments/tiny_t2v/README.md). `abs_pos_kind` picks the embedding:
per-axis token indices ('axes'), plane waves in spacetime ('oblique'), fractions of the clip's extent
('fractional', the same for every grid size) or those fractions for h and w only ('fractional_space': which
frame a token is in is left to RoPE, i.e. known only relative to the other frames).

`temporal_attention` adds a second self-attention beside the spacetime one in every block, masked to the
tokens at the same (h, w) of the same clip (STDiT/Latte-style factorised attention, here as an extra path
rather than a replacement): each token reads its location's time series directly instead of having to
single it out of the whole clip, which is what keeping one object through a clip and moving it needs. The
two attentions share the block's modulation and gate; the mask is one more set of segment ids, so every
attention backend serves it.

`position_modulation` computes the final layer's adaLN shift and scale per token from the segment's
conditioning plus a learned projection of the token's sinusoidal (t, h, w) embedding, instead of per segment.
With per-segment modulation the output layer can only move a whole clip's mean by the caption (colour,
shape, background); a caption whose mean is a pattern in space and time ("moving left": on the right early,
on the left late) must be built by the blocks. Here one hidden layer (silu of the sum) holds that
interaction. Cost: one [L, D] x [D, 2D] matmul per token, once per forward.

`cond_flag` adds a learned vector to the conditioning of every token of a segment that has given frames
(any `cond_mask` token), so the noisy tokens of a clip know whether the clip's content is partly given or
must come from the caption alone. Without it only the given tokens themselves are marked (modulated as
t = 0), and a noisy token can only find out through attention; with frame conditioning in training, the
caption stops steering direction (experiments/tiny_t2v/README.md, runs AG and D9-D14). Unit scale at
init, like the class embedding. Text-to-video (no `cond_mask`) never adds it.

`shared_modulation` (adaLN-single, as in PixArt-alpha and Wan2.1) projects the conditioning to the six
modulation vectors once, shared by every block, and each block adds its own learned [6, D] table, instead of
each block projecting the conditioning itself: 6 D^2 parameters in all instead of 6 D^2 per block (425M of
a 1.3B-size DiT at width 1536, depth 30). Both start at zero (plus `gate_init` on the gates), so the model
starts as the identity, as with adaLN-Zero.

`text_proj` maps the text features to the DiT's width once (Dense, GELU, Dense, as Wan2.1), and every
block's cross-attention reads keys and values from that width instead of from the text encoder's: with
4096-wide umT5 features that is 2 * 4096 * D of key/value weights per block less.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax import segments
from sora_jax.models import attention as attention_lib
from sora_jax.models import layers
from sora_jax.models import rope as rope_lib
from sora_jax.parallel import mesh as mesh_lib

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Full remat, except the attention outputs and their log-sum-exp (splash, blockwise): the backward pass
    # does not run attention's forward again. At 32,760 tokens that is 22 -> 18 H L^2 D of attention FLOPs
    # per layer for one [L, D] output and an [H, L] statistic kept per layer.
    "save_attention": jax.checkpoint_policies.save_only_these_names(attention_lib.RESIDUALS_NAME),
}


# Model sizes as big_vision-style variant strings "S/2": (width, depth, heads) of the DiT paper's table.
VARIANTS = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}


def decode_variant(variant: str) -> dict:
  """"XL/2" -> {width, depth, num_heads, patch}; the patch is spatial (a video config picks its own pt)."""
  name, _, patch = variant.partition("/")
  if name not in VARIANTS or not patch.isdigit():
    raise ValueError(f"DiT variant {variant!r}: expected NAME/PATCH with NAME in {sorted(VARIANTS)}, e.g. 'XL/2'")
  width, depth, heads = VARIANTS[name]
  return dict(width=width, depth=depth, num_heads=heads, patch=int(patch))


def _gate_bias(gate_init: float) -> jax.Array:
  """[6, 1] starting bias of the modulation projection: zero, except the two residual gates at `gate_init`."""
  return jnp.zeros((6, 1), jnp.float32).at[jnp.array([2, 5])].set(gate_init)


class DiTBlock(nnx.Module):
  """adaLN-Zero block: modulated self-attention, cross-attention to text (optional), modulated MLP."""

  def __init__(self, dim, num_heads, mlp_ratio, text_dim, *, qk_norm, backend, dtype, gate_init=0.0,
               temporal_attention=False, shared_modulation=False, rngs):
    self.norm1 = layers.LayerNorm()
    self.attn = layers.Attention(dim, num_heads, qk_norm=qk_norm, backend=backend, dtype=dtype, rngs=rngs)
    self.temporal = (layers.Attention(dim, num_heads, qk_norm=qk_norm, backend=backend, dtype=dtype, rngs=rngs)
                     if temporal_attention else None)
    if text_dim:
      self.norm2 = layers.RMSNorm(dim)
      self.cross = layers.Attention(dim, num_heads, kv_dim=text_dim, qk_norm=qk_norm, backend=backend,
                                    dtype=dtype, rngs=rngs)
    else:
      self.norm2 = self.cross = None
    self.norm3 = layers.LayerNorm()
    self.mlp = layers.MLP(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
    # Zero-initialised modulation: every block starts as the identity (adaLN-Zero). With gate_init > 0 the
    # two residual gates start open at that value instead (the weights stay zero); see the module docstring.
    # With shared modulation the gates' starting value lives in the shared projection's bias (DiT).
    if shared_modulation:
      self.ada = None
      self.ada_table = nnx.Param(jnp.zeros((6, dim), jnp.float32), out_sharding=(None, "embed"))
    else:
      self.ada = layers.Dense(dim, (6, dim), ("cond", None, "embed"), zero_init=True,
                              bias_init=_gate_bias(gate_init), rngs=rngs)
      self.ada_table = None

  def __call__(self, x, cond, seg, rope, text, text_seg, cond_ids=None, loc_ids=None):
    """x [B,L,D]; cond [B,S',D] per table row ([B,S',6,D] shared modulation with `shared_modulation`);
    text [B,Lt,Dt]; cond_ids [B,L] rows of cond (default seg); loc_ids [B,L] one id per (segment, h, w),
    needed with temporal attention."""
    if self.ada is None:
      mod = cond + self.ada_table[...]  # [B, S', 6, D]
    else:
      mod = self.ada(jax.nn.silu(cond))  # [B, S', 6, D]
    # Each of the six vectors is gathered to the tokens on its own: one [B, L, 6, D] gather is a buffer of its
    # own, and its gradient is concatenated into another before the segment sum, which made the block's
    # modulation twice as slow on XLA:CPU, fwd + bwd (experiments/scaling/README.md).
    ids = seg if cond_ids is None else cond_ids
    shift1, scale1, gate1, shift2, scale2, gate2 = [
        segments.gather(mod[:, :, i], ids).astype(x.dtype) for i in range(6)]  # [B, L, D] each
    h = self.norm1(x) * (1 + scale1) + shift1
    a = self.attn(h, seg, rope=rope)
    if self.temporal is not None:
      a = a + self.temporal(h, loc_ids, rope=rope)
    x = x + gate1 * a
    if self.cross is not None:
      x = x + self.cross(self.norm2(x), seg, context=text, kv_segment_ids=text_seg)
    h = self.norm3(x) * (1 + scale2) + shift2
    x = x + gate2 * self.mlp(h)
    return mesh_lib.constrain(x, ("act_batch", "act_len", "act_embed"))


class DiT(nnx.Module):
  """Diffusion Transformer: packed noisy patches + per-segment t and text (or class) -> velocity per patch."""

  def __init__(self, *, patch_dim: int, width: int, depth: int, num_heads: int, mlp_ratio: float,
               text_dim: int, qk_norm: bool = True, backend: str = "xla", scan_layers: bool = True,
               remat: str = "none", dtype=jnp.float32, num_classes: int = 0, cross_attention: bool = True,
               rope_theta: float = 10000.0, gate_init: float = 0.0, abs_pos: bool = False,
               temporal_attention: bool = False, position_modulation: bool = False,
               abs_pos_kind: str = "axes", cond_flag: bool = False, scan_unroll: int = 1,
               shared_modulation: bool = False, text_proj: bool = False, rngs: nnx.Rngs):
    if remat not in REMAT_POLICIES:
      raise ValueError(f"dit.remat={remat!r}: choose one of {sorted(REMAT_POLICIES)}")
    self.width, self.num_heads, self.depth = width, num_heads, depth
    self.scan_layers, self.remat, self.dtype = scan_layers, remat, dtype
    if scan_unroll < 1:
      raise ValueError(f"dit.scan_unroll={scan_unroll}: must be >= 1 (layers per scan iteration)")
    self.scan_unroll = min(scan_unroll, depth)
    self.num_classes, self.rope_theta, self.abs_pos = num_classes, rope_theta, abs_pos
    self.temporal_attention, self.abs_pos_kind = temporal_attention, abs_pos_kind
    # Final-layer modulation per token from (conditioning + its position): see the module docstring.
    self.pos_cond = (layers.Dense(width, width, ("embed", "cond"), rngs=rngs) if position_modulation else None)
    # Added to the conditioning of segments with given frames (see the module docstring).
    self.cond_flag = (nnx.Param(jax.random.normal(rngs.params(), (width,)), out_sharding=("cond",))
                      if cond_flag else None)
    self.patch_in = layers.Dense(patch_dim, width, ("patch", "embed"), dtype=dtype, rngs=rngs)
    self.t_mlp1 = layers.Dense(256, width, ("cond", "embed"), rngs=rngs)
    self.t_mlp2 = layers.Dense(width, width, ("embed", "cond"), rngs=rngs)
    if num_classes:
      # Row num_classes is the null class (label dropout, the unconditional branch of CFG). Unit scale, as
      # the timestep embedding it is added to: at 0.02 a label is 2% of the conditioning vector and a class
      # whose effect is a pattern in space and time (a direction of motion) is not learnt at all in the
      # demo's steps, at 1 it is (experiments/tiny_t2v/README.md, runs Y and Z).
      self.class_embed = nnx.Param(jax.random.normal(rngs.params(), (num_classes + 1, width)),
                                   out_sharding=("vocab", "cond"))
      self.text_pool = None
    else:
      self.class_embed = None
      self.text_pool = layers.Dense(text_dim, width, ("embed", "cond"), rngs=rngs)
    # Shared modulation (adaLN-single) and the text projection: see the module docstring.
    if shared_modulation:
      self.shared_ada = layers.Dense(width, (6, width), ("cond", None, "embed"), zero_init=True,
                                     bias_init=_gate_bias(gate_init), rngs=rngs)
    else:
      self.shared_ada = None
    if text_proj and cross_attention and not num_classes:
      self.text_in1 = layers.Dense(text_dim, width, ("embed", "mlp"), dtype=dtype, rngs=rngs)
      self.text_in2 = layers.Dense(width, width, ("mlp", "embed"), dtype=dtype, rngs=rngs)
      block_text_dim = width
    else:
      self.text_in1 = self.text_in2 = None
      block_text_dim = text_dim
    make = functools.partial(DiTBlock, width, num_heads, mlp_ratio, block_text_dim if cross_attention else 0,
                             qk_norm=qk_norm, backend=backend, dtype=dtype, gate_init=gate_init,
                             temporal_attention=temporal_attention, shared_modulation=shared_modulation)
    if scan_layers:
      @nnx.split_rngs(splits=depth)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def stack(r):
        return make(rngs=r)
      self.blocks = stack(rngs)
    else:
      self.blocks = nnx.List([make(rngs=rngs) for _ in range(depth)])
    self.final_norm = layers.LayerNorm()
    self.final_ada = layers.Dense(width, (2, width), ("cond", None, "embed"), zero_init=True, rngs=rngs)
    self.patch_out = layers.Dense(width, patch_dim, ("embed", "patch"), zero_init=True, rngs=rngs)

  def conditioning(self, t_table, pooled):
    """Per-segment conditioning [B, S, D] from t [B, S] and pooled text [B, S, Dt] (or class ids [B, S])."""
    temb = layers.timestep_embedding(t_table, 256)
    c = self.t_mlp2(jax.nn.silu(self.t_mlp1(temb)))
    if self.class_embed is not None:
      # One-hot matmul: S rows per batch row, and a gather's backward would be a scatter-add.
      return c + jax.nn.one_hot(pooled, self.num_classes + 1, dtype=jnp.float32) @ self.class_embed[...]
    return c + self.text_pool(pooled)

  def __call__(self, tokens, coords, seg, t_table, text, text_seg, text_pooled, cond_mask=None):
    """tokens [B,L,P], coords [B,L,3], seg [B,L], t_table [B,S], text [B,Lt,Dt], text_seg [B,Lt],
    text_pooled [B,S,Dt] (class ids [B,S] with num_classes), cond_mask [B,L] (optional, 1 = token given
    clean) -> velocity [B,L,P] (zero on padding). `text` may be None without cross-attention."""
    x = self.patch_in(tokens.astype(self.dtype))
    if self.abs_pos:
      x = x + rope_lib.absolute_3d(self.abs_pos_kind, coords, self.width, self.rope_theta, segment_ids=seg,
                                   num_segments=t_table.shape[1]).astype(x.dtype)
    x = mesh_lib.constrain(x, ("act_batch", "act_len", "act_embed"))
    cond = self.conditioning(t_table, text_pooled)
    cond_ids = seg  # which conditioning-table row each token reads
    if cond_mask is not None:
      # Rows S.. of the doubled table hold each segment's conditioning at t = 0.
      cond = jnp.concatenate([cond, self.conditioning(jnp.zeros_like(t_table), text_pooled)], axis=1)
      if self.cond_flag is not None:
        given = segments.count(cond_mask > 0, seg, t_table.shape[1]) > 0  # [B, S]
        cond = cond + jnp.tile(given, (1, 2))[..., None] * self.cond_flag[...]
      cond_ids = seg + jnp.where((seg > 0) & (cond_mask > 0), t_table.shape[1], 0).astype(seg.dtype)
    rope = rope_lib.rope_3d(coords, self.width // self.num_heads, self.rope_theta)
    text = None if text is None else text.astype(self.dtype)
    if text is not None and self.text_in1 is not None:
      text = self.text_in2(jax.nn.gelu(self.text_in1(text), approximate=True))
      text = mesh_lib.constrain(text, ("act_batch", None, "act_embed"))
    # What every block reads: the conditioning rows, or their shared modulation (adaLN-single).
    block_cond = cond if self.shared_ada is None else self.shared_ada(jax.nn.silu(cond))
    loc_ids = segments.location_ids(seg, coords) if self.temporal_attention else None

    def apply_block(block, x):
      return block(x, block_cond, seg, rope, text, text_seg, cond_ids, loc_ids)

    policy = REMAT_POLICIES[self.remat]
    if self.scan_layers:
      graphdef, state = nnx.split(self.blocks)

      def body(x, layer_state):
        return apply_block(nnx.merge(graphdef, layer_state), x), None

      if self.remat != "none":
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
      x, _ = jax.lax.scan(body, x, state, unroll=self.scan_unroll)
    else:
      for block in self.blocks:
        fn = apply_block if self.remat == "none" else nnx.remat(apply_block, policy=policy)
        x = fn(block, x)
    if self.pos_cond is None:
      final_mod = segments.gather(self.final_ada(jax.nn.silu(cond)), cond_ids)
    else:
      pos = self.pos_cond(rope_lib.absolute_3d(self.abs_pos_kind, coords, self.width, self.rope_theta,
                                               segment_ids=seg, num_segments=t_table.shape[1]))
      final_mod = self.final_ada(jax.nn.silu(segments.gather(cond, cond_ids) + pos))
    shift, scale = [m[:, :, 0] for m in jnp.split(final_mod, 2, axis=2)]
    x = self.final_norm(x) * (1 + scale) + shift
    out = self.patch_out(x).astype(jnp.float32)
    return jnp.where((seg > 0)[..., None], out, 0.0)


def from_config(config, *, patch_dim: int, text_dim: int, backend: str, rngs: nnx.Rngs) -> DiT:
  """config.dit (+ config.text.num_classes when config.text.encoder == 'class') -> DiT."""
  d = config.dit
  num_classes = config.text.num_classes if config.text.encoder == "class" else 0
  return DiT(patch_dim=patch_dim, width=d.width, depth=d.depth, num_heads=d.num_heads,
             mlp_ratio=d.mlp_ratio, text_dim=text_dim, qk_norm=d.qk_norm, backend=backend,
             scan_layers=d.scan_layers, remat=d.remat, dtype=jnp.dtype(d.get("dtype", "float32")),
             num_classes=num_classes, cross_attention=d.get("cross_attention", True) and not num_classes,
             rope_theta=d.get("rope_theta", 10000.0), gate_init=d.get("gate_init", 0.0),
             abs_pos=d.get("abs_pos", False), temporal_attention=d.get("temporal_attention", False),
             position_modulation=d.get("position_modulation", False),
             abs_pos_kind=d.get("abs_pos_kind", "axes"), cond_flag=d.get("cond_flag", False),
             scan_unroll=d.get("scan_unroll", 1), shared_modulation=d.get("shared_modulation", False),
             text_proj=d.get("text_proj", False), rngs=rngs)
