"""Video files: mp4 writing through PyAV (which ships FFmpeg), GIF grids, and uint8 conversion."""
from __future__ import annotations

import math
from typing import Sequence

import av
import numpy as np
from PIL import Image


def to_uint8(video) -> np.ndarray:
  """float in [-1, 1] or uint8 -> uint8 [..., 3]."""
  video = np.asarray(video)
  if video.dtype == np.uint8:
    return video
  return np.clip(np.round((video.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_float(video) -> np.ndarray:
  """uint8 -> float32 in [-1, 1]."""
  return np.asarray(video, np.float32) / 127.5 - 1.0


def write_mp4(path: str, video, fps: int = 8, upscale: int = 1):
  """Writes uint8/float [T, H, W, 3] as H.264 mp4 (even sizes are enforced by edge padding)."""
  frames = to_uint8(video)
  if upscale > 1:
    frames = frames.repeat(upscale, axis=1).repeat(upscale, axis=2)
  t, h, w, _ = frames.shape
  ph, pw = h % 2, w % 2
  if ph or pw:
    frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
  with av.open(path, mode="w") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": "18"}
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def read_video(path: str, max_frames: int | None = None) -> np.ndarray:
  """Decodes a video file to uint8 [T, H, W, 3]."""
  frames = []
  with av.open(path) as container:
    for frame in container.decode(video=0):
      frames.append(frame.to_ndarray(format="rgb24"))
      if max_frames and len(frames) >= max_frames:
        break
  if not frames:
    raise ValueError(f"{path}: no video frames decoded")
  return np.stack(frames)


def write_gif_grid(path: str, videos: Sequence, fps: int = 8, columns: int | None = None, upscale: int = 2):
  """Tiles videos of any sizes into one animated GIF (each cell padded to the largest size)."""
  videos = [to_uint8(v) for v in videos]
  t = max(v.shape[0] for v in videos)
  h = max(v.shape[1] for v in videos) + 2
  w = max(v.shape[2] for v in videos) + 2
  n = len(videos)
  cols = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  canvas = np.full((t, rows * h, cols * w, 3), 255, np.uint8)
  for i, v in enumerate(videos):
    r, c = divmod(i, cols)
    idx = np.minimum(np.arange(t), v.shape[0] - 1)  # hold the last frame of shorter clips (and images)
    canvas[:, r * h + 1:r * h + 1 + v.shape[1], c * w + 1:c * w + 1 + v.shape[2]] = v[idx]
  if upscale > 1:
    canvas = canvas.repeat(upscale, axis=1).repeat(upscale, axis=2)
  images = [Image.fromarray(f) for f in canvas]
  images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
