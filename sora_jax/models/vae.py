"""Causal 3D convolutional KL video VAE (the video compression network).

Layout is channels-last `[B, T, H, W, C]`, pixels float in [-1, 1]. Every convolution is causal in time: it
pads only on the left, by replicating the first frame, so output frame j sees input frames <= j. Temporal
downsampling keeps the first frame alone (`1 + s*k` frames -> `1 + k` latents), so an image is a 1-frame
video and encodes exactly like the first frame of a video that starts with it (Wan2.1 / CogVideoX style).

Shape contract, with `s_t = temporal_stride` and `s = spatial_stride`:
  encode: [B, 1 + s_t*k, s*h, s*w, in_channels] -> mean, logvar [B, 1 + k, h, w, latent_channels]
  decode: [B, 1 + k, h, w, latent_channels] -> [B, 1 + s_t*k, s*h, s*w, in_channels]
Causality: latent frame i depends only on pixel frames <= s_t*i; decoded frame j depends only on latent frames
<= ceil(j / s_t). That is what makes chunked passes exact: `encode(x, chunk=k)` / `decode(z, chunk=k)` run
frame 0 alone and then k-latent-frame chunks in a scan that carries each conv's last input frames
(`ConvCache`), with activation memory flat in T; `tile=` adds overlapping spatial tiles, blended.

Weights carry logical axis names (`conv_kh, conv_kw, conv_kt, conv_in, conv_out`; the pixel- and
latent-facing channel axes are left unnamed, i.e. replicated). Flax 0.12 shards variables
eagerly at creation, so build the model under `jax.set_mesh(mesh)` together with `nnx.logical_axis_rules(...)`
mapping those names to mesh axes (or `None`), or under `nnx.use_eager_sharding(False)`.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax.models import layers
from sora_jax.parallel import mesh as mesh_lib

# Conv kernels are stored [kh, kw, kt, cin, cout]: each time tap's slice `kernel[:, :, i]` is a 2D conv
# kernel in XLA's HWIO layout.
CONV_KERNEL_AXES = ("conv_kh", "conv_kw", "conv_kt", "conv_in", "conv_out")
LOGVAR_RANGE = (-30.0, 20.0)


class LatentStats(nnx.Variable):
  """Per-channel latent statistics; not an `nnx.Param`, so optimizers leave it alone."""


def _pad_time_causal(x: jax.Array, n: int, mode: str = "replicate") -> jax.Array:
  """Left-pads `n` frames: copies of frame 0 ("replicate") or zeros ("zeros", Wan2.1's choice)."""
  if n == 0:
    return x
  pad = (jnp.repeat(x[:, :1], n, axis=1) if mode == "replicate"
         else jnp.zeros((x.shape[0], n, *x.shape[2:]), x.dtype))
  return jnp.concatenate([pad, x], axis=1)


def causal_conv3d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1, 1)) -> jax.Array:
  """Causal 3D convolution, kernel `[kh, kw, kt, cin, cout]`, spatial padding `(k-1)//2` on both sides."""
  return conv3d_time_valid(_pad_time_causal(x, kernel.shape[2] - 1), kernel, strides)


def conv_frames_per_call(t_out: int) -> int:
  """How many output frames one 2D convolution call computes: 1 on CPU, all of them elsewhere.

  XLA:CPU's convolutions run fastest on one frame (times the batch) at a time: the per-call working set
  stays in cache. Side by side on the 2-core CPU (experiments/vae/README.md, section 1) a conv over 4
  frames at 128 x 128 x 96 runs at 120 GFLOP/s forward when all frames share one call and 215 one frame per
  call; its backward 78 and 101, and 92 against 243 at 64 x 64 x 192. Accelerators prefer the largest call.
  """
  return 1 if mesh_lib.target_platform() == "cpu" else t_out


def fold_time_taps(kernel_shape: Sequence[int], pixels_per_call: int) -> bool:
  """Whether a conv call folds its time taps into the input channels (one 2D conv) instead of one per tap.

  CPU only. Per tap is faster, but each tap's kernel slice `kernel[:, :, i]` is a copy, and XLA:CPU's
  scheduler keeps those copies alive together. Folding needs no kernel copy (the `[kh, kw, kt, cin, cout]`
  kernel reshapes to `[kh, kw, kt * cin, cout]` for free) and copies the input taps instead. So fold where a
  tap's kernel slice is larger than its input, i.e. the deep, wide, low-resolution convs
  (experiments/vae/README.md).
  """
  kh, kw, kt, _, cout = kernel_shape
  return mesh_lib.target_platform() == "cpu" and kt > 1 and kh * kw * cout > pixels_per_call


