r"""Class-conditional image DiT at 256x256 (the DiT paper's ImageNet setting): latents 32x32x4, labels not text.

The model is the paper's DiT-{S,B,L,XL}/{2,4,8} (adaLN-Zero, label embedding with a null class for
classifier-free guidance, no cross-attention); our blocks add QK-norm and use RoPE instead of fixed sin-cos
position tables, which changes parameters by under 0.1%. Check sizes and FLOPs against the paper's table,
then train (images are 1-frame videos, so the VAE needs no temporal downsampling):

  python tools/count.py --config=configs/dit_image.py:variant=XL/2
  python -m sora_jax.main --config=configs/dit_image.py:variant=B/4 --workdir=/tmp/dit_b4 --mode=all

The class of a sample is column `text.class_column` of its packed `labels` table (ImageNet folders need
their class index written there); the embedded synthetic data uses its shape attribute. `:runlocal` shrinks
everything for a laptop (shape classes on 32x32 synthetic images).
"""
from configs import tiny_t2v
from sora_jax import configs_lib
from sora_jax.data import synthetic
from sora_jax.models import dit as dit_lib


def class_conditional(c, *, num_classes: int, class_column: int = 0, label_dropout: float = 0.1):
  """Switches a text-to-video config to class labels (shared with configs/dit_class_video.py)."""
  c.text.update(encoder="class", num_classes=num_classes, class_column=class_column, max_len=2, pool="mean",
                tokenizer="bytes", depth=0)
  c.dit.cross_attention = False
  c.train_dit.update(caption_dropout=label_dropout, text_seq_len=2 * c.train_dit.max_segments)
  c.sample.update(guidance=1.5)  # DiT-XL/2's FID 2.27 setting
  return c


def get_config(arg=None):
  arg = configs_lib.parse_arg(arg, variant="XL/2", res=256, num_classes=1000, runlocal=False)
  v = dit_lib.decode_variant(arg.variant)
  c = tiny_t2v.get_config("runlocal" if arg.runlocal else None)
  c.mode = "train_dit"
  r = arg.res
  c.data.update(sizes=[(1, r, r)], size_weights=[1.0], heldout_size=(1, r, r))
  # 8x spatial, no temporal compression, 4 latent channels: the SD VAE's latent shape.
  c.vae.update(channel_mults=(1, 2, 4, 4), temporal_downsample=(False, False, False), latent_channels=4,
               patch_size=1, spatial_downsample=None)
  c.train_vae.update(sizes=[(1, r, r)], size_weights=[1.0])
  tiny_t2v.use_standard_schedule(c)
  c.dit.update(width=v["width"], depth=v["depth"], num_heads=v["num_heads"], mlp_ratio=4.0,
               patch_size=(1, v["patch"], v["patch"]), qk_norm=True, rope_theta=10000.0)
  tokens = (r // 8 // v["patch"]) ** 2
  c.train_dit.update(batch_size=256, seq_len=tokens, max_segments=1, lr=1e-4, warmup_steps=0,
                     weight_decay=0.0, steps=400_000, ema_decay=0.9999)
  class_conditional(c, num_classes=arg.num_classes)
  if arg.runlocal:
    c.data.update(sizes=[(1, 32, 32)], heldout_size=(1, 32, 32))
    c.vae.update(channel_mults=(1, 2, 4), temporal_downsample=(False, False), patch_size=1, spatial_downsample=None)
    c.train_vae.update(sizes=[(1, 32, 32)], size_weights=[1.0])
    c.dit.update(width=48, depth=2, num_heads=2, patch_size=(1, 2, 2))
    c.train_dit.update(batch_size=2, seq_len=64, max_segments=4, steps=4, warmup_steps=1, ema_decay=0.999)
    class_conditional(c, num_classes=len(synthetic.SHAPES))
  return c
