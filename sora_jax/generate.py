"""Prompts -> videos through one entry point: every capability is frame conditioning of one packed sampler.

A prompt is a dict with `caption`, `frames`, `height`, `width`, `seed` and optionally `mode` (one of
MODES), `negative_prompt`, conditions (`image`, `video`, `video_end`: file paths or arrays),
`context_frames`, `strength`, `guidance`, `guidance_image`, `guidance_interval`, `steps`, `solver` and
`labels`. Every mode reduces to three things per prompt: clean latents `x0`, which latent frames are pinned
to them, and a start time (`strength`, below 1 only for SDEdit). Prompts that share sampler settings are
patchified, best-fit packed into rows and denoised together; the guidance branches (text, no text and,
with `guidance_image`, no frames either) are concatenated into one batched model call per step.
"""
from __future__ import annotations

import collections
import json
import math
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from sora_jax import configs_lib
from sora_jax.data import packing
from sora_jax.data import video_io
from sora_jax.diffusion import flow
from sora_jax.diffusion import samplers
from sora_jax.models import text as text_lib
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.train import train_dit
from sora_jax.train import train_vae

class PromptError(configs_lib.InputError, ValueError):
  """A prompt (a line of a prompts file, or a dict) asks for something this model or its condition clips
  cannot give; the message names the prompt and field. The launcher prints it as one line."""


MODES = ("t2v", "t2i", "i2v", "extend_forward", "extend_backward", "connect", "loop", "sdedit")
CONDITION_FIELDS = ("image", "video", "video_end")
# The condition fields each mode reads, in order of preference for its first source.
_MODE_SOURCES = {
    "i2v": ("image", "video"), "loop": ("image", "video"), "extend_forward": ("video",),
    "extend_backward": ("video",), "connect": ("video", "video_end"), "sdedit": ("video", "image"),
}
_INT_FIELDS = ("frames", "height", "width", "seed", "steps", "context_frames")
_FLOAT_FIELDS = ("strength", "guidance", "guidance_image")
_STR_FIELDS = ("caption", "negative_prompt", "mode", "solver")
_OTHER_FIELDS = ("guidance_interval", "labels", "attrs") + CONDITION_FIELDS


class Models(NamedTuple):
  """What sampling needs: the denoiser and the VAE as (graphdef, params, rest), and the DiT's step."""
  dit: tuple
  vae: tuple
  dit_step: int = 0


