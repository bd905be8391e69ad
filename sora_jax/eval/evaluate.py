"""`--mode=eval` and in-training evaluation: validation loss, VAE PSNR, FVD, prompt adherence per attribute.

Every number is comparable across checkpoints: the validation loss uses fixed timesteps
(`config.eval.val_timesteps`), noise fixed by seed and the first `config.eval.val_samples` examples of the
latent cache in order (no caption dropout, no frame conditioning); FVD and adherence sample the held-out
prompts with their own seeds. Results go to `<workdir>/eval/step_<N>.json`, `<workdir>/eval.json` (latest)
and TensorBoard (`<workdir>/eval/`, the one MetricWriter); `compare` tabulates checkpoints or workdirs.
"""
from __future__ import annotations

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from sora_jax import generate as generate_lib
from sora_jax.data import packing
from sora_jax.data import pipeline
from sora_jax.data import sources
from sora_jax.data import synthetic
from sora_jax.data import video_io
from sora_jax.diffusion import flow
from sora_jax.eval import fvd as fvd_lib
from sora_jax.eval import scorer
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.train import logging as log_lib
from sora_jax.train import train_dit
from sora_jax.train import train_vae

DEFAULT_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)


# ------------------------------------------------------------------------------------ validation loss
def validation_batches(config, workdir: str) -> list[dict]:
  """Packed batches of the first `config.eval.val_samples` latent-cache examples, in order, captions kept."""
  source = train_dit.latent_source(workdir, config)
  n = min(len(source), config.eval.get("val_samples", 64))
  to_features = pipeline.latent_to_features(config, train=False)
  rng = np.random.default_rng(0)  # unused without caption and token dropping
  t = config.train_dit
  rows = packing.pack_list([to_features.random_map(source[i], rng) for i in range(n)], seq_len=t.seq_len,
                           text_seq_len=t.text_seq_len, max_segments=t.max_segments,
                           text_states=to_features.embeddings is not None)
  return [packing.stack_rows(rows[i:i + t.batch_size], t.batch_size) for i in range(0, len(rows), t.batch_size)]


def make_val_loss_fn(config, graphdef):
  """jit(params, rest, batch, t, key) -> flow loss of `batch` with every segment at time `t`."""
  S = config.train_dit.max_segments

  @jax.jit
  def val_loss(params, rest, batch, t, key):
    model = nnx.merge(graphdef, params, rest)
    seg, x0 = batch["tokens_segment_ids"], batch["tokens"]
    t_table = jnp.full((seg.shape[0], S), t, jnp.float32)
    noise = jax.random.normal(key, x0.shape, x0.dtype)
    x_t = flow.interpolate(x0, noise, flow.tokens_from_table(t_table, seg))
    text, pooled = train_dit.batch_text(model, batch, S)
    v = model(x_t, batch["coords"], seg, t_table, text, batch["text_segment_ids"], pooled)
    return flow.flow_loss(v, flow.velocity_target(x0, noise), seg, max_segments=S)[0]

  return val_loss


def validation_loss(config, graphdef, params, rest, batches: list[dict], mesh, *, val_fn=None) -> dict:
  """{'val_loss_t0.1': ..., 'val_loss': mean over timesteps}; noise depends only on (seed, batch, t)."""
  val_fn = val_fn or make_val_loss_fn(config, graphdef)
  out = {}
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    for k, t in enumerate(config.eval.get("val_timesteps", DEFAULT_TIMESTEPS)):
      losses = [val_fn(params, rest, mesh_lib.global_batch(b, mesh), t,
                       jax.random.fold_in(jax.random.key(config.seed + 1000 * k), i)) for i, b in enumerate(batches)]
      out[f"val_loss_t{t:g}"] = float(np.mean(jax.device_get(losses)))
  out["val_loss"] = float(np.mean(list(out.values())))
  return out


# ---------------------------------------------------------------------------------------- VAE PSNR
def vae_psnr(config, workdir: str, mesh) -> float:
  """PSNR (dB) of VAE reconstructions of the held-out clips (see `train_vae.evaluate_vae`)."""
  return train_vae.evaluate_vae(config, workdir, mesh)["synthetic"]["psnr"]


def heldout_clips(config, n: int) -> np.ndarray:
  """Ground-truth held-out clips [n, T, H, W, 3] in [-1, 1] at config.data.heldout_size."""
  src = synthetic.SyntheticVideos(n, [tuple(config.data.heldout_size)], split="heldout", seed=config.seed + 23)
  return np.stack([video_io.to_float(src[i]["video"]) for i in range(n)])


