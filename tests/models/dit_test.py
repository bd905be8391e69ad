"""DiT over packed rows: a sample's output and gradients do not depend on what it is packed with."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny_t2v
from sora_jax import segments
from sora_jax.data import packing
from sora_jax.models import t2v
from sora_jax.models import rope as rope_lib
from sora_jax.models import text as text_lib
from sora_jax.parallel import mesh as mesh_lib

S, L, LT = 4, 48, 96


def _perturbed(config):
  mesh = mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    model = t2v.TextToVideo(config, patch_dim=t2v.patch_dim(config), rngs=nnx.Rngs(0))
  # Perturb the zero-initialised adaLN and output layers so the test sees a non-trivial network.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return config, mesh, graphdef, jax.tree.unflatten(tree, leaves), rest


@pytest.fixture(scope="module")
def setup():
  # With cross-attention, so the packing invariances also cover the text-segment mask, and RoPE as the only
  # position signal, so the RoPE test below can only pass through RoPE.
  config = tiny_t2v.use_standard_schedule(tiny_t2v.use_cross_attention(tiny_t2v.get_config("runlocal")))
  config.dit.scan_layers = True
  return _perturbed(config)


def _sample(config, grid_lat, caption, seed, index):
  rng = np.random.default_rng(seed)
  lat = rng.standard_normal(grid_lat + (config.vae.latent_channels,)).astype(np.float32)
  tokens, coords, grid = packing.patchify(lat, config.dit.patch_size)
  return packing.sample_features(tokens, coords, grid, text_lib.tokenize(caption, config.text.max_len, config.text.tokenizer),
                                 np.zeros(6), index)


def _rows(samples):
  rows = packing.pack_list(samples, seq_len=L, text_seq_len=LT, max_segments=S)
  return packing.stack_rows(rows)


def _forward(graphdef, params, rest, rows, t_value):
  model = nnx.merge(graphdef, params, rest)
  t_table = jnp.full(rows["grid"].shape[:2], t_value, jnp.float32)
  text, pooled = model.encode_text(rows["text"], rows["text_segment_ids"], rows["text_positions"], S)
  return model(rows["tokens"], rows["coords"], rows["tokens_segment_ids"], t_table, text,
               rows["text_segment_ids"], pooled)


def _segment_out(rows, out, index):
  r, s = np.argwhere((rows["index"] == index) & (rows["grid_segment_ids"] > 0))[0]
  return np.asarray(out[r][rows["tokens_segment_ids"][r] == s + 1])


def test_packed_sample_equals_alone(setup):
  config, mesh, graphdef, params, rest = setup
  a = _sample(config, (3, 2, 4), "a red circle moving left", 0, index=7)
  neighbours = [_sample(config, (1, 4, 2), "a blue square moving up", 1, index=1),
                _sample(config, (3, 2, 2), "a large green triangle", 2, index=2)]
  alone = _rows([a])
  packed = _rows(neighbours[:1] + [a] + neighbours[1:])
  assert packed["tokens"].shape[0] == 1 and (packed["grid_segment_ids"] > 0).sum() == 3
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    out_alone = _forward(graphdef, params, rest, alone, 0.6)
    out_packed = _forward(graphdef, params, rest, packed, 0.6)
  np.testing.assert_allclose(_segment_out(packed, out_packed, 7), _segment_out(alone, out_alone, 7),
                             rtol=1e-4, atol=1e-5)
  # Padding tokens output exactly zero.
  assert np.all(np.asarray(out_packed)[packed["tokens_segment_ids"] == 0] == 0)


def test_changing_a_neighbour_leaves_other_segments_unchanged(setup):
  config, mesh, graphdef, params, rest = setup
  a = _sample(config, (3, 2, 4), "a red circle moving left", 0, index=7)
  b1 = _sample(config, (1, 4, 2), "a blue square moving up", 1, index=1)
  b2 = _sample(config, (1, 4, 2), "a yellow triangle moving down in a zigzag", 5, index=1)
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    r1, r2 = _rows([b1, a]), _rows([b2, a])
    o1 = _forward(graphdef, params, rest, r1, 0.3)
    o2 = _forward(graphdef, params, rest, r2, 0.3)
  np.testing.assert_array_equal(_segment_out(r1, o1, 7), _segment_out(r2, o2, 7))
  assert not np.allclose(_segment_out(r1, o1, 1), _segment_out(r2, o2, 1))


def test_gradients_of_a_packed_sample_equal_alone(setup):
  config, mesh, graphdef, params, rest = setup
  a = _sample(config, (3, 2, 4), "a red circle moving left", 0, index=7)
  b = _sample(config, (1, 4, 4), "a blue square moving up", 1, index=1)

  def grads(rows):
    mask = jnp.asarray(rows["index"][0][rows["tokens_segment_ids"][0] - 1] == 7) & (rows["tokens_segment_ids"][0] > 0)

    def loss(p):
      out = _forward(graphdef, p, rest, rows, 0.5)
      return jnp.sum(jnp.where(mask[None, :, None], out, 0.0) ** 2)

    return jax.grad(loss)(params)

  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    g_alone = grads(_rows([a]))
    g_packed = grads(_rows([b, a]))
  for x, y in zip(jax.tree.leaves(g_alone), jax.tree.leaves(g_packed)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=2e-4, atol=2e-6)


def test_rope_makes_output_depend_on_coordinates(setup):
  config, mesh, graphdef, params, rest = setup
  rows = _rows([_sample(config, (3, 2, 4), "a red circle moving left", 0, index=7)])
  shuffled = dict(rows)
  shuffled["coords"] = rows["coords"][:, ::-1].copy()
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    o1 = _forward(graphdef, params, rest, rows, 0.5)
    o2 = _forward(graphdef, params, rest, shuffled, 0.5)
  assert not np.allclose(np.asarray(o1), np.asarray(o2))


@pytest.mark.parametrize("abs_pos,kind", [(False, "axes"), (True, "axes"), (True, "oblique"), (True, "fractional"),
                                          (True, "fractional_space")])
def test_only_abs_pos_makes_output_depend_on_absolute_position(abs_pos, kind):
  # RoPE is relative: shifting every coordinate of a clip by the same amount changes nothing. With abs_pos
  # each token also knows its frame and place in the frame, so the same shift changes the output.
  config = tiny_t2v.get_config("runlocal")
  config.dit.abs_pos = abs_pos
  config.dit.abs_pos_kind = kind
  config, mesh, graphdef, params, rest = _perturbed(config)
  rows = _rows([_sample(config, (3, 2, 4), "a red circle moving left", 0, index=7)])
  shifted = dict(rows)
  shifted["coords"] = rows["coords"] + np.array([2, 1, 3], rows["coords"].dtype)
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    o1 = np.asarray(_forward(graphdef, params, rest, rows, 0.5))
    o2 = np.asarray(_forward(graphdef, params, rest, shifted, 0.5))
  if abs_pos:
    assert np.abs(o1 - o2).max() > 1e-2
  else:
    np.testing.assert_allclose(o2, o1, rtol=1e-4, atol=1e-5)


def test_sincos_3d_uses_the_rope_angles():
  coords = jnp.asarray(np.random.default_rng(0).integers(0, 9, (2, 5, 3)))
  emb = rope_lib.sincos_3d(coords, 36, theta=100.0)
  cos, sin = rope_lib.rope_3d(coords, 36, theta=100.0)
  np.testing.assert_allclose(np.asarray(emb), np.concatenate([cos, sin], -1), rtol=1e-6)
  # Axis t gets pairs 0..5, h 6..11, w 12..17 (18 pairs): the first pair of each axis is the coordinate.
  np.testing.assert_allclose(np.asarray(emb[..., [0, 6, 12]]), np.cos(np.asarray(coords, np.float32)),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="even dim"):
    rope_lib.sincos_3d(coords, 35)


def test_rope_tables_are_pinned_on_cpu_and_rotation_derivatives_are_unchanged():
  """On CPU the (cos, sin) tables carry a layout pin (kept buffers of their own, not recomputed per layer);
  the rotation's value, gradient and forward-mode tangent equal those from unpinned tables."""
  coords = jnp.asarray(np.random.default_rng(0).integers(0, 9, (2, 5, 3)), jnp.float32)
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
  assert "layout_constraint" in str(jax.make_jaxpr(lambda c: rope_lib.rope_3d(c, 8))(coords))
  assert "layout_constraint" in str(jax.make_jaxpr(lambda p: rope_lib.rope_1d(p, 8))(coords[..., 0]))

  def pinned(x, c):
    return jnp.sum(jnp.sin(rope_lib.apply(x, *rope_lib.rope_3d(c, 8))))

  def plain(x, c):
    angles = rope_lib._angles_3d(c, 4, 10000.0)  # pylint: disable=protected-access
    return jnp.sum(jnp.sin(rope_lib.apply(x, jnp.cos(angles), jnp.sin(angles))))

  np.testing.assert_allclose(jax.jit(pinned)(x, coords), jax.jit(plain)(x, coords), rtol=1e-6)
  for a, e in zip(jax.jit(jax.grad(pinned, argnums=(0, 1)))(x, coords),
                  jax.jit(jax.grad(plain, argnums=(0, 1)))(x, coords)):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)
  tangent = jnp.cos(x)
  jvp = lambda f: jax.jit(lambda x, c: jax.jvp(lambda x: f(x, c), (x,), (tangent,))[1])(x, coords)  # noqa: E731
  np.testing.assert_allclose(jvp(pinned), jvp(plain), rtol=1e-5, atol=1e-6)


