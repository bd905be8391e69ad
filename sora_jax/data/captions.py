"""Caption rewriting (DALL-E 3 / Sora recipe): longer, detailed captions from a language or vision model.

Used by `tools/extend_prompts.py` (short prompt -> detailed caption) and `tools/recaption.py` (frames ->
caption). Both rewrite a caption file in place, as `sources.read_captions` reads it (CSV with `path` and
`caption` columns, or JSONL objects; generate's JSONL prompt files work too), and never lose the original:

  caption           the new caption (what training and generation read)
  caption_original  the caption before the first rewrite (kept on reruns; a rerun starts from it)
  caption_source    who wrote `caption`: the model name, or 'template'

Every other column or field is kept as it was. The file is rewritten atomically after each batch, so an
interrupted run keeps its finished rows, and a rerun skips rows that already have `caption_source` unless
asked to redo them.

Models are reached through any OpenAI-compatible `/v1/chat/completions` endpoint (`ChatClient`: bounded
retries with exponential backoff). Without an endpoint, captions of the embedded synthetic data are
expanded by a deterministic template from the attributes they name (`expand_synthetic`); other captions
are left unchanged.
"""
from __future__ import annotations

import base64
import concurrent.futures
import csv
import io
import json
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from sora_jax.data import synthetic
from sora_jax.data import video_io

ORIGINAL, SOURCE = "caption_original", "caption_source"
CAPTION_FILES = ("captions.csv", "captions.jsonl")


# ---------------------------------------------------------------------------------------------- caption files

def resolve(path: str) -> str:
  """A captions file, or the captions.csv/.jsonl of a folder (written from its .txt sidecars if it has none)."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isfile(path):
    if not path.endswith((".csv", ".jsonl")):
      raise ValueError(f"{path}: captions file must end in .csv or .jsonl")
    return path
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such captions file or folder")
  for name in CAPTION_FILES:
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  # Sidecar captions stay untouched; the rewritten ones go to a captions.jsonl the data source reads first.
  from sora_jax.data import sources  # pylint: disable=g-import-not-at-top  (grain is only needed here)
  records = sources.VideoFolder(path).records
  rows = [{"path": os.path.relpath(r["path"], path), "caption": r["caption"]} for r in records if not r["error"]]
  out = os.path.join(path, "captions.jsonl")
  write_rows(out, rows)
  return out


def read_rows(path: str) -> list[dict]:
  """All rows of a CSV (header with `caption`) or JSONL captions file, every column kept."""
  if path.endswith(".csv"):
    with open(path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      if not reader.fieldnames or "caption" not in reader.fieldnames:
        raise ValueError(f"{path}: CSV header must name a 'caption' column, got {reader.fieldnames}")
      return [dict(row) for row in reader]
  rows = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
      if not isinstance(row, dict):
        raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
      rows.append(row)
  return rows


def write_rows(path: str, rows: Sequence[dict]):
  """Writes rows atomically (temp file + rename): a crash never leaves a half-written captions file."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".captions-", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
      if path.endswith(".csv"):
        fields = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
      else:
        for row in rows:
          f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def original(row: dict) -> str:
  """The caption before any rewrite."""
  value = row.get(ORIGINAL) or row.get("caption") or ""
  return value if isinstance(value, str) else ""


def set_caption(row: dict, caption: str, source: str):
  if not row.get(ORIGINAL):  # first rewrite (a CSV row reads a missing value as "")
    row[ORIGINAL] = original(row)
  row["caption"], row[SOURCE] = caption, source


# ---------------------------------------------------------------------------------------------- template

_VERB_TO_MOTION = {"moving": "straight", "zigzagging": "zigzag"}
_SYNTHETIC = re.compile(
    rf"^a ({'|'.join(synthetic.SIZES)}) ({'|'.join(synthetic.COLORS)}) ({'|'.join(synthetic.SHAPES)}) "
    rf"({'|'.join(_VERB_TO_MOTION)}) ({'|'.join(synthetic.DIRECTIONS)}) "
    rf"on a ({'|'.join(synthetic.BACKGROUNDS)}) background$")

_SIZE = {"small": "small, about a quarter of the frame across", "large": "large, close to half the frame across"}
_SHAPE = {"circle": "disc with a smooth round edge", "square": "block with four equal sides and square corners",
          "triangle": "shape with three straight sides and sharp corners"}
_TOWARD = {"left": "toward the left edge of the frame", "right": "toward the right edge of the frame",
           "up": "toward the top of the frame", "down": "toward the bottom of the frame"}
_PATH = {"straight": ["in a steady straight line", "along a straight, even path"],
         "zigzag": ["in a zigzag that swings from side to side", "along a zigzag path of sharp turns"]}
_OPENINGS = ["A {size} {color} {shape} {verb} {direction} on a {background} background.",
             "On a plain {background} background, a {size} {color} {shape} is {verb} {direction}."]
_CLOSINGS = ["The camera does not move and the {background} background stays flat and empty for the whole clip.",
             "Nothing else is in view: a static camera, even lighting and a uniform {background} background."]