def conv3d_time_valid(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1, 1),
                      spatial_pad: Sequence[tuple[int, int]] | None = None,
                      frames_per_call: int | None = None) -> jax.Array:
  """3D convolution with no time padding (the caller prepends causal context) and zero spatial padding.

  `spatial_pad` is `((top, bottom), (left, right))`; None pads `(k - 1) // 2` on both sides ('same' at
  stride 1). Wan2.1's downsampling convs pad only bottom and right: `((0, 1), (0, 1))`.

  Formulated as 2D convolutions, one per time tap, summed: output frame `j` is
  `sum_i conv2d(x[j * st + i], kernel[:, :, i])`. The output frames are computed `frames_per_call` at a
  time (default `conv_frames_per_call`: one on CPU, all on TPU/GPU), each group one 2D conv per tap over
  `[B * frames, H, W]`. The same lax ops lower on every backend; only the grouping differs. Measured
  against the alternatives (a 3D conv, the time taps folded into the input channels of one 2D conv, that
  fold one frame at a time, im2col) in tools/bench_vae_conv.py and tools/bench_vae.py. The cost: each
  tap's kernel slice is a copy, and XLA:CPU's scheduler keeps them alive together. So where a tap's kernel
  slice is larger than its input (`fold_time_taps`: the wide, low-resolution convs, which hold most of the
  weights) the taps are folded into the input channels of one 2D conv instead, whose kernel is a free
  reshape: Wan2.1's VAE at 128 x 128 then needs 354 MB of temporaries instead of 552.
  """
  kh, kw, kt, cin, cout = kernel.shape
  st, sh, sw = strides
  b, tp, h, w, c = x.shape
  if c != cin:
    raise ValueError(f"causal_conv3d: input has {c} channels, kernel expects {cin}")
  t_out = (tp - kt) // st + 1
  if kh == kw == 1 and sh == sw == 1 and spatial_pad is None:
    # Pointwise over space: a matmul per time tap is cheaper than a conv.
    return sum(jnp.einsum("bthwc,cd->bthwd", x[:, i:i + st * (t_out - 1) + 1:st], kernel[0, 0, i])
               for i in range(kt))
  if spatial_pad is None:
    spatial_pad = (((kh - 1) // 2,) * 2, ((kw - 1) // 2,) * 2)
  padding = [tuple(p) for p in spatial_pad]
  group = frames_per_call or conv_frames_per_call(t_out)
  conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(sh, sw), padding=padding,
                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
  outs = []
  for t0 in range(0, t_out, group):
    n = min(group, t_out - t0)
    taps = [x[:, t0 * st + i:(t0 + n - 1) * st + i + 1:st].reshape(b * n, h, w, cin) for i in range(kt)]
    if fold_time_taps(kernel.shape, b * n * h * w):
      y = conv(jnp.concatenate(taps, axis=-1), kernel.reshape(kh, kw, kt * cin, cout))
    else:
      y = None
      for i, xi in enumerate(taps):
        yi = conv(xi, kernel[:, :, i])
        y = yi if y is None else y + yi
    outs.append(y.reshape(b, n, *y.shape[1:]))
  return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]


class ConvCache:
  """Causal conv states for chunked passes.

  Each causal conv reads the frames it still needs from the previous chunk (`prev`, in call order) and
  records its own for the next chunk (`next`, same order). `prev is None` marks the first chunk, which is
  padded exactly like a full pass, so chunked and full passes agree.
  """

  def __init__(self, prev: Sequence[jax.Array] | None = None):
    self.prev = None if prev is None else list(prev)
    self.next: list[jax.Array] = []

  @property
  def first(self) -> bool:
    return self.prev is None

  def context(self, x: jax.Array, n: int, stride: int, pad_mode: str) -> jax.Array:
    """`x` with its causal left context (cached frames, or padding on the first chunk); records the next."""
    xp = _pad_time_causal(x, n, pad_mode) if self.first else jnp.concatenate(
        [self.prev[len(self.next)], x], axis=1)
    # Frames from the next window start on are the next chunk's context (n frames when stride is 1).
    consumed = ((xp.shape[1] - n - 1) // stride + 1) * stride
    self.next.append(xp[:, consumed:])
    return xp


class CausalConv3d(nnx.Module):
  """Causal-in-time 3D convolution with bias (see `causal_conv3d`)."""

  def __init__(self, in_channels: int, out_channels: int, *, kernel_size: Sequence[int] = (3, 3, 3),
               strides: Sequence[int] = (1, 1, 1), zero_init: bool = False, in_axis: str | None = "conv_in",
               out_axis: str | None = "conv_out", pad_mode: str = "replicate",
               spatial_pad: Sequence[tuple[int, int]] | None = None, dtype=jnp.float32, rngs: nnx.Rngs):
    # `in_axis` / `out_axis` are None for the pixel- and latent-facing sides (3 to 2*latent channels): too
    # small to shard, and usually not divisible by a mesh axis.
    init = nnx.initializers.zeros_init() if zero_init else nnx.initializers.lecun_normal()
    kt, kh, kw = kernel_size
    self.kernel = nnx.Param(nnx.with_partitioning(init, (*CONV_KERNEL_AXES[:3], in_axis, out_axis))(
        rngs.params(), (kh, kw, kt, in_channels, out_channels)))
    self.bias = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros_init(), (out_axis,))(
        rngs.params(), (out_channels,)))
    self.strides = tuple(strides)
    self.pad_mode = pad_mode
    self.spatial_pad = None if spatial_pad is None else tuple(tuple(p) for p in spatial_pad)
    self.dtype = dtype

  def __call__(self, x: jax.Array, cache: ConvCache | None = None, *,
               kernel: jax.Array | None = None) -> jax.Array:
    """`kernel` replaces the stored one (to differentiate a loss w.r.t. this layer's weights alone)."""
    x = x.astype(self.dtype)
    kernel = self.kernel[...] if kernel is None else kernel
    n = kernel.shape[2] - 1
    if cache is not None and n:
      x = cache.context(x, n, self.strides[0], self.pad_mode)
    else:
      x = _pad_time_causal(x, n, self.pad_mode)
    y = conv3d_time_valid(x, kernel.astype(self.dtype), self.strides, self.spatial_pad)
    return y + self.bias[...].astype(self.dtype)