def test_oblique_3d_is_a_fixed_set_of_spacetime_plane_waves():
  coords = jnp.asarray(np.random.default_rng(0).integers(0, 9, (2, 6, 3)))
  shift = jnp.asarray([[[1, 2, 3]]])
  def waves(c):
    e = np.asarray(rope_lib.oblique_3d(c, 64, theta=100.0))
    return e[..., :32] + 1j * e[..., 32:]
  # A plane wave: moving by a fixed offset turns every feature by its own fixed phase, whatever the start.
  np.testing.assert_allclose(waves(coords + shift), waves(coords) * waves(shift), rtol=1e-4, atol=1e-5)
  # The frequencies are part of every trained checkpoint that uses them: pinned.
  np.testing.assert_allclose(np.asarray(rope_lib.oblique_3d(jnp.asarray([[[1, 2, 3]]]), 8, theta=100.0))[0, 0],
                             [0.998668, 0.988035, 0.99977, 0.729237, 0.051606, 0.154231, 0.021464, -0.684261],
                             atol=2e-6)
  with pytest.raises(ValueError, match="abs_pos_kind='diagonal'"):
    rope_lib.absolute_3d("diagonal", coords, 64)


def test_fractional_3d_places_tokens_as_fractions_of_their_own_clip():
  # One packed row: a 2x4 clip (segment 1), a 1x6 clip (segment 2), then padding. The right edge of either
  # clip gets the same embedding, its left edge too, whatever the grid; the middle of the 6-wide one is at 0.4.
  cols1, cols2 = np.arange(4), np.arange(6)
  coords = np.zeros((1, 4 + 6 + 2, 3), np.int32)
  coords[0, :4, 2] = cols1
  coords[0, :4, 1] = 1
  coords[0, 4:10, 2] = cols2
  seg = np.array([[1] * 4 + [2] * 6 + [0, 0]], np.int32)
  emb = np.asarray(rope_lib.absolute_3d("fractional", jnp.asarray(coords), 36, segment_ids=jnp.asarray(seg),
                                        num_segments=3))
  assert np.isfinite(emb).all()
  pairs_t, pairs_h, pairs_w = 6, 6, 6
  w_cos = emb[0, :, pairs_t + pairs_h:18]  # cos of pi k f_w, k = 1..6
  np.testing.assert_allclose(w_cos[3], w_cos[9], atol=1e-6)   # right edges
  np.testing.assert_allclose(w_cos[0], w_cos[4], atol=1e-6)   # left edges
  np.testing.assert_allclose(w_cos[6], np.cos(np.pi * np.arange(1, 7) * 2 / 5), rtol=1e-5, atol=1e-6)
  # Integer coordinates (`axes`) tell the two right edges apart.
  axes = np.asarray(rope_lib.sincos_3d(jnp.asarray(coords), 36))
  assert np.abs(axes[0, 3] - axes[0, 9]).max() > 0.1
  # An axis of length 1 sits at fraction 0 (the 1-row clip's h, every clip's t here).
  np.testing.assert_allclose(emb[0, 4:10, pairs_t:pairs_t + pairs_h], 1.0, atol=1e-6)
  with pytest.raises(ValueError, match="needs segment_ids"):
    rope_lib.absolute_3d("fractional", jnp.asarray(coords), 36)


