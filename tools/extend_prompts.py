r"""Extends short captions or prompts into detailed ones with a language model (Sora / DALL-E 3 recipe).

  python tools/extend_prompts.py --captions=data/captions.jsonl --url=http://127.0.0.1:8000/v1 --model=NAME
  python tools/extend_prompts.py --captions=prompts.jsonl            # no --url: embedded-data template

`--captions` is a dataset's captions .csv/.jsonl (or its folder), or a generate prompts .jsonl. Each row's
`caption` becomes the extended text; the original stays in `caption_original` and `caption_source` names
the model (or 'template'); see `sora_jax/data/captions.py`. Any OpenAI-compatible endpoint works (vLLM,
llama.cpp server, Ollama, ...); the key is read from the variable named by --api_key_env. Rows that fail
after the bounded retries keep their caption, and a rerun picks them up. Last line: the counts as JSON.
"""
from __future__ import annotations

import os
import sys

from absl import app

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sora_jax.data import captions  # noqa: E402  pylint: disable=g-import-not-at-top

FLAGS = captions.define_flags()


def main(argv):
  del argv
  client, words = captions.client_from(FLAGS), FLAGS["words"].value

  def extend(row):
    text = captions.original(row)
    if client is None:
      return captions.expand_synthetic(text), "template"
    return client.complete(captions.extend_messages(text, words)), client.model

  counts = captions.run(FLAGS, extend)
  return 1 if counts["failed"] else 0


if __name__ == "__main__":
  app.run(main)
