r"""sora_jax launcher.

  python -m sora_jax.main --config=configs/tiny_t2v.py[:args] --workdir=DIR --mode=MODE \
      [--config.a.b=value ...]

Modes: train_vae, encode, train_dit, sample, eval, all (the whole chain, as `make demo` runs it).
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (python, get_config(arg)).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and reports.")
_MODE = flags.DEFINE_string("mode", None, "train_vae | encode | train_dit | sample | eval | all "
                            "(default: config.mode).")
_PROMPTS = flags.DEFINE_string("prompts", None, "JSONL prompts file for --mode=sample "
                               "(default: config.sample.prompts_file, else the held-out prompts).")
_OUT = flags.DEFINE_string("out", None, "Where --mode=sample writes its videos, grid.gif and samples.json "
                           "(default: WORKDIR/samples/NAME for a prompts file NAME.jsonl, WORKDIR/samples for "
                           "the held-out prompts, where --mode=eval writes them too).")
_DISTRIBUTED = flags.DEFINE_string(
    "distributed", "off", "Multi-host setup: off | auto (TPU pod / SLURM / JAX_COORDINATOR_ADDRESS) | "
    "coordinator=HOST:PORT,num_processes=N,process_id=I")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
  """Drops INFO chatter from checkpoint/dataset libraries so progress lines stay readable."""

  NOISY = ("orbax", "tensorflow_datasets", "etils", "grain")

  def filter(self, record):
    return record.levelno >= 30 or not any(n in record.pathname for n in self.NOISY)


def _setup_jax(config):
  import jax  # imported after flags so JAX_PLATFORMS and friends from the environment apply
  if config.compilation_cache:
    cache = os.path.expanduser(config.compilation_cache)
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return jax


def run(config, workdir: str, mode: str) -> dict:
  """Runs one mode (or the chain) and returns its results; importable for notebooks and tests."""
  from sora_jax import configs_lib
  configs_lib.validate(config)
  jax = _setup_jax(config)
  from sora_jax import encode as encode_lib
  from sora_jax import generate as generate_lib
  from sora_jax.data import synthetic
  from sora_jax.eval import evaluate as eval_lib
  from sora_jax.eval import scorer
  from sora_jax.parallel import mesh as mesh_lib
  from sora_jax.train import train_dit
  from sora_jax.train import train_vae

  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=1, default=str)
  mesh = mesh_lib.make_mesh(config.mesh)
  logging.info("mesh: %s on %d %s devices", dict(mesh.shape), jax.device_count(), jax.default_backend())

  stage_seconds, report = {}, {}

  def stage(name, fn):
    logging.info("=== %s ===", name)
    t0 = time.perf_counter()
    out = fn()
    stage_seconds[name] = round(time.perf_counter() - t0, 1)
    logging.info("=== %s done in %.1fs ===", name, stage_seconds[name])
    return out

  if mode in ("train_vae", "all"):
    report["train_vae"] = stage("train_vae", lambda: train_vae.train(config, workdir, mesh))
  if mode in ("encode", "all"):
    report["encode"] = stage("encode", lambda: encode_lib.encode(config, workdir, mesh))
  if mode in ("train_dit", "all"):
    report["train_dit"] = stage("train_dit", lambda: train_dit.train(config, workdir, mesh))
  if mode == "sample":
    path = _PROMPTS.value if _PROMPTS.present else config.sample.prompts_file
    if path:
      if not os.path.isfile(path):
        raise configs_lib.InputError(f"--prompts={path}: no such file")
      prompts = generate_lib.read_prompts(path, config)  # generate.PromptError: one line, exit code 2
    else:
      prompts = synthetic.heldout_prompts(config.sample.num_heldout_prompts, tuple(config.data.heldout_size),
                                          seed=config.seed)
    out_dir = _OUT.value or os.path.join(workdir, "samples", *(
        [os.path.splitext(os.path.basename(path))[0]] if path else []))
    videos, _ = stage("sample", lambda: generate_lib.generate(config, workdir, mesh, prompts, out_dir=out_dir))
    report["samples_dir"] = os.path.abspath(out_dir)
    labeled = [i for i, p in enumerate(prompts) if "labels" in p]
    if labeled:
      report["prompt_adherence"] = scorer.prompt_adherence(
          [videos[i] for i in labeled], [prompts[i]["labels"] for i in labeled])
  if mode in ("eval", "all"):
    # VAE metrics always; DiT metrics (validation loss, samples scored, FVD) once a DiT is trained.
    report["vae"] = stage("eval_vae", lambda: train_vae.evaluate_vae(config, workdir, mesh))
    report["vae_psnr"] = report["vae"]["synthetic"]["psnr"]
    if os.path.isdir(train_dit.checkpoint_dir(workdir)):
      results = stage("eval_dit", lambda: eval_lib.evaluate(config, workdir, mesh, vae=report["vae"]))
      report.update({k: v for k, v in results.items() if k not in ("vae", "vae_psnr")})
  report["stage_seconds"] = stage_seconds
  report["mode"] = mode
  if jax.process_index() == 0:
    path = os.path.join(workdir, "report.json")
    previous = {}
    if os.path.exists(path):
      with open(path) as f:
        previous = json.load(f)
    previous.update(report)
    previous["stage_seconds"] = {**previous.get("stage_seconds", {}), **stage_seconds}
    with open(path, "w") as f:
      json.dump(previous, f, indent=1)
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _CONFIG.value
  mode = _MODE.value or config.mode
  if mode == "encode":
    from sora_jax import runtime  # before JAX starts its CPU backend, which reads XLA_FLAGS once
    runtime.apply_for_encoding(config)
  from sora_jax.parallel import distributed
  distributed.initialize(_DISTRIBUTED.value)  # before anything asks JAX for devices
  from sora_jax import configs_lib
  with config.unlocked():
    config.mode = mode
  try:
    configs_lib.validate(config)
  except configs_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  t0 = time.perf_counter()
  try:
    report = run(config, _WORKDIR.value, mode)
  except (configs_lib.ConfigError, configs_lib.InputError) as e:  # found while running, e.g. a missing path
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  workdir = os.path.abspath(_WORKDIR.value)
  print(f"\nsora_jax {mode} finished in {time.perf_counter() - t0:.0f}s. Workdir: {workdir}")
  for name, rel in [("report", "report.json"), ("samples", report.get("samples_dir", "samples")),
                    ("TensorBoard logs", "."), ("VAE checkpoints", "vae/checkpoints"),
                    ("DiT checkpoints", "dit/checkpoints")]:
    if os.path.exists(os.path.join(workdir, rel)):
      print(f"  {name:17s} {os.path.normpath(os.path.join(workdir, rel))}")
  summary = {k: v for k, v in report.items() if k in ("vae_psnr", "prompt_adherence", "stage_seconds")}
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