def parse_synthetic(caption: str) -> dict[str, str] | None:
  """Attributes of an embedded-data caption (`synthetic.caption`), or None for any other text."""
  m = _SYNTHETIC.match(caption.strip().lower())
  if m is None:
    return None
  size, color, shape, verb, direction, background = m.groups()
  return dict(shape=shape, color=color, size=size, direction=direction, motion=_VERB_TO_MOTION[verb],
              background=background)


def expand_synthetic(caption: str) -> str | None:
  """A detailed description of an embedded-data clip from its caption's attributes; None for other text.

  Deterministic: the phrasing variant is picked by a hash of the caption, so a caption always expands the
  same way while the dataset still sees varied sentences. Every attribute stays named verbatim.
  """
  attrs = parse_synthetic(caption)
  if attrs is None:
    return None
  pick = zlib.crc32(caption.strip().lower().encode())
  words = dict(attrs, verb="moving" if attrs["motion"] == "straight" else "zigzagging")
  opening = _OPENINGS[pick % 2].format(**words)
  body = (f"The {attrs['shape']} is a flat, solid {attrs['color']} {_SHAPE[attrs['shape']]}; it is "
          f"{_SIZE[attrs['size']]}, and travels {_PATH[attrs['motion']][(pick >> 1) % 2]} "
          f"{_TOWARD[attrs['direction']]}.")
  closing = _CLOSINGS[(pick >> 2) % 2].format(**words)
  return " ".join((opening, body, closing))


# ---------------------------------------------------------------------------------------------- endpoint

class ChatError(RuntimeError):
  """A request that failed for good (after retries, or one that retrying cannot fix)."""


class ChatClient:
  """POSTs to an OpenAI-compatible /v1/chat/completions; retries timeouts, 408/429/5xx and bad replies."""

  def __init__(self, url: str, model: str, *, api_key: str | None = None, timeout: float = 120.0,
               retries: int = 4, backoff: float = 1.0, max_backoff: float = 30.0, temperature: float = 0.0,
               max_tokens: int = 300, sleep: Callable[[float], None] = time.sleep):
    url = url.rstrip("/")
    self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
    self.model, self.api_key, self.timeout = model, api_key, timeout
    self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
    self.temperature, self.max_tokens, self.sleep = temperature, max_tokens, sleep

  def _post(self, messages) -> str:
    body = json.dumps(dict(model=self.model, messages=messages, temperature=self.temperature,
                           max_tokens=self.max_tokens)).encode()
    headers = {"Content-Type": "application/json"}
    if self.api_key:
      headers["Authorization"] = f"Bearer {self.api_key}"
    request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=self.timeout) as response:
      reply = json.loads(response.read().decode("utf-8"))
    text = reply["choices"][0]["message"]["content"]
    if not isinstance(text, str) or not text.strip():
      raise ValueError("empty reply")
    return " ".join(text.split())  # one line: CSV cells and JSONL stay readable

  def complete(self, messages: list[dict]) -> str:
    """The reply text; waits backoff * 2^k (capped) between at most `retries` + 1 attempts."""
    for attempt in range(self.retries + 1):
      try:
        return self._post(messages)
      except urllib.error.HTTPError as e:
        if e.code not in (408, 429) and e.code < 500:
          raise ChatError(f"{self.url}: HTTP {e.code} {e.reason}") from None
        error = f"HTTP {e.code}"
      except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
      except (ValueError, KeyError, IndexError, TypeError) as e:  # malformed JSON or reply shape
        error = f"bad reply ({type(e).__name__}: {e})"
      if attempt < self.retries:
        self.sleep(min(self.max_backoff, self.backoff * 2 ** attempt))
    raise ChatError(f"{self.url}: gave up after {self.retries + 1} attempts, last error {error}")


# ---------------------------------------------------------------------------------------------- messages

EXTEND_SYSTEM = (
    "You turn short prompts for a text-to-video model into one detailed caption. Keep every fact in the "
    "prompt (objects, counts, colours, sizes, motion, direction, background) and never contradict it; add "
    "concrete visual detail: appearance, how things move, camera and lighting. Reply with the caption alone, "
    "one paragraph of at most {words} words.")
RECAPTION_SYSTEM = (
    "You write training captions for a text-to-video model. You see frames sampled in order from one video. "
    "Describe what is visible and how it changes over time: subjects and their appearance, actions and "
    "directions of motion, background, camera motion, lighting and style. State only what the frames show. "
    "Reply with the caption alone, one paragraph of at most {words} words.")


def extend_messages(caption: str, words: int = 120) -> list[dict]:
  return [{"role": "system", "content": EXTEND_SYSTEM.format(words=words)},
          {"role": "user", "content": caption}]


def frames_as_data_urls(path: str, num_frames: int = 4, max_side: int = 512) -> list[str]:
  """`num_frames` evenly spaced frames of a video (or the image) as base64 JPEG data URLs."""
  if video_io.is_image(path):
    frames = video_io.read_image(path)
  else:
    info = video_io.probe(path)
    n = max(1, min(num_frames, info.num_frames))
    step = (info.num_frames - 1) / (n - 1) if n > 1 else 1.0
    frames = video_io.read_clip(path, start=0, num_frames=n, step=step, info=info)
  urls = []
  for frame in frames:
    image = Image.fromarray(np.asarray(frame, np.uint8))
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    urls.append("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"))
  return urls


