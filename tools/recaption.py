r"""Re-captions a video dataset with a vision-language model that sees a few frames of each clip.

  python tools/recaption.py --captions=data/ --url=http://127.0.0.1:8000/v1 --model=NAME [--frames=4]
  python tools/recaption.py --captions=data/captions.csv            # no --url: embedded-data template

Each row's video (`path`, relative to the captions file) is sampled at --frames evenly spaced frames, sent
as base64 JPEGs in the OpenAI vision message format (`image_url` parts) with the current caption as a hint,
and the reply becomes `caption`; the original stays in `caption_original` and `caption_source` names the
model (see `sora_jax/data/captions.py`). A folder with only .txt sidecars gets a captions.jsonl (which the
data source then reads first); the sidecars are not touched. Without --url, captions of the embedded
synthetic data are re-described from their attributes by the deterministic template. Last line: counts.
"""
from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sora_jax.data import captions  # noqa: E402  pylint: disable=g-import-not-at-top

FLAGS = captions.define_flags()
_FRAMES = flags.DEFINE_integer("frames", 4, "Frames sent per clip, evenly spaced.")
_MAX_SIDE = flags.DEFINE_integer("max_side", 512, "Longest side of a sent frame, in pixels.")
_HINT = flags.DEFINE_bool("hint", True, "Send the current caption along with the frames.")


def main(argv):
  del argv
  client, words = captions.client_from(FLAGS), FLAGS["words"].value
  root = os.path.dirname(captions.resolve(FLAGS["captions"].value))

  def recaption(row):
    text = captions.original(row)
    if client is None:
      return captions.expand_synthetic(text), "template"
    if not isinstance(row.get("path"), str) or not row["path"].strip():
      raise ValueError("no 'path' to read frames from")
    urls = captions.frames_as_data_urls(os.path.join(root, row["path"].strip()), _FRAMES.value, _MAX_SIDE.value)
    return client.complete(captions.recaption_messages(urls, text if _HINT.value else "", words)), client.model

  counts = captions.run(FLAGS, recaption)
  return 1 if counts["failed"] else 0


if __name__ == "__main__":
  app.run(main)
