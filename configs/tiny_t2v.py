r"""Tiny text-to-video on the embedded synthetic data: the default config and the demo.

Trains the causal video VAE, encodes a latent cache, trains the packed DiT, samples held-out prompts and
scores them:

  python -m sora_jax.main --config=configs/tiny_t2v.py --workdir=/tmp/sora_jax_demo --mode=all

Variants go in the arg string, e.g. `configs/tiny_t2v.py:runlocal` (a one-minute smoke run used by the
tests) or `configs/tiny_t2v.py:dit_steps=4000,width=256`. Any field can be overridden with
`--config.a.b=value`.
"""
from sora_jax import configs_lib


def get_config(arg=None):
  arg = configs_lib.parse_arg(
      arg, runlocal=False, variable=True, vae_steps=300, dit_steps=2000, width=144, depth=6,
      encode_samples=2000, res=32)
  c = configs_lib.ml_collections.ConfigDict()
  c.mode = "all"
  c.seed = 0
  c.mesh = [("data", -1), ("fsdp", 1), ("context", 1), ("tensor", 1)]
  c.attention = "auto"  # auto | xla | blockwise | cudnn | splash
  c.compilation_cache = "~/.cache/sora_jax/jax_cache"  # '' disables JAX's persistent compile cache

  r = arg.res
  c.data = dict(
      source="synthetic",
      # (frames, height, width) choices per sample; frames are 1 + 2k for the 2x temporal VAE.
      sizes=[(9, r, r), (9, r, r + r // 2), (9, r + r // 2, r), (1, r, r)] if arg.variable else [(9, r, r)],
      size_weights=[0.4, 0.2, 0.2, 0.2] if arg.variable else [1.0],
      num_workers=0,
      heldout_size=(9, r, r),
      # Share of training clips whose shape leaves the frame (held-out clips always stay in frame). Off: at 0.1
      # the caption stops steering direction within 2,000 DiT steps, and extension past the end of a travel is
      # no better at 4,000 (experiments/sampling/README.md).
      exit_fraction=0.0,
      # How far past the edge an exiting shape's travel may end, as a fraction of the travel (0: at most half
      # a shape, so it leaves in the last frame; 1: anywhere in the clip). Such clips are tagged "exits".
      exit_depth=0.0,
      # Share of training clips whose shape enters the frame across its start edge (the time mirror of an
      # exit; tagged "enters"). Off (experiments/sampling/README.md).
      enter_fraction=0.0,
  )
  # 2x2 pixel patchify + one 2x downsampling level: 4x space, 2x time (9 frames -> 5 latent frames), 16
  # latent channels. Patchifying first keeps most convolutions at 16x16, 3.4x cheaper per step on CPU.
  # Time is mixed only where it is resampled (temporal_kernel=1) and no norm precedes the heads: with the
  # big-VAE defaults this small VAE stalls near background-only PSNR (experiments/tiny_t2v/README.md).
  c.vae = dict(
      base_channels=24,
      channel_mults=(1, 2, 4),
      num_res_blocks=1,
      patch_size=2,
      spatial_downsample=(True, False),
      temporal_downsample=(True, False),
      latent_channels=16,
      mid_attention=False,
      temporal_kernel=1,
      head_norm=False,
      # Weights and activations of the VAE when it encodes and decodes (encode, sample, eval; training is
      # float32): "bfloat16" halves their memory.
      inference_dtype="float32",
  )
  c.train_vae = dict(
      steps=arg.vae_steps, batch_size=8, lr=1e-3, warmup_steps=30, weight_decay=0.0, grad_clip=1.0,
      kl_weight=1e-6, l2_weight=1.0, lpips_weight=0.0, disc_weight=0.0, disc_start=0, disc_channels=64,
      disc_layers=3, sizes=[(9, r, r), (1, r, r)], size_weights=[0.8, 0.2],
      log_every=50, ckpt_every=500, keep=2)
  # clips_per_video: clips cut from each file of a folder/tfds source. chunk: latent frames per chunk of the
  # VAE's causal pass (0: the whole clip at once); tile / tile_overlap: spatial tiles in pixels (0: whole
  # frames). cpu_settings: a process that only encodes runs XLA's own convolutions and a fixed glibc mmap
  # threshold (sora_jax/runtime.py: faster VAE passes on CPU, peak memory flat in frames).
  c.encode = dict(num_samples=arg.encode_samples, batch_size=32, clips_per_video=1, chunk=0, tile=0,
                  tile_overlap=0, cpu_settings=True)
  # precomputed: text embeddings from tools/encode_text.py (frozen pretrained encoders only), '' = live.
  # The caption reaches the DiT as the sum of its word embeddings, added to the timestep embedding (adaLN),
  # with no cross-attention: on this data that is the text path from which the DiT learns to follow a
  # direction (experiments/tiny_t2v/README.md, run AF); with cross-attention it learns none.
  # `use_cross_attention(c)` switches to per-token cross-attention for long, real captions.
  c.text = dict(encoder="trainable", tokenizer="words", max_len=16, width=128, depth=2, num_heads=4,
                pool="words_sum", precomputed="")
  # Head dim 36 on a 5x4x4 token grid: with QK-norm (logits bounded by sqrt(36) = 6) and RoPE base 10^4 (two
  # of six frequencies per axis turn noticeably over 4-5 positions) attention cannot become position-selective
  # in the demo's steps; no QK-norm and base 100 learn faster (experiments/tiny_t2v/README.md).
  # abs_pos: each token also knows where it is in its clip, so "moving left" can become "on the right early,
  # on the left late" directly (RoPE alone only tells attention how far apart two tokens are). 'fractional'
  # gives that position as a fraction of the clip's extent, the same for every clip size of the mix: direction
  # on held-out prompts 0.55 against 0.35 with per-axis token indices (run D21).
  # scan_unroll: the stacked blocks run as one unrolled scan. XLA:CPU runs the layers' matmuls and their
  # backward 10-17% faster outside a while loop (experiments/scaling/README.md); pods keep 1 for compile time.
  c.dit = dict(
      width=arg.width, depth=arg.depth, num_heads=4, mlp_ratio=4.0, patch_size=(1, 2, 2), qk_norm=False,
      scan_layers=True, scan_unroll=arg.depth, remat="none", rope_theta=100.0, gate_init=0.0, abs_pos=True,
      abs_pos_kind="fractional", temporal_attention=False, position_modulation=False, cross_attention=False,
      cond_flag=False)
  c.flow = dict(
      t_sampling="logit_normal", logit_mean=0.0, logit_std=1.0,
      # Larger grids get more noise: shift = sqrt(tokens / shift_base_tokens), clipped to [1, max_shift].
      # Base 9 tokens: the demo's 80-token clips train at shift 3, more time at the high noise where a
      # clip's layout (and so its direction) is decided (experiments/tiny_t2v/README.md, run K).
      resolution_shift=True, shift_base_tokens=9, max_shift=4.0)
  # One reference: cond.start_step below follows --config.train_dit.steps overrides.
  dit_steps = configs_lib.ml_collections.FieldReference(arg.dit_steps)
  c.train_dit = dict(
      steps=dit_steps, batch_size=4, seq_len=320, text_seq_len=128, max_segments=8,
      lr=2e-3, warmup_steps=200, weight_decay=0.01, grad_clip=1.0, ema_decay=0.999,
      caption_dropout=0.1, token_drop_rate=0.0, eval_every=0, log_every=50, ckpt_every=1000, keep=2, num_packing_bins=16)
  # Frame conditioning in training (image-to-video, extension, connecting): a mask strategy per segment.
  # start_step: DiT steps trained without frame conditioning first (0: conditioned from the start). Given
  # frames from the start keep the caption from steering direction (0.19-0.30 of held-out prompts, chance
  # 0.25); from halfway of 2,000 steps it is followed on 0.35 and 0.375 (two seeds), and image-to-video
  # continues the given clip's direction more often (experiments/tiny_t2v/README.md, runs D9-D19).
  c.cond = dict(mask_ratios=dict(none=0.5, first=0.1, last=0.05, first_last=0.05, prefix=0.15, suffix=0.05,
                                 random=0.1), start_step=dit_steps // 2,
                # {tag: strategy}: clips whose `tags` hold the tag always train with that strategy, and not at
                # all before start_step; '' (as here) trains them like any other clip: the mix, from step 0.
                # exits=prefix (clips that leave the frame only ever as continuations) did not teach extension
                # past the end of a travel and cost the caption its hold on direction (0.26;
                # experiments/sampling/README.md). enters=suffix (clips whose shape enters the frame, only as
                # backward extensions) teaches extension before the start of a travel (0.71 against 0.56) but
                # still costs text-to-video direction (0.79 against 0.95 at 8,000 steps).
                tag_strategies=dict(exits="", enters=""))
  # 128 held-out prompts: one standard error of an accuracy near 0.3 is 0.04 (0.08 at 32), about 10 s more.
  # use_ema=False: the demo samples the trained weights, not their EMA. Over 2,000 steps an EMA at 0.999
  # (a 1,000-step average) lags a model still learning direction: on nine demo workdirs the raw weights
  # followed direction on 0.57 of held-out prompts on average against 0.50 (better on eight, 0.01 worse on
  # one; experiments/tiny_t2v/README.md). The EMA is still kept in the checkpoint for comparison.
  # vae_chunk: latent frames per chunk when the VAE decodes samples and encodes condition clips (0: whole
  # videos at once; 1 keeps the VAE's memory flat in the number of frames).
  c.sample = dict(
      steps=25, solver="euler", guidance=4.0, num_heldout_prompts=128, prompts_file="", batch_size=16,
      use_ema=False, guidance_image=1.0, guidance_interval=(0.0, 1.0), negative_prompt="", vae_chunk=0)
  c.eval = dict(num_vae_clips=32, val_samples=64, val_timesteps=(0.1, 0.3, 0.5, 0.7, 0.9), fvd_clips=0)

  if arg.runlocal:
    c.vae.base_channels = 8
    c.train_vae.update(steps=4, batch_size=2, log_every=2, ckpt_every=4, warmup_steps=1)
    c.encode.update(num_samples=16, batch_size=8)
    c.text.update(width=32, depth=1, num_heads=2)
    c.dit.update(width=48, depth=2, num_heads=2)
    c.train_dit.update(steps=4, batch_size=2, log_every=2, ckpt_every=4, warmup_steps=1)
    c.sample.update(steps=2, num_heldout_prompts=4, batch_size=4)
    c.eval.num_vae_clips = 4
  return c


def use_cross_attention(c):
  """Text for long, real captions: every DiT block cross-attends to the caption's token states, and adaLN
  gets their mean. Summed word embeddings (the demo's path) lose word order and grow with caption length."""
  c.text.pool = "mean"
  c.dit.cross_attention = True
  return c


def use_standard_schedule(c):
  """Undo the demo's choices for its tiny DiT on the embedded data, for big DiTs and real data: no absolute
  position embedding (RoPE only), the resolution shift's usual base, frame conditioning from the first
  step, and 32 held-out prompts when the embedded data is evaluated (a big DiT samples each at full size)."""
  c.dit.abs_pos = False
  c.flow.shift_base_tokens = 80
  c.cond.start_step = 0
  c.sample.num_heldout_prompts = 32
  return c