def channel_norm(channels: int, eps: float = 1e-6) -> layers.RMSNorm:
  """RMS norm over channels at each (t, h, w): per position, so it can never leak future frames."""
  return layers.RMSNorm(channels, eps=eps, names=("conv_out",))


class ResBlock(nnx.Module):
  """Pre-norm residual block: (norm, SiLU, causal conv) x2; the second conv starts at zero (identity)."""

  def __init__(self, in_channels: int, out_channels: int, *, pad_mode: str = "replicate",
               norm_eps: float = 1e-6, temporal_kernel: int = 3, dtype=jnp.float32, rngs: nnx.Rngs):
    k = (temporal_kernel, 3, 3)
    self.norm1 = channel_norm(in_channels, norm_eps)
    self.conv1 = CausalConv3d(in_channels, out_channels, kernel_size=k, pad_mode=pad_mode, dtype=dtype,
                              rngs=rngs)
    self.norm2 = channel_norm(out_channels, norm_eps)
    self.conv2 = CausalConv3d(out_channels, out_channels, kernel_size=k, zero_init=True, pad_mode=pad_mode,
                              dtype=dtype, rngs=rngs)
    self.skip = (CausalConv3d(in_channels, out_channels, kernel_size=(1, 1, 1), dtype=dtype, rngs=rngs)
                 if in_channels != out_channels else None)

  def __call__(self, x: jax.Array, cache: ConvCache | None = None) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)), cache)
    h = self.conv2(jax.nn.silu(self.norm2(h)), cache)
    skip = self.skip(x) if self.skip is not None else x
    return skip + h


class SpatialAttention(nnx.Module):
  """Single-head self-attention over the H*W positions of each frame (frames never see each other)."""

  def __init__(self, channels: int, *, qkv_bias: bool = False, norm_eps: float = 1e-6, dtype=jnp.float32,
               rngs: nnx.Rngs):
    axes = ("conv_in", "conv_out")
    self.norm = channel_norm(channels, norm_eps)
    self.qkv = nnx.Param(nnx.with_partitioning(nnx.initializers.lecun_normal(), axes)(
        rngs.params(), (channels, 3 * channels)))
    self.qkv_bias = (nnx.Param(nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",))(
        rngs.params(), (3 * channels,))) if qkv_bias else None)
    # Zero output projection: the block is the identity at init.
    self.out = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros_init(), axes)(
        rngs.params(), (channels, channels)))
    self.out_bias = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",))(
        rngs.params(), (channels,)))
    self.dtype = dtype

  def __call__(self, x: jax.Array, cache: ConvCache | None = None) -> jax.Array:
    del cache  # per frame: nothing to carry between chunks
    b, t, h, w, c = x.shape
    y = self.norm(x).reshape(b * t, h * w, c)
    qkv = y @ self.qkv[...].astype(self.dtype)
    if self.qkv_bias is not None:
      qkv = qkv + self.qkv_bias[...].astype(self.dtype)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * c ** -0.5
    y = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, axis=-1).astype(self.dtype), v)
    y = y @ self.out[...].astype(self.dtype) + self.out_bias[...].astype(self.dtype)
    return x + y.reshape(b, t, h, w, c)


class Downsample(nnx.Module):
  """Strided causal conv: /2 in space when `spatial`, /2 in time (first frame alone) when `temporal`."""

  def __init__(self, channels: int, *, temporal: bool, spatial: bool = True, pad_mode: str = "replicate",
               temporal_kernel: int = 3, dtype=jnp.float32, rngs: nnx.Rngs):
    # Kernel 3, stride 2, left pad 2 in time: 1 + 2k frames -> 1 + k, output 0 sees frame 0 only. Without
    # temporal downsampling the conv has `temporal_kernel` time taps, like the ResBlocks'.
    s = 2 if spatial else 1
    self.conv = CausalConv3d(channels, channels, kernel_size=(3 if temporal else temporal_kernel, 3, 3),
                             strides=(2 if temporal else 1, s, s), pad_mode=pad_mode, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, cache: ConvCache | None = None) -> jax.Array:
    return self.conv(x, cache)