def test_fractional_space_gives_no_absolute_time():
  # 'fractional_space' embeds only the place in the frame: the frames of a clip shifted in time (its
  # extent with them) embed the same, while 'fractional' tells frame 0 of 3 from frame 2 of 5. All pairs
  # go to h and w, so the width fraction gets 9 of 18 pairs instead of 6.
  coords = np.stack([np.repeat(np.arange(3), 4), np.tile(np.repeat(np.arange(2), 2), 3),
                     np.tile(np.arange(2), 6)], -1)[None].astype(np.int32)
  shifted = coords + np.array([2, 0, 0], np.int32)
  seg = np.ones(coords.shape[:2], np.int32)
  emb = {k: [np.asarray(rope_lib.absolute_3d(k, jnp.asarray(c), 36, segment_ids=jnp.asarray(seg), num_segments=2))
             for c in (coords, shifted)] for k in ("fractional", "fractional_space")}
  np.testing.assert_allclose(emb["fractional_space"][0], emb["fractional_space"][1], atol=1e-6)
  assert np.abs(emb["fractional"][0] - emb["fractional"][1]).max() > 0.1
  w_frac = coords[0, :, 2].astype(np.float32)  # the w extent is 1: fraction = coordinate
  np.testing.assert_allclose(emb["fractional_space"][0][0, :, 9:18], np.cos(np.pi * w_frac[:, None] * np.arange(1, 10)),
                             atol=1e-5)