def latent_shape(config, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
  st, ss = configs_lib.vae_strides(config.vae)
  return 1 + (frames - 1) // st, height // ss, width // ss, config.vae.latent_channels


# ---------------------------------------------------------------- prompt checks


def check_prompt(p: dict, config, where: str) -> dict:
  """Validates one prompt dict and fills defaults; errors read `{where}: field 'x' ...` on one line."""
  p = dict(p)
  if "prompt" in p and "caption" not in p:
    p["caption"] = p.pop("prompt")
  known = set(_INT_FIELDS + _FLOAT_FIELDS + _STR_FIELDS + _OTHER_FIELDS)
  for k in p:
    if k not in known:
      raise PromptError(f"{where}: field {k!r} is unknown; expected some of {sorted(known | {'prompt'})}")
  if not isinstance(p.get("caption"), str):
    raise PromptError(f"{where}: field 'prompt' (a string) is required")
  for k in _STR_FIELDS:
    if k in p and not isinstance(p[k], str):
      raise PromptError(f"{where}: field {k!r}={p[k]!r} must be a string")
  for k in _INT_FIELDS:
    if k in p and (isinstance(p[k], bool) or not isinstance(p[k], (int, np.integer))
                   or p[k] < (0 if k == "seed" else 1)):
      raise PromptError(f"{where}: field {k!r}={p[k]!r} must be a {'non-negative' if k == 'seed' else 'positive'} "
                        f"integer")
  for k in _FLOAT_FIELDS:
    if k in p and (isinstance(p[k], bool) or not isinstance(p[k], (int, float)) or not math.isfinite(p[k])
                   or p[k] < 0 or (k == "strength" and p[k] > 1)):
      raise PromptError(f"{where}: field {k!r}={p[k]!r} must be a number in "
                        f"{'[0, 1]' if k == 'strength' else '[0, inf)'}")
  mode = p.setdefault("mode", "t2v")
  if mode not in MODES:
    raise PromptError(f"{where}: field 'mode'={mode!r} is unknown; choose one of {MODES}")
  if "solver" in p and p["solver"] not in samplers.FLOW_SOLVERS:
    raise PromptError(f"{where}: field 'solver'={p['solver']!r} is unknown; choose one of {samplers.FLOW_SOLVERS}")
  if "guidance_interval" in p:
    gi = p["guidance_interval"]
    if (not isinstance(gi, (list, tuple)) or len(gi) != 2
        or not all(isinstance(v, (int, float)) for v in gi) or not 0 <= gi[0] <= gi[1] <= 1):
      raise PromptError(f"{where}: field 'guidance_interval'={gi!r} must be [t_lo, t_hi] with 0 <= t_lo <= t_hi <= 1")
    p["guidance_interval"] = tuple(float(v) for v in gi)
  for k in CONDITION_FIELDS:
    if k in p and not isinstance(p[k], (str, np.ndarray)):
      raise PromptError(f"{where}: field {k!r} must be a file path or an array, got {type(p[k]).__name__}")
    if isinstance(p.get(k), str) and not os.path.isfile(p[k]):
      raise PromptError(f"{where}: field {k!r}: no such file {p[k]!r}")
  needs = _MODE_SOURCES.get(mode, ())
  if mode == "connect" and not all(k in p for k in needs):
    raise PromptError(f"{where}: mode 'connect' needs fields 'video' (start clip) and 'video_end' (end clip)")
  if needs and not any(k in p for k in needs):
    raise PromptError(f"{where}: mode {mode!r} needs field {' or '.join(repr(k) for k in needs)}")
  if mode == "sdedit":
    p.setdefault("strength", 0.7)
  elif "strength" in p:
    raise PromptError(f"{where}: field 'strength' only applies to mode 'sdedit', not {mode!r}")
  # Sizes: the heldout size by default; images are 1 frame.
  default = tuple(config.data.heldout_size)
  if mode == "t2i":
    if p.setdefault("frames", 1) != 1:
      raise PromptError(f"{where}: field 'frames'={p['frames']} but mode 't2i' makes 1-frame images")
  p.setdefault("frames", default[0])
  p.setdefault("height", default[1])
  p.setdefault("width", default[2])
  st, ss = configs_lib.vae_strides(config.vae)
  _, ph, pw = config.dit.patch_size
  if (p["frames"] - 1) % st:
    raise PromptError(f"{where}: field 'frames'={p['frames']} must be 1 + {st}*k for the VAE's temporal stride")
  for k, patch in (("height", ph), ("width", pw)):
    if p[k] % (ss * patch):
      raise PromptError(f"{where}: field {k!r}={p[k]} must divide by VAE stride x patch = {ss * patch}")
  return p


def read_prompts(path: str, config) -> list[dict]:
  """Reads a JSONL prompts file (see the module docstring); condition paths are relative to the file."""
  prompts = []
  base = os.path.dirname(os.path.abspath(path))
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{n}"
      try:
        p = json.loads(line)
      except json.JSONDecodeError as e:
        raise PromptError(f"{where}: not valid JSON ({e.msg})") from None
      if not isinstance(p, dict):
        raise PromptError(f"{where}: expected a JSON object, got {type(p).__name__}")
      p.setdefault("seed", n)
      for k in CONDITION_FIELDS:
        if isinstance(p.get(k), str):
          p[k] = os.path.join(base, os.path.expanduser(p[k]))
      prompts.append(check_prompt(p, config, where))
  if not prompts:
    raise PromptError(f"{path}: no prompts")
  return prompts


# ---------------------------------------------------------------- conditions -> latents


def _load(value, height: int, width: int, where: str) -> np.ndarray:
  """A condition (file path, image [H,W,3] or video [T,H,W,3] array) -> float [T, height, width, 3].

  Resized to cover the prompt's size with its aspect ratio kept, then center cropped.
  """
  if isinstance(value, str):
    try:
      frames = video_io.read_image(value) if video_io.is_image(value) else video_io.read_video(value)
    except video_io.DECODE_ERRORS as e:
      raise PromptError(f"{where}: cannot read {value!r} ({type(e).__name__}: {e})") from None
  else:
    frames = np.asarray(value)
  if frames.ndim == 3:
    frames = frames[None]
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise PromptError(f"{where}: expected an image [H, W, 3] or a video [T, H, W, 3], got shape {frames.shape}")
  return video_io.to_float(video_io.resize_crop(video_io.to_uint8(frames), height, width))


def _first_source(p):
  return next(k for k in _MODE_SOURCES[p["mode"]] if k in p)


def prefix_pixel_frames(latent_frames: int, stride: int) -> int:
  """Pixel frames behind the first `latent_frames` latents of a clip (the causal VAE's first latent is 1 frame)."""
  return 1 + stride * (latent_frames - 1) if latent_frames > 0 else 0


def suffix_pixel_frames(latent_frames: int, stride: int) -> int:
  """Pixel frames behind the last `latent_frames` latents of a clip (each stands for `stride` frames).

  A suffix is encoded from one more leading frame, whose 1-frame latent is dropped (`condition_clips`).
  """
  return stride * latent_frames


def condition_clips(p: dict, num_latent: int, stride: int, where: str) -> list[tuple]:
  """What to encode for a prompt: [(pixels [T, H, W, 3], first latent kept, latent position)].

  The causal VAE encodes a clip's first frame alone, so a prefix keeps every latent of the clip (its
  first is a 1-frame latent, as at position 0), while a suffix encodes one extra leading frame and drops
  its latent, leaving latents that each stand for `stride` frames.
  """
  mode, h, w = p["mode"], p["height"], p["width"]
  if mode not in _MODE_SOURCES:
    return []
  k = p.get("context_frames", max(1, num_latent // 2))
  load = lambda key: _load(p[key], h, w, f"{where}: field {key!r}")  # noqa: E731

  def take(key, clip, count, from_end):
    if len(clip) < count:
      raise PromptError(f"{where}: field {key!r} has {len(clip)} frames; mode {mode!r} needs at least {count}")
    return clip[len(clip) - count:] if from_end else clip[:count]

  if mode == "sdedit":
    key = _first_source(p)
    return [(take(key, load(key), p["frames"], False), 0, 0)]
  prefix = {"i2v": 1, "loop": 1, "extend_forward": k, "connect": k}.get(mode, 0)
  suffix = {"loop": 1, "extend_backward": k, "connect": k}.get(mode, 0)
  if prefix + suffix >= num_latent:
    raise PromptError(f"{where}: mode {mode!r} gives {prefix}+{suffix} of the {num_latent} latent frames; "
                      f"nothing is left to generate (fewer context_frames or more frames)")
  out = []
  if mode in ("i2v", "loop"):
    key = _first_source(p)
    first = take(key, load(key), 1, False)
    out.append((first, 0, 0))
    if mode == "loop":  # the last latent frame shows the first frame again
      out.append((np.repeat(first, 1 + stride, axis=0), 1, num_latent - 1))
    return out
  if prefix:  # the end of the given clip starts the new video
    out.append((take("video", load("video"), prefix_pixel_frames(prefix, stride), True), 0, 0))
  if suffix:  # the start of the given clip ends it
    key = "video_end" if mode == "connect" else "video"
    out.append((take(key, load(key), 1 + suffix_pixel_frames(suffix, stride), False), 1, num_latent - suffix))
  return out


def vae_apply(fn, params, rest, arrays: list[np.ndarray], mesh) -> list[np.ndarray]:
  """Runs a jitted VAE function on arrays of any shapes: dense same-shape batches padded to the devices."""
  out = [None] * len(arrays)
  by_shape = collections.defaultdict(list)
  for i, a in enumerate(arrays):
    by_shape[a.shape].append(i)
  with mesh_lib.use(mesh, mesh_lib.VAE_RULES):
    for ids in by_shape.values():
      x = np.stack([arrays[i] for i in ids])
      pad = (-len(ids)) % mesh.size
      if pad:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
      y = np.asarray(jax.device_get(fn(params, rest, mesh_lib.global_batch(x, mesh))))
      for i, v in zip(ids, y):
        out[i] = v
  return out


def prompt_latents(config, prompts: list[dict], encode, vae: tuple, mesh) -> list[dict]:
  """Per prompt: clean latents `x0` [T', H', W', C], `given` [T'] bool (pinned frames), `strength`."""
  st, _ = configs_lib.vae_strides(config.vae)
  jobs, out = [], []
  for i, p in enumerate(prompts):
    shape = latent_shape(config, p["frames"], p["height"], p["width"])
    out.append(dict(x0=np.zeros(shape, np.float32), given=np.zeros(shape[0], bool),
                    strength=float(p.get("strength", 1.0))))
    for clip, keep, pos in condition_clips(p, shape[0], st, f"prompt {i}"):
      jobs.append((i, clip, keep, pos))
  if jobs:
    _, params, rest = vae
    latents = vae_apply(encode, params, rest, [clip for _, clip, _, _ in jobs], mesh)
    for (i, _, keep, pos), z in zip(jobs, latents):
      z = z[keep:]
      out[i]["x0"][pos:pos + len(z)] = z
      if prompts[i]["mode"] != "sdedit":  # SDEdit starts from x0 but pins nothing
        out[i]["given"][pos:pos + len(z)] = True
  return out


# ---------------------------------------------------------------- sampling


def tokenize(caption: str, config) -> np.ndarray:
  """A caption's token ids with the config's text tokenizer."""
  return text_lib.tokenize(caption, config.text.max_len, config.text.get("tokenizer", "bytes"),
                           config.text.get("path") or None)


def _text_rows(rows: dict, captions: dict[int, str], config) -> dict:
  """Text features for the same packed rows with other captions (prompt index -> caption)."""
  b, lt = rows["text"].shape
  text, seg, pos = (np.zeros((b, lt), np.int32) for _ in range(3))
  for r in range(b):
    n = 0
    for s in np.nonzero(rows["grid_segment_ids"][r])[0]:
      ids = tokenize(captions[int(rows["index"][r, s])], config)
      if n + len(ids) > lt:
        raise PromptError(f"negative prompts of row {r} need more than train_dit.text_seq_len={lt} tokens")
      text[r, n:n + len(ids)], seg[r, n:n + len(ids)], pos[r, n:n + len(ids)] = ids, s + 1, np.arange(len(ids))
      n += len(ids)
  return {"text": text, "text_segment_ids": seg, "text_positions": pos}


def guided_velocity(model, rows, neg, *, num_segments: int, guidance: float, guidance_image: float = 1.0,
                    interval=(0.0, 1.0), cond_x0=None, cond_mask=None, noise=None):
  """`velocity(x [B,L,P], t_table [B,S])` with classifier-free guidance, all branches in one model call.

  Branches: text + frames; `neg`'s text + frames (when guidance != 1); and, when `guidance_image` != 1
  and frames are given, `neg`'s text without frames (those tokens then look like any token at t: the
  given latents noised with `noise`). Outside `interval` (per segment t) both scales are 1.
  """
  n = rows["tokens"].shape[0]
  visual = cond_mask is not None and guidance_image != 1.0
  k = 3 if visual else (2 if guidance != 1.0 else 1)
  texts = [rows] + [neg] * (k - 1)
  cat = lambda xs: jnp.concatenate(xs) if len(xs) > 1 else xs[0]  # noqa: E731
  text_seg = cat([r["text_segment_ids"] for r in texts])
  # Guidance branches see unknown labels: the null class of a class-conditional model.
  labels = cat([rows["labels"]] + [jnp.full_like(rows["labels"], -1)] * (k - 1))
  text, pooled = model.encode_text(cat([r["text"] for r in texts]), text_seg,
                                   cat([r["text_positions"] for r in texts]), num_segments, labels=labels)
  seg, coords = cat([rows["tokens_segment_ids"]] * k), cat([rows["coords"]] * k)
  masks = None
  if cond_mask is not None:
    masks = cat([cond_mask] * min(k, 2) + [jnp.zeros_like(cond_mask)] * (k - 2))

  def velocity(x, t_table):
    xs = [x] * min(k, 2)
    if visual:
      t_tok = flow.tokens_from_table(t_table, rows["tokens_segment_ids"])
      xs.append(jnp.where(cond_mask[..., None] > 0, flow.interpolate(cond_x0, noise, t_tok), x))
    v = model(cat(xs), coords, seg, cat([t_table] * k), text, text_seg, pooled, cond_mask=masks)
    if k == 1:
      return v
    on = (t_table >= interval[0]) & (t_table <= interval[1])
    scale = lambda g: flow.tokens_from_table(jnp.where(on, g, 1.0), rows["tokens_segment_ids"])[..., None]  # noqa: E731
    if visual:
      return samplers.cfg_dual(v[:n], v[n:2 * n], v[2 * n:], scale(guidance), scale(guidance_image))
    return samplers.cfg(v[:n], v[n:], scale(guidance))

  return velocity


def make_sampler(config, graphdef, *, steps: int, solver: str, guidance: float, guidance_image: float = 1.0,
                 interval=(0.0, 1.0), conditioned: bool = False):
  """jit: (params, rest, rows, neg, cond) -> denoised tokens [B, L, P].

  `rows` holds noise as tokens, `neg` the unconditional text of the same rows, `cond` per token `x0`
  [B, L, P] and `mask` [B, L] (pinned tokens, used when `conditioned`) and per segment `strength` [B, S].
  """
  S = config.train_dit.max_segments

  @jax.jit
  def sample(params, rest, rows, neg, cond):
    model = nnx.merge(graphdef, params, rest)
    seg = rows["tokens_segment_ids"]
    ts = samplers.flow_timesteps(steps, train_dit.segment_shift(config, rows["grid"]), cond["strength"])
    noise = rows["tokens"]
    x_init = flow.interpolate(cond["x0"], noise, flow.tokens_from_table(ts[0], seg))
    mask = cond["mask"] if conditioned else None
    velocity = guided_velocity(model, rows, neg, num_segments=S, guidance=guidance,
                               guidance_image=guidance_image, interval=interval, cond_x0=cond["x0"],
                               cond_mask=mask, noise=noise)
    return samplers.sample_flow(velocity, x_init, ts, seg, solver=solver, cond_x0=cond["x0"], cond_mask=mask)

  return sample


def _settings(p: dict, sc, overrides: dict) -> tuple:
  """(steps, solver, guidance, guidance_image, interval) of a prompt: its fields > call args > config."""
  def get(k, default):
    if k in p:
      return p[k]
    return default if overrides.get(k) is None else overrides[k]
  return (int(get("steps", sc.steps)), get("solver", sc.solver), float(get("guidance", sc.guidance)),
          float(get("guidance_image", sc.get("guidance_image", 1.0))),
          tuple(float(v) for v in get("guidance_interval", sc.get("guidance_interval", (0.0, 1.0)))))


def sample_latents(config, models: Models, mesh, prompts: list[dict], *, encode=None,
                   **overrides) -> tuple[list[np.ndarray], list[dict], list[tuple]]:
  """Checked prompts -> (latents [T', H', W', C] per prompt, their condition latents, their settings)."""
  sc, t = config.sample, config.train_dit
  patch, C = tuple(config.dit.patch_size), config.vae.latent_channels
  graphdef, params, rest = models.dit
  if encode is None and any(p["mode"] in _MODE_SOURCES for p in prompts):
    encode = train_vae.make_encode_fn(models.vae[0], mesh, chunk=sc.get("vae_chunk") or None)
  conds = prompt_latents(config, prompts, encode, models.vae, mesh)
  settings = [_settings(p, sc, overrides) for p in prompts]
  for i, s in enumerate(settings):
    if s[1] not in samplers.FLOW_SOLVERS:
      raise PromptError(f"prompt {i}: solver {s[1]!r} is unknown; choose one of {samplers.FLOW_SOLVERS}")

  # One sampler call per group of prompts sharing settings (they are static in the compiled sampler).
  groups = collections.defaultdict(list)
  for i, s in enumerate(settings):
    groups[s].append(i)
  latents = [None] * len(prompts)
  bs = max(sc.batch_size, mesh.size)
  bs -= bs % mesh.size
  for (steps, solver, guidance, guidance_image, interval), ids in groups.items():
    # Noise per prompt from its own seed: a prompt's video does not depend on what it is packed with.
    samples, per_prompt = [], {}
    for i in ids:
      p = prompts[i]
      shape = latent_shape(config, p["frames"], p["height"], p["width"])
      noise = np.asarray(jax.random.normal(jax.random.key(int(p.get("seed", i))), shape), np.float32)
      tokens, coords, grid = packing.patchify(noise, patch)
      if len(tokens) > t.seq_len:
        raise PromptError(f"prompt {i}: {p['frames']}x{p['height']}x{p['width']} needs {len(tokens)} tokens, "
                          f"more than train_dit.seq_len={t.seq_len}")
      x0_tokens = packing.patchify(conds[i]["x0"], patch)[0]
      # A token is pinned when every latent frame of its temporal patch is given.
      given = conds[i]["given"].reshape(-1, patch[0]).all(1)[coords[:, 0]]
      per_prompt[i] = (x0_tokens, given.astype(np.float32), conds[i]["strength"])
      samples.append(packing.sample_features(tokens, coords, grid,
                                             tokenize(p["caption"], config),
                                             p.get("labels", np.full(6, -1)), i))
    conditioned = any(conds[i]["given"].any() for i in ids)
    rows = packing.pack_list(samples, seq_len=t.seq_len, text_seq_len=t.text_seq_len, max_segments=t.max_segments)
    sampler = make_sampler(config, graphdef, steps=steps, solver=solver, guidance=guidance,
                           guidance_image=guidance_image, interval=interval, conditioned=conditioned)
    with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
      for start in range(0, len(rows), bs):
        chunk = packing.stack_rows(rows[start:start + bs], bs)
        cond = {"x0": np.zeros_like(chunk["tokens"]), "mask": np.zeros(chunk["tokens_segment_ids"].shape, np.float32),
                "strength": np.ones(chunk["grid"].shape[:2], np.float32)}
        for r, s in zip(*np.nonzero(chunk["grid_segment_ids"])):
          x0_tokens, given, strength = per_prompt[int(chunk["index"][r, s])]
          sel = chunk["tokens_segment_ids"][r] == s + 1
          cond["x0"][r, sel], cond["mask"][r, sel], cond["strength"][r, s] = x0_tokens, given, strength
        neg = _text_rows(chunk, {i: prompts[i].get("negative_prompt", sc.get("negative_prompt", "")) for i in ids},
                         config)
        out = np.asarray(jax.device_get(sampler(params, rest, mesh_lib.global_batch(chunk, mesh),
                                                mesh_lib.global_batch(neg, mesh), mesh_lib.global_batch(cond, mesh))))
        for r, s in zip(*np.nonzero(chunk["grid_segment_ids"][:len(rows) - start])):
          sel = chunk["tokens_segment_ids"][r] == s + 1
          latents[int(chunk["index"][r, s])] = packing.unpatchify(out[r][sel], chunk["grid"][r, s], patch, C)
  return latents, conds, settings


def _describe(value):
  """JSON-friendly record of a prompt field (arrays by shape)."""
  if isinstance(value, np.ndarray):
    return f"array{list(value.shape)}" if value.ndim > 1 else value.tolist()
  if isinstance(value, tuple):
    return list(value)
  return value


def generate_with(config, models: Models, mesh, prompts: list[dict], *, out_dir: str | None = None,
                  write_files: bool = True, **overrides) -> tuple[list[np.ndarray], list[dict]]:
  """`generate` with models already in memory (tests and tools build or restore them themselves)."""
  t0 = time.perf_counter()
  prompts = [check_prompt(p, config, f"prompt {i}") for i, p in enumerate(prompts)]
  for i, p in enumerate(prompts):
    p.setdefault("seed", i)
  latents, conds, settings = sample_latents(config, models, mesh, prompts, **overrides)
  vae_graph, vae_params, vae_rest = models.vae
  decode = train_vae.make_decode_fn(vae_graph, mesh, chunk=config.sample.get("vae_chunk") or None)
  decoded = vae_apply(decode, vae_params, vae_rest, latents, mesh)
  videos = [video_io.to_uint8(v) for v in decoded]
  seconds = time.perf_counter() - t0

  records = []
  for i, (p, s, c) in enumerate(zip(prompts, settings, conds)):
    rec = {k: _describe(x) for k, x in p.items()}
    rec.update(index=i, steps=s[0], solver=s[1], guidance=s[2], guidance_image=s[3], guidance_interval=list(s[4]),
               given_latent_frames=np.nonzero(c["given"])[0].tolist(), dit_step=int(models.dit_step))
    records.append(rec)
  if write_files and out_dir and jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    _remove_previous_samples(out_dir, keep=len(records))
    for rec, v in zip(records, videos):
      rec["file"] = os.path.join(out_dir, f"sample_{rec['index']:03d}.mp4")
      video_io.write_mp4(rec["file"], v, upscale=4)
    video_io.write_gif_grid(os.path.join(out_dir, "grid.gif"), videos)
    with open(os.path.join(out_dir, "samples.json"), "w") as f:
      json.dump({"seconds": seconds, "samples": records}, f, indent=1)
    logging.info("sample: wrote %d videos to %s in %.1fs", len(videos), out_dir, seconds)
  return videos, records


def _remove_previous_samples(out_dir: str, keep: int) -> None:
  """Deletes the videos an earlier run recorded in out_dir's samples.json that this run will not overwrite
  (its indices from `keep` on), so that the folder holds one run's samples; no other file is touched."""
  path = os.path.join(out_dir, "samples.json")
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      indices = [rec["index"] for rec in json.load(f)["samples"]]
  except (ValueError, KeyError, TypeError):
    return  # not a samples.json this code wrote: leave everything as it is
  for name in (f"sample_{i:03d}.mp4" for i in indices if isinstance(i, int) and i >= keep):
    if os.path.isfile(os.path.join(out_dir, name)):
      os.remove(os.path.join(out_dir, name))


def restore_models(config, workdir: str, mesh) -> Models:
  """The trained VAE and denoiser (EMA weights when `sample.use_ema`) of a workdir."""
  vae = train_vae.restore(config, workdir, mesh)
  graphdef, params, rest, step = train_dit.restore(config, workdir, mesh, use_ema=config.sample.use_ema)
  return Models(dit=(graphdef, params, rest), vae=vae, dit_step=int(step))


def generate(config, workdir: str, mesh, prompts: list[dict], *, out_dir: str | None = None,
             steps: int | None = None, solver: str | None = None, guidance: float | None = None,
             write_files: bool = True, **overrides) -> tuple[list[np.ndarray], list[dict]]:
  """Samples one video per prompt (any mode); writes mp4s, a GIF grid and `samples.json` to out_dir.

  `steps`, `solver`, `guidance` (and `guidance_image`, `guidance_interval`) override the config for
  prompts that do not set their own.
  """
  models = restore_models(config, workdir, mesh)
  return generate_with(config, models, mesh, prompts, out_dir=out_dir, write_files=write_files, steps=steps,
                       solver=solver, guidance=guidance, **overrides)