def recaption_messages(frame_urls: Sequence[str], hint: str = "", words: int = 120) -> list[dict]:
  """OpenAI vision format: text then the frames as image_url parts; `hint` is the existing caption."""
  text = "Caption this video." + (f" Its current caption, which may be incomplete, is: {hint}" if hint else "")
  content = [{"type": "text", "text": text}]
  content += [{"type": "image_url", "image_url": {"url": u}} for u in frame_urls]
  return [{"role": "system", "content": RECAPTION_SYSTEM.format(words=words)},
          {"role": "user", "content": content}]


# ---------------------------------------------------------------------------------------------- driver

def define_flags():
  """The flags both caption tools share; returns their holders by name."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  return dict(
      captions=flags.DEFINE_string("captions", None, "Captions .csv/.jsonl, or a dataset folder.", required=True),
      url=flags.DEFINE_string("url", None, "OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1); "
                              "none: the deterministic template for embedded-data captions."),
      model=flags.DEFINE_string("model", None, "Model name sent to the endpoint."),
      api_key_env=flags.DEFINE_string("api_key_env", "OPENAI_API_KEY", "Environment variable with the API key "
                                      "(sent only when set)."),
      batch_size=flags.DEFINE_integer("batch_size", 16, "Rows between saves of the captions file."),
      workers=flags.DEFINE_integer("workers", 4, "Concurrent requests."),
      retries=flags.DEFINE_integer("retries", 4, "Retries per request (timeouts, 408, 429, 5xx, bad replies)."),
      backoff=flags.DEFINE_float("backoff", 1.0, "First retry wait in seconds; doubles, capped at 30."),
      timeout=flags.DEFINE_float("timeout", 120.0, "Seconds per request."),
      temperature=flags.DEFINE_float("temperature", 0.0, "Sampling temperature."),
      max_tokens=flags.DEFINE_integer("max_tokens", 300, "Reply length limit in tokens."),
      words=flags.DEFINE_integer("words", 120, "Caption length asked for, in words."),
      redo=flags.DEFINE_bool("redo", False, "Rewrite rows already rewritten (from caption_original)."),
      limit=flags.DEFINE_integer("limit", None, "Rewrite at most this many rows."),
  )


def client_from(f) -> ChatClient | None:
  """A ChatClient from the shared flags, or None without --url."""
  if not f["url"].value:
    return None
  if not f["model"].value:
    raise ValueError("--model: required with --url")
  return ChatClient(f["url"].value, f["model"].value, api_key=os.environ.get(f["api_key_env"].value) or None,
                    timeout=f["timeout"].value, retries=f["retries"].value, backoff=f["backoff"].value,
                    temperature=f["temperature"].value, max_tokens=f["max_tokens"].value)


def run(f, make_caption) -> dict:
  """`rewrite` with the shared flags; prints the counts as the last line (JSON)."""
  counts = rewrite(f["captions"].value, make_caption, redo=f["redo"].value, batch_size=f["batch_size"].value,
                   workers=f["workers"].value, limit=f["limit"].value)
  print(json.dumps(counts))
  return counts

def rewrite(path: str, make_caption: Callable[[dict], tuple[str | None, str]], *, redo: bool = False,
            batch_size: int = 16, workers: int = 4, limit: int | None = None,
            log: Callable[[str], None] = print) -> dict:
  """Rewrites the captions of `path` in place with `make_caption(row) -> (caption or None, source)`.

  Rows run `workers` at a time; the file is saved after every `batch_size` rows. A row whose caption is
  None (template does not apply) or whose request fails keeps its caption. Returns counts.
  """
  path = resolve(path)
  rows = read_rows(path)
  todo = [i for i, row in enumerate(rows) if redo or not row.get(SOURCE)]
  todo = todo[:limit] if limit is not None else todo
  counts = dict(rows=len(rows), done=0, unchanged=0, failed=0, skipped=len(rows) - len(todo))
  errors = []
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    for start in range(0, len(todo), batch_size):
      batch = todo[start:start + batch_size]
      futures = {pool.submit(make_caption, rows[i]): i for i in batch}
      for future in concurrent.futures.as_completed(futures):
        i = futures[future]
        try:
          caption, source = future.result()
        except Exception as e:  # pylint: disable=broad-except  (one bad row or clip must not stop the run)
          counts["failed"] += 1
          errors.append(f"row {i + 1}: {e}")
          continue
        if caption is None:
          counts["unchanged"] += 1
        else:
          set_caption(rows[i], caption, source)
          counts["done"] += 1
      write_rows(path, rows)
      log(f"{path}: {min(start + batch_size, len(todo))}/{len(todo)} rows")
  for e in errors[:10]:
    log(f"failed {e}")
  return dict(counts, file=path)
