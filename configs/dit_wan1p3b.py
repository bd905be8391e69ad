r"""Wan2.1-1.3B's DiT (width 1536, 30 layers, 12 heads, MLP 8960) at 480x832 x 81 frames, one clip per chip.

32,760 video tokens per clip (4x8x8 VAE with 16 latent channels -> 21x60x104 latents, patch 1x2x2), 512 text
tokens of width 4096 (the width of Wan's umT5 features; the text encoder here is only the embedding, as a
stand-in for precomputed features), bf16 compute with fp32 master weights, scanned layers rematerialised
except for the attention outputs (`dit.remat=save_attention`), FSDP over every chip, splash attention with
its fused backward kernel (`attention=splash_fused`, TPU only; `:attention=cudnn` on GPUs). At 720p: full
remat and `attention=auto`. Check it fits before spending pod time, then launch:

  python tools/aot_compile.py --config=configs/dit_wan1p3b.py:chips=32 --topology=v5p-64
  python -m sora_jax.main --config=configs/dit_wan1p3b.py:chips=32 --workdir=gs://BUCKET/wan1p3b \
      --mode=train_dit

Parameter-matched to Wan2.1-1.3B: one modulation projection shared by all blocks plus a [6, D] table per
block (`dit.shared_modulation`), text features projected to width 1536 once (`dit.text_proj`), head dim 128
with 3D RoPE pairs split 22/21/21 over (t, h, w). 1.430e9 DiT parameters against diffusers'
`WanTransformer3DModel` at the same settings, 1.419e9 (the 0.8% is the pooled-text projection and the final
layer's modulation projection, which Wan has as a fixed table); tests/models/dit_test.py pins it.
`--config.dit.shared_modulation=False --config.dit.text_proj=False` gives per-block adaLN-Zero and per-block
text keys/values from 4096 (2.07e9 parameters, the same step FLOPs up to 0.1%).

Variants: `:res=720p` (1280x720 x 81 frames, 75,600 tokens), `:width=2048,depth=32,heads=16`, `:remat=dots`.
"""
from configs import tiny_t2v
from sora_jax import configs_lib

# (frames, height, width) of each named resolution at 16 fps, 5 s.
RESOLUTIONS = {"480p": (81, 480, 832), "720p": (81, 720, 1280)}


def get_config(arg=None):
  arg = configs_lib.parse_arg(arg, runlocal=False, chips=4, res="480p", width=1536, depth=30, heads=12,
                              mlp=8960, remat="", attention="")
  # At 480p the attention outputs are kept through remat and splash's backward is one fused kernel: the
  # fastest step the compiler estimates, at 47 of 95 GiB a chip. At 720p both cost memory the largest DiT
  # needs (experiments/scaling/README.md), so full remat and the two-kernel backward.
  remat = arg.remat or ("save_attention" if arg.res == "480p" else "full")
  attention = arg.attention or ("splash_fused" if arg.res == "480p" else "auto")
  c = tiny_t2v.get_config("runlocal" if arg.runlocal else None)
  c.mode = "train_dit"
  c.mesh = [("data", 1), ("fsdp", -1), ("context", 1), ("tensor", 1)]
  c.attention = attention
  size = RESOLUTIONS[arg.res]
  c.data.update(sizes=[size], size_weights=[1.0], heldout_size=size)
  c.vae.update(channel_mults=(1, 2, 4, 4), temporal_downsample=(True, True, False), latent_channels=16,
               patch_size=1, spatial_downsample=None)
  tiny_t2v.use_cross_attention(c)
  tiny_t2v.use_standard_schedule(c)
  c.text.update(width=4096, depth=0, num_heads=32, max_len=512)
  c.dit.update(width=arg.width, depth=arg.depth, num_heads=arg.heads, mlp_ratio=arg.mlp / arg.width,
               patch_size=(1, 2, 2), scan_layers=True, remat=remat, dtype="bfloat16", qk_norm=True,
               rope_theta=10000.0, shared_modulation=True, text_proj=True)
  t, h, w = size
  tokens = (1 + (t - 1) // 4) * (h // 16) * (w // 16)
  c.train_dit.update(batch_size=arg.chips, seq_len=tokens, text_seq_len=512, max_segments=1, lr=1e-4,
                     warmup_steps=1000, steps=100_000)
  if arg.runlocal:  # shapes of the real thing, sizes of a laptop
    c.attention = arg.attention or "auto"
    c.data.update(sizes=[(9, 64, 64)], heldout_size=(9, 64, 64))
    c.text.update(width=64, num_heads=2, max_len=32)
    c.dit.update(width=48, depth=2, num_heads=2, mlp_ratio=4.0, dtype="float32")
    c.train_dit.update(batch_size=2, seq_len=3 * 4 * 4, text_seq_len=32, steps=4, warmup_steps=1)
  return c
