r"""Precomputes the frozen text encoder's embeddings of every training caption, for `config.text.precomputed`.

With a pretrained, frozen `config.text.encoder` ('minilm' or 't5') the encoder gives the same states for a
caption at every step; running it once here and looking the states up in the DiT pipeline takes it out of
the train step. Captions come from the latent caches the DiT trains on (`--workdir`: the cache(s) that
`--mode=encode` wrote there, one per `config.data.mixture` part; or `--cache=PATH`, repeatable) and/or a
captions file (`--captions`: CSV/JSONL with a `caption` column, or one caption per line). Each distinct
caption is encoded once, plus the empty caption (caption dropout's unconditional prompt).

  CFG=configs/folder_t2v.py:path=$HOME/my_videos
  TEXT="--config.text.encoder=minilm --config.text.tokenizer=minilm --config.text.width=384"
  python tools/encode_text.py --config=$CFG $TEXT --workdir=/tmp/my_t2v --out=/tmp/my_t2v/text
  python -m sora_jax.main --config=$CFG $TEXT --workdir=/tmp/my_t2v --mode=train_dit \
      --config.text.precomputed=/tmp/my_t2v/text/text_embeddings/1.0.0

The DiT checks before training that the embeddings come from the configured encoder (kind, max_len, width,
model files) and cover each of its caches (length and a fingerprint of the stored latents); sampling still
encodes prompts live with the same encoder. See `sora_jax/data/text_embeddings.py` for the layout.
"""
from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _define_flags():
  """Registers the command-line flags (only when run as a script, so tests can import this module)."""
  global _CONFIG, _WORKDIR, _CACHE, _CAPTIONS, _OUT, _BATCH, _DTYPE, _SPLIT, _OVERWRITE
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (python, get_config(arg)).")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Encode the captions of the DiT's latent caches in this workdir.")
  _CACHE = flags.DEFINE_multi_string("cache", [], "A latent cache to encode the captions of (repeatable).")
  _CAPTIONS = flags.DEFINE_string("captions", None, "A captions file (.csv/.jsonl with a caption column, or .txt).")
  _OUT = flags.DEFINE_string("out", None, "tfds data dir to write to; the dataset goes to OUT/text_embeddings/1.0.0.")
  _BATCH = flags.DEFINE_integer("batch_size", 64, "Captions per encoder call.")
  _DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Storage dtype of the per-token states.")
  _SPLIT = flags.DEFINE_string("split", "train", "Latent cache split.")
  _OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing embeddings dataset at OUT.")
  flags.mark_flags_as_required(["config", "out"])


def run(config, out: str, *, workdir: str | None = None, caches=(), captions_file: str | None = None,
        batch_size: int = 64, dtype: str = "float32", split: str = "train", overwrite: bool = False,
        log=print) -> str:
  """Writes the embeddings of the captions of `caches` (plus those of `workdir`) and `captions_file`."""
  from sora_jax import configs_lib  # pylint: disable=g-import-not-at-top
  from sora_jax.data import text_embeddings  # pylint: disable=g-import-not-at-top
  from sora_jax.models import text_pretrained  # pylint: disable=g-import-not-at-top
  configs_lib.validate(config)
  if config.text.encoder not in text_pretrained.KINDS or config.text.get("trainable", False):
    raise ValueError(f"config.text.encoder={config.text.encoder!r}"
                     + (" (trainable)" if config.text.get("trainable", False) else "")
                     + f": precomputed embeddings need a frozen pretrained encoder, one of {text_pretrained.KINDS}")
  caches = list(caches)
  if workdir:
    from sora_jax.train import train_dit  # pylint: disable=g-import-not-at-top
    caches += [c.path for c in train_dit.latent_caches(config, workdir)[0]]
  if not caches and not captions_file:
    raise ValueError("nothing to encode: pass --workdir, --cache or --captions")

  def all_captions():
    for cache in caches:
      log(f"encode_text: reading captions of {cache}")
      yield from text_embeddings.cache_captions(cache, split)
    if captions_file:
      yield from text_embeddings.file_captions(captions_file)

  captions = text_embeddings.unique(all_captions())
  log(f"encode_text: {len(captions)} distinct captions (with the empty one) with {config.text.encoder}")
  path = text_embeddings.write(out, captions, config, caches=caches, split=split, batch_size=batch_size,
                               dtype=dtype, overwrite=overwrite, log=log)
  log(f"encode_text: wrote {path}\n  train with --config.text.precomputed={path}")
  return path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run(_CONFIG.value, _OUT.value, workdir=_WORKDIR.value, caches=_CACHE.value, captions_file=_CAPTIONS.value,
      batch_size=_BATCH.value, dtype=_DTYPE.value, split=_SPLIT.value, overwrite=_OVERWRITE.value)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