@pytest.mark.parametrize("gate_init", [0.0, 0.5])
def test_gate_init_opens_the_residual_branches_at_init(gate_init):
  # adaLN-Zero (gate_init 0) makes every block the identity at init; gate_init > 0 starts both residual
  # gates (attention, MLP) at that value with the modulation weights still zero, so a block changes x.
  config = tiny_t2v.use_cross_attention(tiny_t2v.get_config("runlocal"))
  config.dit.gate_init = gate_init
  mesh = mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    model = t2v.TextToVideo(config, patch_dim=t2v.patch_dim(config), rngs=nnx.Rngs(0))
    rows = _rows([_sample(config, (3, 2, 4), "a red circle moving left", 0, index=7)])
    cond = jnp.ones((1, S, config.dit.width))
    bias = np.asarray(model.dit.blocks.ada.bias[...])  # [depth, 6, width]
    np.testing.assert_array_equal(bias[:, [2, 5]], gate_init)
    np.testing.assert_array_equal(bias[:, [0, 1, 3, 4]], 0.0)
    x = jax.random.normal(jax.random.key(0), rows["tokens"].shape[:2] + (config.dit.width,))
    rope = rope_lib.rope_3d(rows["coords"], config.dit.width // config.dit.num_heads)
    block = nnx.merge(*nnx.split(model.dit.blocks))  # the scanned stack; run its first layer
    graphdef, state = nnx.split(block)
    first = nnx.merge(graphdef, jax.tree.map(lambda v: v[0], state))
    text = jnp.ones(rows["text"].shape + (config.text.width,))
    y = first(x, cond, rows["tokens_segment_ids"], rope, text, rows["text_segment_ids"])
    # Cross-attention is not gated: compare with the block's own cross-attention update alone.
    x = x + first.cross(first.norm2(x), rows["tokens_segment_ids"], context=text,
                        kv_segment_ids=rows["text_segment_ids"])
  changed = float(jnp.abs(y - x).max())
  assert (changed == 0.0) if gate_init == 0.0 else (changed > 1e-2)


def test_location_ids_name_one_place_of_one_clip():
  seg = jnp.array([[1, 1, 1, 1, 2, 2, 0]])
  coords = jnp.array([[[0, 0, 0], [0, 0, 1], [1, 0, 0], [1, 0, 1], [0, 0, 0], [0, 1, 2], [0, 0, 0]]])
  ids = np.asarray(segments.location_ids(seg, coords))[0]
  assert ids[6] == 0  # padding
  assert ids[0] == ids[2] and ids[1] == ids[3]  # same (h, w) in another frame of the same clip
  assert len({ids[0], ids[1], ids[4], ids[5]}) == 4 and 0 not in ids[:6]  # other place or other clip


@pytest.mark.parametrize("temporal", [False, True])
def test_temporal_attention_mixes_only_one_location_through_time(temporal):
  # With the spacetime attention's output zeroed, the temporal path is the only thing that mixes tokens
  # (MLP and modulation are per token, cross-attention reads only text): a change at one token of one clip
  # must reach exactly the tokens at its (h, w) in that clip, in every frame, and nothing else.
  config = tiny_t2v.get_config("runlocal")
  config.dit.temporal_attention = temporal
  config, mesh, graphdef, params, rest = _perturbed(config)
  attn_out = params["dit"]["blocks"]["attn"]["o"]
  attn_out["kernel"].value = jnp.zeros_like(attn_out["kernel"].value)
  attn_out["bias"].value = jnp.zeros_like(attn_out["bias"].value)
  rows = _rows([_sample(config, (3, 4, 4), "a red circle moving left", 0, index=7),
                _sample(config, (3, 4, 4), "a blue square moving up", 1, index=8)])
  seg, coords = np.asarray(rows["tokens_segment_ids"][0]), np.asarray(rows["coords"][0])
  changed = dict(rows)
  changed["tokens"] = rows["tokens"].copy()
  changed["tokens"][0, 0] += 1.0  # token 0: clip 1, frame 0, (h, w) = (0, 0)
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    o1 = np.asarray(_forward(graphdef, params, rest, rows, 0.5))[0]
    o2 = np.asarray(_forward(graphdef, params, rest, changed, 0.5))[0]
  moved = np.abs(o2 - o1).max(-1) > 1e-5
  same_place = (seg == seg[0]) & (coords[:, 1] == coords[0, 1]) & (coords[:, 2] == coords[0, 2])
  expected = same_place if temporal else (np.arange(len(seg)) == 0)
  assert same_place.sum() == 3  # the test's premise: one token per frame at that place
  np.testing.assert_array_equal(moved, expected)


def test_cond_flag_reaches_exactly_the_segments_with_given_frames():
  # Two clips in one row; a token of clip 7 is given. With cond_flag the *noisy* tokens of clip 7 change
  # (they learn that part of their clip is given), clip 1's output does not, and text-to-video (no given
  # token anywhere) is the same as without a mask.
  config = tiny_t2v.get_config("runlocal")
  config.dit.cond_flag = True
  config, mesh, graphdef, params, rest = _perturbed(config)
  rows = _rows([_sample(config, (1, 4, 2), "a blue square moving up", 1, index=1),
                _sample(config, (3, 2, 4), "a red circle moving left", 0, index=7)])
  seg = jnp.asarray(rows["tokens_segment_ids"])
  first_of_7 = jnp.argmax(seg == 2, axis=1)
  given = (jnp.arange(seg.shape[1])[None] == first_of_7[:, None]).astype(jnp.int32)

  def forward(cond_mask, flag_scale=1.0):
    model = nnx.merge(graphdef, params, rest)
    model.dit.cond_flag[...] = model.dit.cond_flag[...] * flag_scale
    t_table = jnp.full(rows["grid"].shape[:2], 0.6, jnp.float32)
    text, pooled = model.encode_text(rows["text"], rows["text_segment_ids"], rows["text_positions"], S)
    return np.asarray(model(rows["tokens"], rows["coords"], seg, t_table, text, rows["text_segment_ids"],
                            pooled, cond_mask=cond_mask))

  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    plain, zeros = forward(None), forward(jnp.zeros_like(seg))
    flagged, unflagged = forward(given), forward(given, flag_scale=0.0)
  np.testing.assert_allclose(zeros, plain, rtol=1e-5, atol=1e-6)
  noisy_7 = np.asarray((seg == 2) & (given == 0))
  assert np.abs(flagged - unflagged)[noisy_7].min() > 1e-4
  clip_1 = np.asarray(seg == 1)
  np.testing.assert_allclose(flagged[clip_1], unflagged[clip_1], rtol=1e-5, atol=1e-6)


def test_unrolled_layer_scan_equals_rolled(setup):
  """`dit.scan_unroll` only changes how XLA runs the stacked blocks, not what they compute."""
  config, mesh, graphdef, params, rest = setup
  rows = _rows([_sample(config, (3, 2, 4), "a red circle moving left", 0, index=7)])
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    rolled = _forward(graphdef, params, rest, rows, 0.6)
    model = nnx.merge(graphdef, params, rest)
    assert model.dit.scan_unroll == config.dit.depth  # the CPU configs unroll every layer
    model.dit.scan_unroll = 1
    g1, p1, r1 = nnx.split(model, nnx.Param, ...)
    unrolled_off = _forward(g1, p1, r1, rows, 0.6)
  np.testing.assert_allclose(np.asarray(unrolled_off), np.asarray(rolled), rtol=1e-5, atol=1e-6)


def test_shared_modulation_is_per_block_adaln_with_tied_projections():
  """adaLN-single (`dit.shared_modulation`): block l's modulation is shared(c) + table[l], which is exactly a
  per-block adaLN whose projections all equal the shared one and whose biases add that block's table."""
  config = tiny_t2v.use_standard_schedule(tiny_t2v.use_cross_attention(tiny_t2v.get_config("runlocal")))
  config.dit.update(shared_modulation=True)
  _, mesh, graphdef, params, rest = _perturbed(config)
  per_block = config.copy_and_resolve_references()
  per_block.dit.shared_modulation = False
  _, _, graphdef_pb, params_pb, rest_pb = _perturbed(per_block)
  shared = params.to_pure_dict()
  mapped = params_pb.to_pure_dict()
  for key in shared["dit"]:
    if key not in ("shared_ada", "blocks"):
      mapped["dit"][key] = shared["dit"][key]
  mapped["text"] = shared["text"]
  blocks, blocks_pb = shared["dit"]["blocks"], mapped["dit"]["blocks"]
  for key in blocks:
    if key != "ada_table":
      blocks_pb[key] = blocks[key]
  depth = config.dit.depth
  kernel = shared["dit"]["shared_ada"]["kernel"]
  blocks_pb["ada"]["kernel"] = jnp.broadcast_to(kernel, (depth,) + kernel.shape)
  blocks_pb["ada"]["bias"] = shared["dit"]["shared_ada"]["bias"] + blocks["ada_table"]
  nnx.replace_by_pure_dict(params_pb, mapped)
  rows = _rows([_sample(config, (3, 2, 4), "a red circle moving left", 0, index=7),
                _sample(config, (1, 4, 2), "a blue square moving up", 1, index=1)])
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    out_shared = _forward(graphdef, params, rest, rows, 0.6)
    out_per_block = _forward(graphdef_pb, params_pb, rest_pb, rows, 0.6)
  np.testing.assert_allclose(np.asarray(out_shared), np.asarray(out_per_block), rtol=1e-5, atol=1e-6)
  # The tables differ between blocks (each block its own modulation), and the model is not trivially zero.
  assert np.abs(np.asarray(blocks["ada_table"][0] - blocks["ada_table"][1])).max() > 1e-3
  assert np.abs(np.asarray(out_shared)).max() > 1e-2


def test_shared_modulation_starts_as_identity_blocks():
  """Zero tables and a zero shared projection close every block's gates (adaLN-Zero) unless `gate_init`."""
  config = tiny_t2v.use_standard_schedule(tiny_t2v.use_cross_attention(tiny_t2v.get_config("runlocal")))
  config.dit.update(shared_modulation=True, text_proj=True, gate_init=0.25)
  with mesh_lib.use(mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:1]), mesh_lib.DIT_RULES):
    model = t2v.TextToVideo(config, patch_dim=t2v.patch_dim(config), rngs=nnx.Rngs(0))
  assert not np.any(np.asarray(model.dit.blocks.ada_table[...]))
  bias = np.asarray(model.dit.shared_ada.bias[...])
  assert np.all(bias[[2, 5]] == 0.25) and not np.any(bias[[0, 1, 3, 4]])
  # Cross-attention reads the projected text: keys and values come from the DiT's width.
  assert model.dit.blocks.cross.k.kernel.shape[1] == config.dit.width