class Upsample(nnx.Module):
  """Nearest x2 in space (when `spatial`) and, when `temporal`, 1 + k -> 1 + 2k frames; then a causal conv."""

  def __init__(self, channels: int, *, temporal: bool, spatial: bool = True, pad_mode: str = "replicate",
               temporal_kernel: int = 3, dtype=jnp.float32, rngs: nnx.Rngs):
    self.temporal = temporal
    self.spatial = spatial
    # A temporal upsample mixes the repeated frames with 3 time taps whatever `temporal_kernel` is.
    self.conv = CausalConv3d(channels, channels, kernel_size=(3 if temporal else temporal_kernel, 3, 3),
                             pad_mode=pad_mode, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, cache: ConvCache | None = None) -> jax.Array:
    if self.spatial:
      x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
    if self.temporal:
      # Repeat every frame twice and drop the first copy: frame 0 stays alone, the exact shape inverse of
      # Downsample, and output frame j depends only on latent frames <= ceil(j / 2). Later chunks of a
      # chunked pass keep both copies: their first frame is not the video's.
      x = jnp.repeat(x, 2, axis=1)
      if cache is None or cache.first:
        x = x[:, 1:]
    return self.conv(x, cache)


class WanDownsample(nnx.Module):
  """Wan2.1's resampling down ('downsample2d' / 'downsample3d'): 2D conv, then a learned time conv.

  Space: per frame, zero pad bottom/right by one and a 3x3 stride-2 conv. Time (when `temporal`): a
  (3, 1, 1) stride-2 conv over frames `2k-2, 2k-1, 2k` gives output k >= 1; output 0 is frame 0 unchanged.
  That is what diffusers' `AutoencoderKLWan` computes with its frame-0-first chunked feature cache, written
  as one causal pass: `1 + 2k` frames -> `1 + k`, and chunked passes carry the conv's last frame.
  """

  def __init__(self, channels: int, *, temporal: bool, dtype=jnp.float32, rngs: nnx.Rngs):
    self.conv = CausalConv3d(channels, channels, kernel_size=(1, 3, 3), strides=(1, 2, 2),
                             spatial_pad=((0, 1), (0, 1)), dtype=dtype, rngs=rngs)
    self.time_conv = (CausalConv3d(channels, channels, kernel_size=(3, 1, 1), strides=(2, 1, 1),
                                   pad_mode="zeros", dtype=dtype, rngs=rngs) if temporal else None)

  def __call__(self, x: jax.Array, cache: ConvCache | None = None) -> jax.Array:
    x = self.conv(x)
    if self.time_conv is None:
      return x
    y = self.time_conv(x, cache)
    if cache is None or cache.first:
      y = jnp.concatenate([x[:, :1].astype(y.dtype), y[:, 1:]], axis=1)
    return y


class WanUpsample(nnx.Module):
  """Wan2.1's resampling up ('upsample2d' / 'upsample3d'): learned time doubling, nearest x2, 2D conv.

  Time (when `temporal`): frame 0 stays alone; every later frame goes through a causal (3, 1, 1) conv with
  zero padding (its history starts at frame 1, as in diffusers' feature cache) to `2 * channels`, split into
  two consecutive frames, so `1 + k` -> `1 + 2k` frames. Space: nearest x2, then a 3x3 conv to
  `channels // 2` (Wan's decoder halves channels at every upsampling).
  """

  def __init__(self, channels: int, *, temporal: bool, dtype=jnp.float32, rngs: nnx.Rngs):
    self.time_conv = (CausalConv3d(channels, 2 * channels, kernel_size=(3, 1, 1), pad_mode="zeros",
                                   dtype=dtype, rngs=rngs) if temporal else None)
    self.conv = CausalConv3d(channels, channels // 2, kernel_size=(1, 3, 3), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, cache: ConvCache | None = None) -> jax.Array:
    if self.time_conv is not None:
      # The video's first frame skips the time conv; later chunks of a chunked pass have none.
      n_head = 1 if cache is None or cache.first else 0
      head, y = x[:, :n_head], self.time_conv(x[:, n_head:], cache)
      b, t, h, w, c2 = y.shape
      y = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c2 // 2)
      x = jnp.concatenate([head.astype(y.dtype), y], axis=1)
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3))


LAYOUTS = ("default", "wan")


