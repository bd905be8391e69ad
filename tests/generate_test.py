"""Sampling entry point: frame conditioning in the DiT, guidance, every mode, and the prompts file."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny_t2v
from sora_jax import generate
from sora_jax.data import packing
from sora_jax.data import synthetic
from sora_jax.models import vae as vae_lib
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.train import train_dit
from sora_jax.train import train_vae


def _perturbed(created, scale=0.05):
  # The zero-initialised adaLN and output layers would make every velocity zero.
  leaves, tree = jax.tree.flatten(created.state.params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def setup():
  config = tiny_t2v.get_config("runlocal")
  config.train_dit.update(seq_len=64, text_seq_len=160, max_segments=4)
  config.sample.update(batch_size=1, steps=2)
  mesh = mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
  dit, _ = train_dit.create(config, mesh)
  vae, _ = train_vae.create(config, mesh, with_optimizer=False)
  models = generate.Models(dit=(dit.graphdef, _perturbed(dit), dit.state.rest),
                           vae=(vae.graphdef, vae.state.params, vae.state.rest))
  return config, mesh, models


def _rows(config, sizes, captions):
  samples = []
  for i, (size, cap) in enumerate(zip(sizes, captions)):
    lat = np.random.default_rng(i).standard_normal(size + (config.vae.latent_channels,)).astype(np.float32)
    tokens, coords, grid = packing.patchify(lat, config.dit.patch_size)
    samples.append(packing.sample_features(tokens, coords, grid, generate.tokenize(cap, config),
                                           np.zeros(6), i))
  t = config.train_dit
  return packing.stack_rows(packing.pack_list(samples, seq_len=t.seq_len, text_seq_len=t.text_seq_len,
                                              max_segments=t.max_segments))


def _model_and_text(config, models, rows):
  model = nnx.merge(*models.dit)
  text, pooled = model.encode_text(rows["text"], rows["text_segment_ids"], rows["text_positions"],
                                   config.train_dit.max_segments)
  return model, text, pooled


def test_dit_cond_mask(setup):
  config, mesh, models = setup
  rows = _rows(config, [(3, 2, 4), (1, 4, 2)], ["a red circle moving left", "a blue square"])
  t = jnp.full(rows["grid"].shape[:2], 0.7)
  seg = rows["tokens_segment_ids"]
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    model, text, pooled = _model_and_text(config, models, rows)
    call = lambda t, m=None: np.asarray(model(rows["tokens"], rows["coords"], seg, t, text,  # noqa: E731
                                              rows["text_segment_ids"], pooled, cond_mask=m))
    plain = call(t)
    zeros = call(t, jnp.zeros(seg.shape))
    # Segment 1 wholly given: it is modulated as t = 0, segment 2 keeps t = 0.7.
    seg1 = call(t, (seg == 1).astype(jnp.float32))
    at_zero = call(t.at[:, 0].set(0.0))
  np.testing.assert_allclose(zeros, plain, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(seg1, at_zero, rtol=1e-5, atol=1e-6)
  assert np.abs(seg1 - plain)[np.asarray(seg) == 1].max() > 1e-3


def test_guidance_scale_one_is_the_conditional_prediction(setup):
  config, mesh, models = setup
  rows = _rows(config, [(3, 2, 4)], ["a red circle moving left"])
  neg = generate._text_rows(rows, {0: "a blue square"}, config)  # pylint: disable=protected-access
  seg = rows["tokens_segment_ids"]
  mask = jnp.asarray((rows["coords"][..., 0] == 0) & (seg > 0), jnp.float32)
  x0 = jnp.asarray(rows["tokens"]) * 0.5
  noise = jnp.asarray(rows["tokens"])
  x = noise
  S = config.train_dit.max_segments
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    model, text, pooled = _model_and_text(config, models, rows)
    neg_text, neg_pooled = model.encode_text(neg["text"], neg["text_segment_ids"], neg["text_positions"], S)
    t = jnp.full(rows["grid"].shape[:2], 0.6)
    cond = model(x, rows["coords"], seg, t, text, rows["text_segment_ids"], pooled, cond_mask=mask)
    uncond = model(x, rows["coords"], seg, t, neg_text, neg["text_segment_ids"], neg_pooled, cond_mask=mask)
    kw = dict(num_segments=S, cond_x0=x0, cond_mask=mask, noise=noise)
    # Three batched branches, but t = 0.6 lies outside the guidance interval: scales are 1.
    outside = generate.guided_velocity(model, rows, neg, guidance=5.0, guidance_image=3.0, interval=(0.0, 0.5),
                                       **kw)(x, t)
    ones = generate.guided_velocity(model, rows, neg, guidance=1.0, **kw)(x, t)
    guided = generate.guided_velocity(model, rows, neg, guidance=3.0, **kw)(x, t)
  np.testing.assert_allclose(outside, cond, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ones, cond, rtol=1e-5, atol=1e-6)
  # The batched call equals CFG over two separate calls (and the negative prompt is what it subtracts).
  np.testing.assert_allclose(guided, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-4)


def test_every_mode_pins_its_given_frames(setup):
  config, mesh, models = setup
  src = synthetic.SyntheticVideos(2, [(9, 16, 16)], split="heldout")
  a, b = src[0]["video"], src[1]["video"]
  size = dict(frames=9, height=16, width=16)
  prompts = [dict(caption="a red circle", mode="t2i", height=16, width=16),
             dict(caption="moving left", mode="i2v", image=a[0], **size),
             dict(caption="moving left", mode="extend_forward", video=a, **size),
             dict(caption="moving left", mode="extend_backward", video=a, **size),
             dict(caption="moving left", mode="connect", video=a, video_end=b, **size),
             dict(caption="moving left", mode="loop", image=a[0], **size),
             dict(caption="a blue square", mode="sdedit", video=a, strength=0.0, **size),
             dict(caption="a blue square", mode="sdedit", video=a, strength=0.6, **size)]
  prompts = [generate.check_prompt(p, config, f"prompt {i}") for i, p in enumerate(prompts)]
  latents, conds, _ = generate.sample_latents(config, models, mesh, prompts)
  given = {p["mode"]: c["given"].nonzero()[0].tolist() for p, c in zip(prompts, conds) if p["mode"] != "sdedit"}
  # 9 frames -> 5 latent frames (2x temporal VAE); extension and connect give half of them by default.
  assert given == {"t2i": [], "i2v": [0], "extend_forward": [0, 1], "extend_backward": [3, 4],
                   "connect": [0, 1, 3, 4], "loop": [0, 4]}
  assert latents[0].shape[0] == 1
  for z, c in zip(latents, conds):
    np.testing.assert_array_equal(z[c["given"]], c["x0"][c["given"]])  # exactly, in latent space
  np.testing.assert_array_equal(latents[6], conds[6]["x0"])  # SDEdit at strength 0 returns the input
  assert np.abs(latents[7] - conds[7]["x0"]).max() > 1e-3
  # i2v: the given frame is the VAE encoding of the image; the causal decoder maps the pinned first latent
  # to the same first frame as the given latent alone.
  graphdef, params, rest = models.vae
  with mesh_lib.use(mesh, mesh_lib.VAE_RULES):
    decode = train_vae.make_decode_fn(graphdef, mesh)
    out = np.asarray(decode(params, rest, latents[1][None]))[0, :1]
    ref = np.asarray(decode(params, rest, conds[1]["x0"][None, :1]))[0]
  np.testing.assert_allclose(out, ref, atol=1e-4)


def test_extension_takes_the_frames_behind_its_context_latents():
  # A 2x temporal VAE: 9 frames -> 5 latents; k given latents stand for the clip's last 1 + 2 (k - 1) frames.
  clip = np.arange(9, dtype=np.uint8)[:, None, None, None] * np.ones((9, 8, 8, 3), np.uint8)
  for k, frames in [(1, 1), (2, 3), (3, 5), (4, 7)]:
    assert generate.prefix_pixel_frames(k, 2) == frames
    p = dict(mode="extend_forward", video=clip, frames=9, height=8, width=8, context_frames=k)
    (given, keep, pos), = generate.condition_clips(p, 5, 2, "prompt 0")
    assert (keep, pos) == (0, 0)
    np.testing.assert_allclose(given[:, 0, 0, 0], np.arange(9 - frames, 9) / 127.5 - 1, atol=1e-6)
  assert generate.prefix_pixel_frames(0, 2) == 0
  with pytest.raises(ValueError, match="nothing is left to generate"):
    generate.condition_clips(dict(mode="extend_forward", video=clip, frames=9, height=8, width=8,
                                  context_frames=5), 5, 2, "prompt 0")


def _write(tmp_path, lines):
  path = tmp_path / "prompts.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_read_prompts(tmp_path):
  config = tiny_t2v.get_config("runlocal")
  from PIL import Image
  Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "first.png")
  path = _write(tmp_path, [json.dumps(dict(prompt="a red circle", mode="i2v", image="first.png", guidance=2.0,
                                           negative_prompt="blue", steps=5, solver="heun")),
                           "",
                           json.dumps(dict(prompt="a cat", mode="t2i"))])
  p1, p2 = generate.read_prompts(path, config)
  assert p1["caption"] == "a red circle" and p1["image"] == str(tmp_path / "first.png") and p1["seed"] == 1
  assert (p2["frames"], p2["seed"], p2["mode"]) == (1, 3, "t2i")
  bad = {
      '{"prompt": "x", "mode": "zoom"}': r"prompts.jsonl:1: field 'mode'='zoom' is unknown",
      '{"prompt": "x", "mode": "i2v"}': r"prompts.jsonl:1: mode 'i2v' needs field 'image' or 'video'",
      '{"prompt": "x", "mode": "i2v", "image": "nope.png"}': r"prompts.jsonl:1: field 'image': no such file",
      '{"prompt": "x", "frames": 8}': r"prompts.jsonl:1: field 'frames'=8 must be 1 \+ 2\*k",
      '{"prompt": "x", "strength": 0.5}': r"field 'strength' only applies to mode 'sdedit'",
      '{"prompt": "x", "guidance": -1}': r"field 'guidance'=-1 must be a number",
      '{"prompt": "x", "solver": "rk4"}': r"field 'solver'='rk4' is unknown",
      '{"prompt": "x", "guidance_interval": [0.8, 0.2]}': r"field 'guidance_interval'",
      '{"prompt": "x", "colour": "red"}': r"field 'colour' is unknown",
      '{"caption": 3}': r"field 'prompt' \(a string\) is required",
      '{"prompt": "x", "mode": "connect", "video": "first.png"}': r"mode 'connect' needs fields 'video'",
      '{"prompt": "x"': r"prompts.jsonl:1: not valid JSON",
  }
  for line, match in bad.items():
    with pytest.raises(ValueError, match=match):
      generate.read_prompts(_write(tmp_path, [line]), config)


def test_chunked_vae_passes_give_the_same_videos(setup, monkeypatch):
  # sample.vae_chunk=1: condition clips encoded and samples decoded one latent frame at a time, memory flat
  # in the number of frames; the causal VAE makes that the whole-video result.
  config, mesh, models = setup
  chunks = []
  for name in ("encode", "decode"):
    def spy(self, x, *, chunk=None, _name=name, _orig=getattr(vae_lib.VAE, name), **kw):
      chunks.append((_name, chunk))
      return _orig(self, x, chunk=chunk, **kw)
    monkeypatch.setattr(vae_lib.VAE, name, spy)
  video = synthetic.SyntheticVideos(1, [(9, 16, 16)], split="heldout")[0]["video"]
  prompts = [dict(caption="moving left", mode="extend_forward", video=video, frames=9, height=16, width=16)]
  whole, _ = generate.generate_with(config, models, mesh, [dict(p) for p in prompts], write_files=False)
  chunked_config = config.copy_and_resolve_references()
  chunked_config.sample.vae_chunk = 1
  chunked, _ = generate.generate_with(chunked_config, models, mesh, [dict(p) for p in prompts], write_files=False)
  assert chunks == [("encode", None), ("decode", None), ("encode", 1), ("decode", 1)]
  assert whole[0].shape == chunked[0].shape == (9, 16, 16, 3)
  assert np.abs(whole[0].astype(int) - chunked[0].astype(int)).max() <= 1  # uint8 rounding
