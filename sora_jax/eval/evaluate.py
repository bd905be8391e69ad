"""`--mode=eval`: VAE reconstruction PSNR on held-out clips and prompt adherence of generated videos."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging

from sora_jax import generate as generate_lib
from sora_jax.data import synthetic
from sora_jax.data import video_io
from sora_jax.eval import scorer
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.train import train_vae


def vae_psnr(config, workdir: str, mesh) -> float:
  """Mean per-clip PSNR (dB) of VAE reconstructions of held-out clips at config.data.heldout_size."""
  graphdef, params, rest = train_vae.restore(config, workdir, mesh)
  encode = train_vae.make_encode_fn(graphdef, mesh)
  decode = train_vae.make_decode_fn(graphdef, mesh)
  n = config.eval.num_vae_clips
  src = synthetic.SyntheticVideos(n, [tuple(config.data.heldout_size)], split="heldout", seed=config.seed + 23)
  video = np.stack([video_io.to_float(src[i]["video"]) for i in range(n)])
  pad = (-n) % jax.device_count()
  if pad:
    video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
  with mesh_lib.use(mesh, mesh_lib.VAE_RULES):
    x = mesh_lib.global_batch(video, mesh)
    recon = np.asarray(jax.device_get(decode(params, rest, encode(params, rest, x))))[:n]
  mse = np.mean(np.square(recon - video[:n]), axis=(1, 2, 3, 4))
  return float(np.mean(20 * np.log10(2.0) - 10 * np.log10(np.maximum(mse, 1e-10))))


def prompt_adherence(config, workdir: str, mesh, *, out_dir: str | None = None, **sample_kw) -> dict:
  """Generates the held-out prompts and scores them from pixels: {attribute: accuracy}."""
  prompts = synthetic.heldout_prompts(config.sample.num_heldout_prompts, tuple(config.data.heldout_size),
                                      seed=config.seed)
  videos, _ = generate_lib.generate(config, workdir, mesh, prompts, out_dir=out_dir, **sample_kw)
  labels = np.stack([p["labels"] for p in prompts])
  return scorer.prompt_adherence(videos, labels)


def evaluate(config, workdir: str, mesh) -> dict:
  out = {"vae_psnr": vae_psnr(config, workdir, mesh)}
  out["prompt_adherence"] = prompt_adherence(config, workdir, mesh, out_dir=os.path.join(workdir, "eval_samples"))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(out, f, indent=1)
  logging.info("eval: %s", out)
  return out
