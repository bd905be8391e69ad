"""Prompts -> videos: packed sampling of prompts at different sizes in one call, CFG, VAE decode, files.

A prompt is a dict with `caption`, `frames`, `height`, `width`, `seed` (and optionally `labels`). All
prompts are patchified to noise, best-fit packed into rows, denoised together (conditional and
unconditional rows share one batched model call), unpacked per segment and decoded.
"""
from __future__ import annotations

import collections
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from sora_jax import configs_lib
from sora_jax.data import packing
from sora_jax.data import video_io
from sora_jax.diffusion import samplers
from sora_jax.models import text as text_lib
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.train import train_dit
from sora_jax.train import train_vae


def latent_shape(config, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
  st, ss = configs_lib.vae_strides(config.vae)
  return 1 + (frames - 1) // st, height // ss, width // ss, config.vae.latent_channels


def _unconditional_text(rows: dict, max_segments: int) -> dict:
  """The same rows with every caption replaced by the empty caption (BOS only)."""
  b, lt = rows["text"].shape
  text = np.zeros((b, lt), np.int32)
  seg = np.zeros((b, lt), np.int32)
  pos = np.zeros((b, lt), np.int32)
  for r in range(b):
    ids = [s for s in np.unique(rows["tokens_segment_ids"][r]) if s > 0]
    for j, s in enumerate(ids):
      text[r, j], seg[r, j] = text_lib.BOS, s
  return {**rows, "text": text, "text_segment_ids": seg, "text_positions": pos}


def make_sampler(config, graphdef, mesh, *, steps: int, solver: str, guidance: float):
  """jit: (params, rest, rows) -> denoised tokens [B, L, P] with CFG over a concatenated batch."""
  S = config.train_dit.max_segments

  del mesh  # traced under `mesh_lib.use(mesh, DIT_RULES)` by the caller

  @jax.jit
  def sample(params, rest, rows, uncond_rows):
    model = nnx.merge(graphdef, params, rest)
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), rows, uncond_rows)
    text, pooled = model.encode_text(both["text"], both["text_segment_ids"], both["text_positions"], S)
    seg2, coords2 = both["tokens_segment_ids"], both["coords"]
    n = rows["tokens"].shape[0]

    def velocity(x, t_table):
      v = model(jnp.concatenate([x, x]), coords2, seg2, jnp.concatenate([t_table, t_table]), text,
                both["text_segment_ids"], pooled)
      return samplers.cfg(v[:n], v[n:], guidance) if guidance != 1.0 else v[:n]

    shift = train_dit.segment_shift(config, rows["grid"])
    ts = samplers.flow_timesteps(steps, shift)
    return samplers.sample_flow(velocity, rows["tokens"], ts, rows["tokens_segment_ids"], solver=solver)

  return sample