# diffusers' WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30,
# text_dim=4096, freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads"), counted on the meta device.
WAN_1P3B_PARAMS = 1_418_996_800


def test_wan1p3b_config_is_parameter_matched_to_wan():
  """configs/dit_wan1p3b.py is Wan2.1-1.3B's DiT up to three known differences, counted exactly."""
  from configs import dit_wan1p3b  # pylint: disable=import-outside-toplevel
  from sora_jax.train import flops as flops_lib  # pylint: disable=import-outside-toplevel
  config = dit_wan1p3b.get_config()
  d, depth, text = config.dit.width, config.dit.depth, config.text.width
  ours = flops_lib.param_counts(config)["dit"]
  pooled_text = text * d + d                       # Wan has no pooled-text conditioning
  final_mod = (d * 2 * d + 2 * d) - 2 * d           # a projection where Wan has a learned [2, D] table
  # Wan normalises q and k across heads (D weights each) and has an affine LayerNorm before cross-attention;
  # here q and k norms are per head (head-dim weights) and that norm is an RMSNorm (D weights).
  norms = depth * (4 * (d // config.dit.num_heads) + d) - depth * (4 * d + 2 * d)
  assert ours == WAN_1P3B_PARAMS + pooled_text + final_mod + norms
  assert abs(ours / WAN_1P3B_PARAMS - 1) < 0.01


def test_cpu_flash_with_the_qk_prologue_in_the_kernel_equals_xla():
  """With QK-norm and RoPE, cpu_flash takes the norm and the rotation into its kernel: the DiT's output and
  every parameter's gradient (the norm scales included) stay those of the XLA backend."""
  from sora_jax.kernels import cpu as cpu_kernels  # pylint: disable=import-outside-toplevel
  if not cpu_kernels.available():
    pytest.skip("no C++ compiler for the CPU kernels")
  base = tiny_t2v.use_standard_schedule(tiny_t2v.use_cross_attention(tiny_t2v.get_config("runlocal")))
  base.dit.width, base.dit.num_heads, base.dit.qk_norm = 64, 2, True  # head dim 32: a kernel size
  results = {}
  for backend in ("xla", "cpu_flash"):
    config = base.copy_and_resolve_references()
    config.attention = backend
    _, mesh, graphdef, params, rest = _perturbed(config)
    rows = _rows([_sample(config, (3, 2, 4), "a red circle moving left", 0, index=7),
                  _sample(config, (2, 4, 2), "a blue square moving up", 1, index=8)])
    with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
      results[backend] = jax.jit(jax.value_and_grad(
          lambda p: jnp.sum(jnp.sin(_forward(graphdef, p, rest, rows, 0.6)))))(params)
  (loss_ref, grads_ref), (loss, grads) = results["xla"], results["cpu_flash"]
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(grads_ref)[0]]
  assert any("q_norm" in p for p in paths)
  for path, g, e in zip(paths, jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, e, atol=1e-5 * (1 + float(jnp.max(jnp.abs(e)))), rtol=1e-4, err_msg=path)