# ------------------------------------------------------------------------- samples: adherence and FVD
def sample_metrics(config, workdir: str, mesh, *, out_dir: str | None = None, **sample_kw) -> dict:
  """Generates the held-out prompts; {'prompt_adherence': {attribute: accuracy}, 'fvd': ...}.

  FVD (when `config.eval.fvd_clips` > 0) compares the first `fvd_clips` generated videos with as many
  ground-truth held-out clips. Both need the embedded data's labelled prompts: a DiT trained on other data
  (no synthetic source) gets {} and a log line, not scores of prompts it never saw.
  """
  kinds = [p.get("source") for p in sources.mixture(config)] or [config.data.get("source", "synthetic")]
  if "synthetic" not in kinds:
    logging.info("eval: prompt adherence and FVD score the embedded data's held-out prompts; the DiT "
                 "trains on %s, so they are skipped (sample your own prompts with --mode=sample)", kinds)
    return {}
  prompts = synthetic.heldout_prompts(config.sample.num_heldout_prompts, tuple(config.data.heldout_size),
                                      seed=config.seed)
  videos, _ = generate_lib.generate(config, workdir, mesh, prompts, out_dir=out_dir, **sample_kw)
  out = {"prompt_adherence": scorer.prompt_adherence(videos, np.stack([p["labels"] for p in prompts]))}
  n = min(config.eval.get("fvd_clips", 0), len(videos))
  if n > 1:
    out["fvd"] = fvd_lib.fvd(video_io.to_float(np.stack(videos[:n])), heldout_clips(config, n))
  return out


def prompt_adherence(config, workdir: str, mesh, *, out_dir: str | None = None, **sample_kw) -> dict:
  """Generates the held-out prompts and scores them from pixels: {attribute: accuracy}."""
  return sample_metrics(config, workdir, mesh, out_dir=out_dir, **sample_kw).get("prompt_adherence", {})


# ------------------------------------------------------------------------------------------ results
def flatten(results: dict, prefix: str = "") -> dict[str, float]:
  """{'prompt_adherence': {'color': .9}} -> {'prompt_adherence/color': .9} (numbers only)."""
  flat = {}
  for k, v in results.items():
    if isinstance(v, dict):
      flat.update(flatten(v, f"{prefix}{k}/"))
    elif isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
      flat[f"{prefix}{k}"] = float(v)
  return flat


def write_results(workdir: str, step: int, results: dict, writer: log_lib.MetricWriter | None = None):
  """`<workdir>/eval/step_<N>.json`, `<workdir>/eval.json` (latest) and TensorBoard scalars."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  step_path = os.path.join(workdir, "eval", f"step_{int(step)}.json")
  record = {}
  if os.path.exists(step_path):  # several evaluations of one checkpoint add up (e.g. training's, then --mode=eval)
    with open(step_path) as f:
      record = json.load(f)
  record.update({"step": int(step), **results})
  for path in (step_path, os.path.join(workdir, "eval.json")):
    with open(path, "w") as f:
      json.dump(record, f, indent=1)
  own = writer is None
  writer = writer or log_lib.MetricWriter(workdir, "eval")
  writer.write(step, flatten(results))
  if own:
    writer.close()


def evaluate(config, workdir: str, mesh, *, vae: dict | None = None) -> dict:
  """Every metric of the latest checkpoints of `workdir`; written per DiT step (see module docstring).

  `vae` passes VAE metrics already computed for this workdir (they do not depend on the DiT).
  """
  graphdef, params, rest, step = train_dit.restore(config, workdir, mesh, use_ema=config.sample.use_ema)
  out = validation_loss(config, graphdef, params, rest, validation_batches(config, workdir), mesh)
  out["vae"] = vae or train_vae.evaluate_vae(config, workdir, mesh)
  out["vae_psnr"] = out["vae"]["synthetic"]["psnr"]
  out.update(sample_metrics(config, workdir, mesh, out_dir=os.path.join(workdir, "samples")))
  write_results(workdir, int(step), out)
  logging.info("eval at step %d: %s", step, out)
  return out


# ------------------------------------------------------------------------------------------ compare
def load_results(paths: list[str]) -> list[tuple[str, dict]]:
  """(name, flat metrics) per eval JSON; a workdir stands for all its `eval/step_*.json`."""
  rows = []
  for path in paths:
    files = sorted(glob.glob(os.path.join(path, "eval", "step_*.json")),
                   key=lambda p: int(p.rsplit("_", 1)[1][:-5])) if os.path.isdir(path) else [path]
    for f in files:
      with open(f) as fh:
        record = json.load(fh)
      name = os.path.basename(os.path.normpath(path)) if os.path.isdir(path) else os.path.splitext(os.path.basename(f))[0]
      rows.append((f"{name}@{record.get('step', '?')}", flatten(record)))
  return rows


def markdown_table(rows: list[tuple[str, dict]], columns: list[str] | None = None) -> str:
  """One row per checkpoint, one column per metric (missing values blank)."""
  if columns is None:
    columns = sorted({k for _, m in rows for k in m if k != "step"})
  lines = ["| checkpoint | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  for name, m in rows:
    lines.append(f"| {name} | " + " | ".join(f"{m[c]:.4g}" if c in m else "" for c in columns) + " |")
  return "\n".join(lines)


def compare(paths: list[str], columns: list[str] | None = None) -> str:
  """Markdown comparison of eval results across checkpoints (workdirs or eval JSON files)."""
  return markdown_table(load_results(paths), columns)
