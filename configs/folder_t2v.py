r"""Text-to-video on your own folder of captioned videos and images: packed variable-size DiT + causal VAE.

The folder holds videos (.mp4, .mov, .webm, ...) and images (.jpg, .png, ...) with captions in
`captions.csv` (columns path, caption) or `captions.jsonl` ({"path": ..., "caption": ...} per line), or in a
`<name>.txt` next to each file. Bad files are skipped, counted and named once in a warning.

  CFG=configs/folder_t2v.py:path=$HOME/my_videos
  python -m sora_jax.main --config=$CFG --workdir=/tmp/my_t2v --mode=train_vae
  python -m sora_jax.main --config=$CFG --workdir=/tmp/my_t2v --mode=encode
  python -m sora_jax.main --config=$CFG --workdir=/tmp/my_t2v --mode=train_dit
  python -m sora_jax.main --config=$CFG --workdir=/tmp/my_t2v --mode=sample --prompts=prompts.jsonl

From a tfds dataset instead (built once with
`python -m sora_jax.data.tfds_builders.build --folder=$HOME/my_videos --data_dir=$HOME/tfds`), use
`configs/folder_t2v.py:tfds=$HOME/tfds/video_folder/data/1.0.0`. Add `runlocal` for a one-minute smoke run.
Other args: res (bucket base size), frames (1 + 4k), stride (frame stride), fps (target fps, 0: use the
stride), clips (clips encoded per video), workers (grain processes), vae_steps, dit_steps, width, depth.
"""
import importlib.util
import os

from sora_jax import configs_lib


def _tiny_config(arg):
  # The model defaults are tiny_t2v's, with the text path for real captions (cross-attention to every
  # caption token) and the standard schedule (the demo's is tuned to its synthetic clips); this file
  # otherwise only swaps the data side.
  spec = importlib.util.spec_from_file_location("tiny_t2v", os.path.join(os.path.dirname(__file__), "tiny_t2v.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.use_standard_schedule(module.use_cross_attention(module.get_config(arg)))


def get_config(arg=None):
  arg = configs_lib.parse_arg(
      arg, path="", tfds="", runlocal=False, res=32, frames=9, stride=1, fps=0.0, clips=1, workers=2,
      vae_steps=2000, dit_steps=5000, width=192, depth=6)
  c = _tiny_config(f"runlocal={arg.runlocal},vae_steps={arg.vae_steps},dit_steps={arg.dit_steps},"
                   f"width={arg.width},depth={arg.depth},res={arg.res}")
  r, t = arg.res, arg.frames
  c.mode = "train_dit"
  c.data = dict(
      source="tfds" if arg.tfds else "folder",
      path=arg.tfds or arg.path,
      # Size buckets (frames, height, width): each clip takes the longest it has frames for, then the
      # closest aspect ratio; images take the 1-frame buckets. All divide by VAE stride 4 x patch 2.
      sizes=[(t, r, r), (t, r, r + r // 2), (t, r + r // 2, r), (t, r, 2 * r),
             (1, r, r), (1, r, r + r // 2), (1, r + r // 2, r)],
      size_weights=[1.0] * 7,  # unused for files: the data decides the mix
      size_policy="buckets",
      clip_sampling="random",  # random | start | center
      crop="center",  # center | random (a random window per clip, its side a fraction in crop_scale)
      crop_scale=(0.1, 1.0),
      frame_stride=arg.stride,
      fps=arg.fps,
      max_skip_fraction=0.1,
      num_workers=arg.workers,
      heldout_size=(t, r, r),
  )
  c.train_vae.update(sizes=[(t, r, r), (1, r, r)], size_weights=[0.8, 0.2])
  c.encode.update(clips_per_video=arg.clips)
  # A row holds at least two clips of the largest bucket (VAE stride 4x4x4, patch 1x2x2).
  largest = (1 + (t - 1) // 4) * (r // 8) * (2 * r // 8)
  c.train_dit.seq_len = max(128 if arg.runlocal else 256, -(-2 * largest // 128) * 128)
  if arg.runlocal:
    c.data.num_workers = 0
  return c
