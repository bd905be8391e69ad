r"""Class-conditional video DiT for UCF-101-style benchmarks (101 classes, 17 frames at 256x256).

Latte and other UCF-101 baselines use 16 frames; the causal VAE takes 1 + 4k frames, so clips are 17 frames
(5 latent frames of 32x32x4, patch 1x2x2: 1,280 tokens). Labels, not text, condition the model (see
`configs/dit_image.py`); a sample's class is column `text.class_column` of its packed `labels` table.
Quality is judged by FVD (`--mode=eval`, I3D features of 16-frame clips). Count, then train:

  python tools/count.py --config=configs/dit_class_video.py:variant=XL/2
  python -m sora_jax.main --config=configs/dit_class_video.py:variant=B/2 --workdir=/tmp/ucf_b2 --mode=all

`:runlocal` trains on the embedded synthetic clips with their shape as the class.
"""
from configs import dit_image
from configs import tiny_t2v
from sora_jax import configs_lib
from sora_jax.data import synthetic
from sora_jax.models import dit as dit_lib


def get_config(arg=None):
  arg = configs_lib.parse_arg(arg, variant="XL/2", res=256, frames=17, num_classes=101, runlocal=False)
  v = dit_lib.decode_variant(arg.variant)
  c = tiny_t2v.get_config("runlocal" if arg.runlocal else None)
  c.mode = "all"
  size = (arg.frames, arg.res, arg.res)
  c.data.update(sizes=[size], size_weights=[1.0], heldout_size=size)
  # 4x8x8 compression to 4 channels (Open-Sora 1.2's shape).
  c.vae.update(channel_mults=(1, 2, 4, 4), temporal_downsample=(True, True, False), latent_channels=4,
               patch_size=1, spatial_downsample=None)
  c.train_vae.update(sizes=[size, (1, arg.res, arg.res)], size_weights=[0.8, 0.2])
  tiny_t2v.use_standard_schedule(c)
  c.dit.update(width=v["width"], depth=v["depth"], num_heads=v["num_heads"], mlp_ratio=4.0,
               patch_size=(1, v["patch"], v["patch"]), qk_norm=True, rope_theta=10000.0)
  tokens = (1 + (arg.frames - 1) // 4) * (arg.res // 8 // v["patch"]) ** 2
  c.train_dit.update(batch_size=32, seq_len=tokens, max_segments=1, lr=1e-4, warmup_steps=1000,
                     steps=200_000, ema_decay=0.9999)
  dit_image.class_conditional(c, num_classes=arg.num_classes)
  c.sample.guidance = 4.0
  if arg.runlocal:
    c.data.update(sizes=[(9, 32, 32)], heldout_size=(9, 32, 32))
    c.vae.update(channel_mults=(1, 2, 4), temporal_downsample=(True, True), patch_size=1, spatial_downsample=None)
    c.train_vae.update(sizes=[(9, 32, 32), (1, 32, 32)], size_weights=[0.8, 0.2])
    c.dit.update(width=48, depth=2, num_heads=2, patch_size=(1, 2, 2))
    c.train_dit.update(batch_size=2, seq_len=3 * 16, max_segments=4, steps=4, warmup_steps=1, ema_decay=0.999)
    dit_image.class_conditional(c, num_classes=len(synthetic.SHAPES))
  return c
