"""A tiny captioned folder with one of each kind of bad input, for the data tests."""
import csv
import os

import numpy as np
from PIL import Image

from sora_jax.data import video_io

GOOD = ("a.mp4", "b.mp4", "c.mp4", "img.png")
BAD = ("truncated.mp4", "empty.mp4", "text.mp4", "short.mp4", "nocaption.mp4")


def video(frames: int, height: int = 24, width: int = 40, seed: int = 0) -> np.ndarray:
  """Frames whose first pixel encodes the frame number, so tests can tell which frames were read."""
  rng = np.random.default_rng(seed)
  v = np.repeat(rng.integers(0, 255, (1, height, width, 3), np.uint8), frames, 0)
  v[:, :4, :4] = (np.arange(frames) * 8)[:, None, None, None]
  return v


def make_folder(root: str, *, bad: bool = True, frames: int = 14) -> str:
  """Writes videos + captions.csv under root; returns root."""
  os.makedirs(root, exist_ok=True)
  rows = []
  for i, name in enumerate(GOOD[:3]):
    video_io.write_mp4(os.path.join(root, name), video(frames, seed=i))
    rows.append((name, f"clip number {i}"))
  Image.fromarray(video(1, 30, 30)[0]).save(os.path.join(root, "img.png"))
  rows.append(("img.png", "a still image"))
  if bad:
    video_io.write_mp4(os.path.join(root, "full.mp4"), video(frames, seed=9))
    data = open(os.path.join(root, "full.mp4"), "rb").read()
    os.remove(os.path.join(root, "full.mp4"))
    with open(os.path.join(root, "truncated.mp4"), "wb") as f:
      f.write(data[: len(data) // 3])
    open(os.path.join(root, "empty.mp4"), "wb").close()
    with open(os.path.join(root, "text.mp4"), "w") as f:
      f.write("this is not a video\n" * 20)
    video_io.write_mp4(os.path.join(root, "short.mp4"), video(2))
    video_io.write_mp4(os.path.join(root, "nocaption.mp4"), video(frames))
    rows += [("truncated.mp4", "cut short"), ("empty.mp4", "nothing"), ("text.mp4", "text"),
             ("short.mp4", "two frames"), ("nocaption.mp4", "")]
  with open(os.path.join(root, "captions.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["path", "caption"])
    w.writerows(rows)
  return root


def config(arg: str):
  """configs/folder_t2v.py with `arg` (e.g. 'runlocal,path=...')."""
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "folder_t2v.py")
  spec = importlib.util.spec_from_file_location("folder_t2v", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
