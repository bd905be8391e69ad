"""Video files: mp4 writing and clip reading through PyAV (which ships FFmpeg), GIF grids, uint8 conversion.

`probe` reads a container's header only; `read_clip` seeks to the first wanted frame and decodes just the
span it needs, resizing inside FFmpeg (swscale) so full-resolution frames never reach numpy.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Sequence, Union

import av
import numpy as np
from PIL import Image

VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".gif")
# What reading an unreadable or unsupported file raises: Pillow's OSError, PyAV's FFmpegError family (some
# of them ValueErrors or OSErrors too), and the ValueError of a file without video frames.
DECODE_ERRORS = (OSError, ValueError, av.error.FFmpegError)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# A file path or the file's bytes (tfds datasets store mp4 bytes).
Media = Union[str, bytes]


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


def is_image(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_video(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def _open(src: Media):
  return av.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  num_frames: int
  fps: float
  height: int
  width: int


def probe(src: Media) -> VideoInfo:
  """Frame count, frame rate and size from the container header (nothing is decoded)."""
  with _open(src) as container:
    if not container.streams.video:
      raise ValueError("no video stream")
    s = container.streams.video[0]
    fps = float(s.average_rate or s.guessed_rate or 0) or 25.0
    n = s.frames
    if not n and s.duration and s.time_base:  # some containers leave the frame count out
      n = int(round(float(s.duration * s.time_base) * fps))
    if not n and container.duration:
      n = int(round(container.duration / av.time_base * fps))
    return VideoInfo(int(n), fps, s.codec_context.height, s.codec_context.width)


def cover_size(height: int, width: int, out_h: int, out_w: int) -> tuple[int, int]:
  """Smallest (h, w) with the aspect ratio of (height, width) that covers (out_h, out_w)."""
  scale = max(out_h / height, out_w / width)
  return max(out_h, round(height * scale)), max(out_w, round(width * scale))


def center_crop(frames: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """frames [..., H, W, 3] -> [..., out_h, out_w, 3], centered."""
  h, w = frames.shape[-3:-1]
  top, left = (h - out_h) // 2, (w - out_w) // 2
  return frames[..., top:top + out_h, left:left + out_w, :]


def resize_crop(frames: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """uint8 [T, H, W, 3] -> [T, out_h, out_w, 3]: resize keeping the aspect ratio, then center crop."""
  rh, rw = cover_size(frames.shape[1], frames.shape[2], out_h, out_w)
  if (rh, rw) != frames.shape[1:3]:
    frames = np.stack([np.asarray(Image.fromarray(f).resize((rw, rh), Image.BILINEAR)) for f in frames])
  return np.ascontiguousarray(center_crop(frames, out_h, out_w))


def random_crop(frames: np.ndarray, out_h: int, out_w: int, scale: tuple[float, float],
                rng: np.random.Generator) -> np.ndarray:
  """uint8 [T, H, W, 3] -> [T, out_h, out_w, 3]: one random window for all frames, resized to the output.

  The window has the output's aspect ratio; its side is a fraction of the largest such window that fits,
  drawn log-uniformly from `scale = (lo, hi)` (0 < lo <= hi <= 1) but never below the output size, so crops
  range from near-native detail to the whole (cover-cropped) frame and nothing is upsampled when the
  source is large enough. The position is uniform.
  """
  h, w = frames.shape[1:3]
  fit = min(h / out_h, w / out_w)  # largest window: (out_h, out_w) * fit
  lo = min(1.0, max(float(scale[0]), 1.0 / fit))
  hi = min(1.0, max(float(scale[1]), lo))
  side = fit * float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
  ch, cw = min(h, max(1, round(out_h * side))), min(w, max(1, round(out_w * side)))
  top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
  window = frames[:, top:top + ch, left:left + cw]
  if (ch, cw) != (out_h, out_w):
    window = np.stack([np.asarray(Image.fromarray(f).resize((out_w, out_h), Image.BILINEAR)) for f in window])
  return np.ascontiguousarray(window)


def read_image(src: Media) -> np.ndarray:
  """Decodes an image file to uint8 [1, H, W, 3] (an image is a 1-frame video)."""
  with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as im:
    return np.asarray(im.convert("RGB"))[None]


def read_clip(src: Media, *, start: int, num_frames: int, step: float = 1.0,
              size: tuple[int, int] | None = None, info: VideoInfo | None = None) -> np.ndarray:
  """Decodes source frames start + round(k * step), k < num_frames, to uint8 [num_frames, h, w, 3].

  Seeks to the keyframe before `start` instead of decoding from the beginning. With `size=(h, w)` each kept
  frame is resized in FFmpeg to cover (h, w) with its aspect ratio and center cropped. Raises ValueError when
  the stream ends (or breaks) before the last wanted frame.
  """
  info = info or probe(src)
  wanted = [start + int(round(k * step)) for k in range(num_frames)]
  reformat = {}
  if size is not None:
    rh, rw = cover_size(info.height, info.width, *size)
    reformat = {"height": rh, "width": rw}
  frames = []
  with _open(src) as container:
    stream = container.streams.video[0]
    t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    if start > 0:
      # backward=True lands on the keyframe at or before the target; frames before `start` are dropped.
      container.seek(int((t0 + start / info.fps) / stream.time_base), stream=stream, backward=True)
    k = 0
    for frame in container.decode(stream):
      index = int(round((frame.time - t0) * info.fps)) if frame.time is not None else wanted[k]
      if index < wanted[k]:
        continue
      array = None
      while k < num_frames and wanted[k] <= index:  # a frame is repeated when step < 1 (fps upsampling)
        if array is None:
          array = frame.to_ndarray(format="rgb24", **reformat)
        frames.append(array)
        k += 1
      if k == num_frames:
        break
  if len(frames) < num_frames:
    raise ValueError(f"stream ended after {len(frames)} of {num_frames} frames "
                     f"(wanted source frames {wanted[0]}..{wanted[-1]} of {info.num_frames})")
  clip = np.stack(frames)
  return np.ascontiguousarray(center_crop(clip, *size)) if size is not None else clip