class VAE(nnx.Module):
  """Causal 3D conv KL autoencoder for videos and images (an image is a 1-frame video).

  `patch_size` p folds p x p pixel blocks into channels before the first conv (and unfolds after the last),
  as LTX-Video does: the full-resolution level then runs on 1/p^2 of the positions with wider inputs, which
  is where most of a small VAE's FLOPs and memory traffic go. Spatial stride = p * 2^(spatial downsamples).

  `temporal_kernel=1` gives every conv except the temporal down/upsampling ones a single time tap (time is
  mixed only where it is resampled), and `head_norm=False` drops the per-position norms before `enc_out` and
  `dec_out`. Measured on the embedded data (experiments/tiny_t2v/README.md), each of the two defaults slows
  early learning of a small VAE: per-position RMS normalisation just before the pixel and latent heads
  discards how strongly each position responds, and 3 random time taps at init blend an object's past
  positions into every frame, which the decoder must first learn to undo. Big VAEs trained for long (Wan2.1)
  use both; the demo uses neither.

  `layout="wan"` builds Wan2.1's VAE (diffusers `AutoencoderKLWan`, so tools/convert_wan_vae.py can load
  its weights) from the same blocks: `WanDownsample` / `WanUpsample` in place of `Downsample` / `Upsample`
  (the decoder's channels halve at each upsampling), `enc_in` to `base_channels`, a bias on the attention's
  qkv, norms with eps 1e-12 (Wan normalises by the L2 norm), and 1x1x1 `quant_conv` / `post_quant_conv`
  around the latents. Use it with `pad_mode="zeros"` and `mid_attention=True`, as Wan does.
  """

  def __init__(self, *, base_channels: int, channel_mults: Sequence[int], num_res_blocks: int,
               temporal_downsample: Sequence[bool], latent_channels: int, mid_attention: bool = False,
               in_channels: int = 3, patch_size: int = 1, spatial_downsample: Sequence[bool] | None = None,
               pad_mode: str = "replicate", layout: str = "default", temporal_kernel: int = 3,
               head_norm: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
    channel_mults = tuple(channel_mults)
    temporal_downsample = tuple(bool(t) for t in temporal_downsample)
    spatial_downsample = (tuple(bool(t) for t in spatial_downsample) if spatial_downsample is not None
                          else (True,) * (len(channel_mults) - 1))
    for name, flags in [("temporal_downsample", temporal_downsample),
                        ("spatial_downsample", spatial_downsample)]:
      if len(flags) != len(channel_mults) - 1:
        raise ValueError(
            f"vae.{name} needs one entry per downsampling level (len(channel_mults) - 1 = "
            f"{len(channel_mults) - 1}), got {flags}")
    if pad_mode not in ("replicate", "zeros"):
      raise ValueError(f"vae.pad_mode must be 'replicate' or 'zeros', got {pad_mode!r}")
    if layout not in LAYOUTS:
      raise ValueError(f"vae.layout must be one of {LAYOUTS}, got {layout!r}")
    wan = layout == "wan"
    if temporal_kernel not in (1, 3):
      raise ValueError(f"vae.temporal_kernel must be 1 or 3, got {temporal_kernel!r}")
    if wan and (temporal_kernel != 3 or not head_norm):
      raise ValueError(f"vae.layout='wan' needs temporal_kernel=3 and head_norm=True, got "
                       f"temporal_kernel={temporal_kernel}, head_norm={head_norm}")
    if wan and not all(spatial_downsample):
      raise ValueError(f"vae.layout='wan' downsamples space at every level, got spatial_downsample="
                       f"{spatial_downsample}")
    self.layout = layout
    self.in_channels = in_channels
    self.latent_channels = latent_channels
    self.temporal_downsample = temporal_downsample
    self.patch_size = int(patch_size)
    self.temporal_stride = 2 ** sum(temporal_downsample)
    self.spatial_stride = self.patch_size * 2 ** sum(spatial_downsample)
    self.dtype = dtype
    chans = [base_channels * m for m in channel_mults]
    levels = len(chans)
    norm_eps = 1e-12 if wan else 1e-6
    kw = dict(pad_mode=pad_mode, dtype=dtype, rngs=rngs)
    rkw = dict(norm_eps=norm_eps, temporal_kernel=temporal_kernel, **kw)
    tk = (temporal_kernel, 3, 3)
    pixel_channels = in_channels * self.patch_size ** 2

    # Encoder: conv_in, per level `num_res_blocks` ResBlocks then a Downsample (all but the last level), mid.
    ch = base_channels if wan else chans[0]
    self.enc_in = CausalConv3d(pixel_channels, ch, kernel_size=tk, in_axis=None, **kw)
    enc = []
    for i, out_ch in enumerate(chans):
      for _ in range(num_res_blocks):
        enc.append(ResBlock(ch, out_ch, **rkw))
        ch = out_ch
      if i < levels - 1:
        enc.append(WanDownsample(ch, temporal=temporal_downsample[i], dtype=dtype, rngs=rngs) if wan else
                   Downsample(ch, temporal=temporal_downsample[i], spatial=spatial_downsample[i],
                              temporal_kernel=temporal_kernel, **kw))
    self.enc_blocks = nnx.List(enc)
    self.enc_mid = nnx.List(self._mid(ch, mid_attention, wan, rkw))
    self.enc_norm = channel_norm(ch, norm_eps) if head_norm else None
    self.enc_out = CausalConv3d(ch, 2 * latent_channels, kernel_size=tk, out_axis=None, **kw)
    self.quant_conv = (CausalConv3d(2 * latent_channels, 2 * latent_channels, kernel_size=(1, 1, 1),
                                    in_axis=None, out_axis=None, dtype=dtype, rngs=rngs) if wan else None)

    # Decoder mirrors it with one extra ResBlock per level (the LDM habit: decoding is the harder half).
    self.post_quant_conv = (CausalConv3d(latent_channels, latent_channels, kernel_size=(1, 1, 1),
                                         in_axis=None, out_axis=None, dtype=dtype, rngs=rngs) if wan else None)
    self.dec_in = CausalConv3d(latent_channels, chans[-1], kernel_size=tk, in_axis=None, **kw)
    ch = chans[-1]
    self.dec_mid = nnx.List(self._mid(ch, mid_attention, wan, rkw))
    dec = []
    for i in reversed(range(levels)):
      for _ in range(num_res_blocks + 1):
        dec.append(ResBlock(ch, chans[i], **rkw))
        ch = chans[i]
      if i > 0 and wan:
        dec.append(WanUpsample(ch, temporal=temporal_downsample[i - 1], dtype=dtype, rngs=rngs))
        ch //= 2
      elif i > 0:
        dec.append(Upsample(ch, temporal=temporal_downsample[i - 1], spatial=spatial_downsample[i - 1],
                            temporal_kernel=temporal_kernel, **kw))
    self.dec_blocks = nnx.List(dec)
    self.dec_norm = channel_norm(ch, norm_eps) if head_norm else None
    self.dec_out = CausalConv3d(ch, pixel_channels, kernel_size=tk, out_axis=None, **kw)

    self.latent_mean = LatentStats(jnp.zeros((latent_channels,), jnp.float32))
    self.latent_std = LatentStats(jnp.ones((latent_channels,), jnp.float32))

  @staticmethod
  def _mid(ch, mid_attention, qkv_bias, kw):
    blocks = [ResBlock(ch, ch, **kw)]
    if mid_attention:
      blocks.append(SpatialAttention(ch, qkv_bias=qkv_bias, norm_eps=kw["norm_eps"], dtype=kw["dtype"],
                                     rngs=kw["rngs"]))
    blocks.append(ResBlock(ch, ch, **kw))
    return blocks

  def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Latent `(T', H', W', C)` for a `(frames, height, width)` video; raises if the size does not divide."""
    if (frames - 1) % self.temporal_stride or height % self.spatial_stride or width % self.spatial_stride:
      raise ValueError(
          f"VAE input (T={frames}, H={height}, W={width}) needs T = 1 + {self.temporal_stride}*k and H, W "
          f"divisible by {self.spatial_stride}")
    return (1 + (frames - 1) // self.temporal_stride, height // self.spatial_stride,
            width // self.spatial_stride, self.latent_channels)

  # ------------------------------------------------------------------ one pass over frames (or a chunk)
  def _encode(self, x: jax.Array, cache: ConvCache | None) -> tuple[jax.Array, jax.Array]:
    h = self.enc_in(space_to_depth(x, self.patch_size), cache)
    for block in (*self.enc_blocks, *self.enc_mid):
      h = block(h, cache)
    h = self.enc_out(jax.nn.silu(self.enc_norm(h) if self.enc_norm is not None else h), cache)
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def _decode(self, z: jax.Array, cache: ConvCache | None) -> jax.Array:
    return self.decode_head(self.decode_features(z, cache), cache)

  def decode_features(self, z: jax.Array, cache: ConvCache | None = None) -> jax.Array:
    """Everything of the decoder before its last conv (the GAN's adaptive weight differentiates at it)."""
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    h = self.dec_in(z, cache)
    for block in (*self.dec_mid, *self.dec_blocks):
      h = block(h, cache)
    return jax.nn.silu(self.dec_norm(h) if self.dec_norm is not None else h)

  def decode_head(self, h: jax.Array, cache: ConvCache | None = None, *,
                  kernel: jax.Array | None = None) -> jax.Array:
    """Last conv (optionally with `kernel` in place of its weights) and unpatchify -> float32 pixels."""
    return depth_to_space(self.dec_out(h, cache, kernel=kernel).astype(jnp.float32), self.patch_size)

  def encode(self, x: jax.Array, *, chunk: int | None = None,
             tile: int | None = None, tile_overlap: int = 0) -> tuple[jax.Array, jax.Array]:
    """Pixels `[B, T, H, W, in_channels]` in [-1, 1] -> float32 `(mean, logvar)` `[B, T', H', W', C]`.

    `chunk=k`: frame 0 alone, then `temporal_stride * k`-frame chunks in a scan carrying the conv states,
    so activation memory does not grow with T; equals the full pass to float tolerance. `tile` (pixels, a
    multiple of `spatial_stride`) encodes overlapping spatial tiles and blends them (approximate).
    """
    self.latent_shape(*x.shape[1:4])
    if tile is not None and max(x.shape[2:4]) > tile:
      mean_logvar = _tiled(lambda t: jnp.concatenate(self.encode(t, chunk=chunk), -1), x, tile, tile_overlap,
                           1 / self.spatial_stride)
      return jnp.split(mean_logvar, 2, axis=-1)
    if chunk is None:
      return self._encode(x, None)
    return _chunked(self._encode, x, self.temporal_stride * chunk)

  def decode(self, z: jax.Array, *, chunk: int | None = None,
             tile: int | None = None, tile_overlap: int = 0) -> jax.Array:
    """Latents `[B, T', H', W', C]` -> float32 pixels `[B, 1 + s_t*(T'-1), s*H', s*W', in_channels]`.

    `chunk=k`: latent frame 0 alone, then k-latent-frame chunks with carried conv states (see `encode`);
    `tile` (latent units) decodes overlapping spatial tiles and blends them.
    """
    if tile is not None and max(z.shape[2:4]) > tile:
      return _tiled(lambda t: self.decode(t, chunk=chunk), z, tile, tile_overlap, self.spatial_stride)
    if chunk is None:
      return self._decode(z, None)
    return _chunked(self._decode, z, chunk)

  def __call__(self, x: jax.Array, *, rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Reconstructs `x` from a posterior sample; returns `(recon, mean, logvar)`."""
    mean, logvar = self.encode(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return self.decode(z), mean, logvar

  def normalize(self, z: jax.Array) -> jax.Array:
    """Raw latents -> unit-scale latents for the DiT, per channel."""
    return latent_normalize(z, (self.latent_mean[...], self.latent_std[...]))

  def denormalize(self, z: jax.Array) -> jax.Array:
    """Inverse of `normalize`: DiT samples -> latents for `decode`."""
    return latent_denormalize(z, (self.latent_mean[...], self.latent_std[...]))

  def set_latent_stats(self, mean: jax.Array, std: jax.Array) -> None:
    """Stores per-channel statistics (e.g. from `latent_stats(...)` over a few encoded batches)."""
    self.latent_mean[...] = jnp.asarray(mean, jnp.float32).reshape(self.latent_channels)
    self.latent_std[...] = jnp.asarray(std, jnp.float32).reshape(self.latent_channels)


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
  """`[B, T, H, W, C]` -> `[B, T, H/p, W/p, p*p*C]` (channel order (dy, dx, c))."""
  if p == 1:
    return x
  b, t, h, w, c = x.shape
  x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
  return x.reshape(b, t, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
  """Inverse of `space_to_depth`."""
  if p == 1:
    return x
  b, t, h, w, c = x.shape
  x = x.reshape(b, t, h, w, p, p, c // (p * p)).transpose(0, 1, 2, 4, 3, 5, 6)
  return x.reshape(b, t, h * p, w * p, c // (p * p))


def _chunked(fn, x: jax.Array, size: int):
  """Runs causal `fn(x, cache)` on frame 0, then on `size`-frame chunks in a scan, concatenating outputs.

  The scan carries only the conv states, so peak activation memory is that of one chunk whatever T is.
  A tail shorter than `size` runs once more after the scan.
  """
  cache = ConvCache()
  out0 = fn(x[:, :1], cache)
  rest = x[:, 1:]
  n, tail = divmod(rest.shape[1], size)
  outs, states = [out0], cache.next

  def step(states, xc):
    c = ConvCache(states)
    return c.next, fn(xc, c)

  if n:
    chunks = jnp.moveaxis(rest[:, :n * size].reshape(x.shape[0], n, size, *x.shape[2:]), 1, 0)
    states, ys = jax.lax.scan(step, states, chunks)
    # ys: [n, B, t_chunk, ...] per output -> [B, n * t_chunk, ...].
    outs.append(jax.tree.map(lambda y: jnp.moveaxis(y, 0, 1).reshape(y.shape[1], -1, *y.shape[3:]), ys))
  if tail:
    outs.append(step(states, rest[:, n * size:])[1])
  return jax.tree.map(lambda *ys: jnp.concatenate(ys, axis=1), *outs)


def _blend_ramp(n: int, overlap: int, at_start: bool, at_end: bool) -> jnp.ndarray:
  """1-D weights: linear ramps over `overlap` positions at inner tile edges, 1 elsewhere."""
  w = jnp.ones((n,), jnp.float32)
  if overlap > 0:
    ramp = (jnp.arange(overlap, dtype=jnp.float32) + 1) / (overlap + 1)
    if not at_start:
      w = w.at[:overlap].set(ramp)
    if not at_end:
      w = w.at[n - overlap:].set(ramp[::-1])
  return w


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
  if size <= tile:
    return [0]
  step = tile - overlap
  starts = list(range(0, size - tile, step)) + [size - tile]
  return sorted(set(starts))


def _tiled(fn, x: jax.Array, tile: int, overlap: int, scale: float) -> jax.Array:
  """Applies `fn` to overlapping `tile` x `tile` spatial tiles of `x` and blends outputs with linear ramps.

  `scale` is the output/input spatial size ratio (the VAE's stride for decode, its inverse for encode);
  tile, overlap and starts are in input units and must map to whole output units.
  """
  _, _, h, w, _ = x.shape
  hs, ws = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
  out = weight = None
  for i in hs:
    for j in ws:
      y = fn(x[:, :, i:i + tile, j:j + tile])
      th, tw = y.shape[2:4]
      oi, oj, ov = round(i * scale), round(j * scale), round(overlap * scale)
      if out is None:
        out = jnp.zeros((y.shape[0], y.shape[1], round(h * scale), round(w * scale), y.shape[-1]), y.dtype)
        weight = jnp.zeros(out.shape[2:4], jnp.float32)
      wgt = (_blend_ramp(th, ov, i == hs[0], i == hs[-1])[:, None] *
             _blend_ramp(tw, ov, j == ws[0], j == ws[-1])[None, :])
      out = out.at[:, :, oi:oi + th, oj:oj + tw].add(y * wgt[:, :, None])
      weight = weight.at[oi:oi + th, oj:oj + tw].add(wgt)
  return out / weight[:, :, None]


def latent_stats(z: jax.Array, eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and std of latents `[..., C]` over every other axis."""
  axes = tuple(range(z.ndim - 1))
  return jnp.mean(z, axis=axes), jnp.std(z, axis=axes) + eps


def latent_normalize(z: jax.Array, stats: tuple[jax.Array, jax.Array]) -> jax.Array:
  mean, std = stats
  return (z - mean) / std


def latent_denormalize(z: jax.Array, stats: tuple[jax.Array, jax.Array]) -> jax.Array:
  mean, std = stats
  return z * std + mean


def kl_loss(mean: jax.Array, logvar: jax.Array, *, reduction: str = "sum") -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, 1)).

  reduction="sum" (default): summed over each sample's latent elements, then averaged over the batch (the
  LDM convention that weights like 1e-6 are tuned for). reduction="mean": averaged over every element.
  """
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  if reduction == "sum":
    return jnp.mean(jnp.sum(kl.reshape(kl.shape[0], -1), axis=-1))
  if reduction == "mean":
    return jnp.mean(kl)
  raise ValueError(f"kl_loss: reduction must be 'sum' or 'mean', got {reduction!r}")


_CONFIG_FIELDS = ("base_channels", "channel_mults", "num_res_blocks", "temporal_downsample",
                  "latent_channels")
# Optional fields and their defaults.
_OPTIONAL_FIELDS = dict(mid_attention=False, in_channels=3, patch_size=1, spatial_downsample=None,
                        pad_mode="replicate", layout="default", temporal_kernel=3, head_norm=True)


# `vae.inference_dtype`: the weights and activations of encode / decode outside training.
INFERENCE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def inference_dtype(cfg: Mapping[str, Any] | Any):
  """`cfg.inference_dtype` (default float32) as a jnp dtype: what a restored VAE stores its weights and
  computes in. bfloat16 halves the weights' and activations' memory; norms, softmax and the outputs stay
  float32."""
  name = cfg.get("inference_dtype", "float32")
  if name not in INFERENCE_DTYPES:
    raise ValueError(f"vae.inference_dtype must be one of {sorted(INFERENCE_DTYPES)}, got {name!r}")
  return INFERENCE_DTYPES[name]


def from_config(cfg: Mapping[str, Any] | Any, *, rngs: nnx.Rngs, dtype=jnp.float32) -> VAE:
  """Builds a VAE from `config.vae` (a ConfigDict or dict); fields in `_OPTIONAL_FIELDS` may be absent.
  `dtype`: the compute dtype (weights are created float32; see `inference_dtype`)."""
  kwargs = {name: cfg[name] for name in _CONFIG_FIELDS}
  kwargs.update({name: cfg.get(name, default) for name, default in _OPTIONAL_FIELDS.items()})
  for name in ("channel_mults", "temporal_downsample", "spatial_downsample"):
    if kwargs[name] is not None:
      kwargs[name] = tuple(kwargs[name])
  return VAE(**kwargs, dtype=dtype, rngs=rngs)