def generate(config, workdir: str, mesh, prompts: list[dict], *, out_dir: str | None = None,
             steps: int | None = None, solver: str | None = None, guidance: float | None = None,
             write_files: bool = True) -> tuple[list[np.ndarray], list[dict]]:
  """Samples one video per prompt; writes mp4s, a GIF grid and `samples.json` to out_dir."""
  sc = config.sample
  steps = steps or sc.steps
  solver = solver or sc.solver
  guidance = sc.guidance if guidance is None else guidance
  t0 = time.perf_counter()
  vae_graph, vae_params, vae_rest = train_vae.restore(config, workdir, mesh)
  graphdef, params, rest, dit_step = train_dit.restore(config, workdir, mesh, use_ema=sc.use_ema)
  decode = train_vae.make_decode_fn(vae_graph, mesh)
  patch = tuple(config.dit.patch_size)
  C = config.vae.latent_channels
  t = config.train_dit

  # Noise per prompt from its own seed: a prompt's video does not depend on what it is packed with.
  samples = []
  for i, p in enumerate(prompts):
    shape = latent_shape(config, p["frames"], p["height"], p["width"])
    noise = np.asarray(jax.random.normal(jax.random.key(int(p.get("seed", i))), shape), np.float32)
    tokens, coords, grid = packing.patchify(noise, patch)
    if len(tokens) > t.seq_len:
      raise ValueError(f"prompt {i}: {p['frames']}x{p['height']}x{p['width']} needs {len(tokens)} tokens, "
                       f"more than train_dit.seq_len={t.seq_len}")
    labels = p.get("labels", np.full(6, -1))
    samples.append(packing.sample_features(tokens, coords, grid, text_lib.tokenize(p["caption"], config.text.max_len),
                                           labels, i))
  rows = packing.pack_list(samples, seq_len=t.seq_len, text_seq_len=t.text_seq_len, max_segments=t.max_segments)
  sampler = make_sampler(config, graphdef, mesh, steps=steps, solver=solver, guidance=guidance)

  latents = {}
  bs = max(sc.batch_size, jax.device_count())
  bs -= bs % jax.device_count()
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    for start in range(0, len(rows), bs):
      chunk = packing.stack_rows(rows[start:start + bs], bs)
      batch = mesh_lib.global_batch(chunk, mesh)
      uncond = mesh_lib.global_batch(_unconditional_text(chunk, t.max_segments), mesh)
      out = np.asarray(jax.device_get(sampler(params, rest, batch, uncond)))
      for r in range(min(bs, len(rows) - start)):
        for s in range(t.max_segments):
          if chunk["grid_segment_ids"][r, s] == 0:
            continue
          sel = chunk["tokens_segment_ids"][r] == s + 1
          latents[int(chunk["index"][r, s])] = packing.unpatchify(out[r][sel], chunk["grid"][r, s], patch, C)

  # Decode, grouped by latent shape so each VAE call is dense.
  videos = [None] * len(prompts)
  by_shape = collections.defaultdict(list)
  for i, z in latents.items():
    by_shape[z.shape].append(i)
  with mesh_lib.use(mesh, mesh_lib.VAE_RULES):
    for shape, ids in by_shape.items():
      z = np.stack([latents[i] for i in ids])
      pad = (-len(ids)) % jax.device_count()
      if pad:
        z = np.concatenate([z, np.repeat(z[-1:], pad, axis=0)])
      vids = np.asarray(jax.device_get(decode(vae_params, vae_rest, mesh_lib.global_batch(z, mesh))))
      for i, v in zip(ids, vids):
        videos[i] = video_io.to_uint8(v)
  seconds = time.perf_counter() - t0

  records = []
  for i, (p, v) in enumerate(zip(prompts, videos)):
    rec = {k: (np.asarray(x).tolist() if isinstance(x, np.ndarray) else x) for k, x in p.items()}
    rec.update(index=i, steps=steps, solver=solver, guidance=guidance, dit_step=int(dit_step))
    records.append(rec)
  if write_files and out_dir and jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    for rec, v in zip(records, videos):
      rec["file"] = os.path.join(out_dir, f"sample_{rec['index']:03d}.mp4")
      video_io.write_mp4(rec["file"], v, upscale=4)
    video_io.write_gif_grid(os.path.join(out_dir, "grid.gif"), videos)
    with open(os.path.join(out_dir, "samples.json"), "w") as f:
      json.dump({"seconds": seconds, "samples": records}, f, indent=1)
    logging.info("sample: wrote %d videos to %s in %.1fs", len(videos), out_dir, seconds)
  return videos, records


def read_prompts(path: str, config) -> list[dict]:
  """Reads a JSONL prompts file; missing fields take the config's held-out size and the line number seed."""
  prompts = []
  default = tuple(config.data.heldout_size)
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        p = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
      if "prompt" in p and "caption" not in p:
        p["caption"] = p.pop("prompt")
      if not isinstance(p.get("caption"), str):
        raise ValueError(f"{path}:{n}: field 'prompt' (a string) is required")
      p.setdefault("frames", default[0])
      p.setdefault("height", default[1])
      p.setdefault("width", default[2])
      p.setdefault("seed", n)
      prompts.append(p)
  if not prompts:
    raise ValueError(f"{path}: no prompts")
  return prompts
