"""Config helpers shared by every config: typed `arg` parsing, defaults, validation.

Configs follow the big_vision habit: `get_config(arg)` where `arg` is a string like
`"runlocal,steps=100,res=64"`; `parse_arg` turns it into a ConfigDict with typed defaults.
"""
from __future__ import annotations

import ast
import math
import re

import ml_collections

MODES = ("train_vae", "encode", "train_dit", "sample", "eval", "all")
MESH_AXES = ("data", "fsdp", "context", "tensor")


class ConfigError(ValueError):
  """A config field has a bad value; the message names the field."""


class ConfigPathError(ConfigError, FileNotFoundError):
  """A config field names a path that does not exist or holds something else."""


class InputError(Exception):
  """Bad or missing input other than the config (a prompts file, a stage not run yet). The launcher prints
  it as one line and exits with code 2."""


class MissingStageError(InputError, FileNotFoundError):
  """What an earlier mode writes (a checkpoint, a latent cache) is not in the workdir."""


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `"a=1,b=x,flag"` into a ConfigDict, typed by `defaults`.

  A bare name sets a boolean default to True. Unknown names raise, so a typo in a sweep fails at once.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for part in arg.split(","):
    part = part.strip()
    if not part:
      continue
    if "=" in part:
      name, value = part.split("=", 1)
    else:
      name, value = part, "True"
    name = name.strip()
    if name not in defaults:
      raise ConfigError(f"config arg: unknown name {name!r}; known: {sorted(defaults)}")
    default = defaults[name]
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ConfigError(f"config arg {name}: expected a boolean, got {value!r}")
      out[name] = value.lower() in ("true", "1")
    elif isinstance(default, (int, float)):
      try:
        out[name] = type(default)(ast.literal_eval(value))
      except (ValueError, SyntaxError) as e:
        raise ConfigError(f"config arg {name}: expected {type(default).__name__}, got {value!r}") from e
    else:
      out[name] = value
  return out


def _fail(field: str, value, reason: str):
  raise ConfigError(f"config.{field}={value!r}: {reason}")


def _positive(config, field: str, allow_zero: bool = False):
  value = config
  for part in field.split("."):
    value = value[part]
  if not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
    _fail(field, value, "must be " + ("non-negative" if allow_zero else "positive"))


def vae_strides(vae) -> tuple[int, int]:
  """(temporal, spatial) compression of a VAE config (pixel patchify times the downsampling levels)."""
  spatial = vae.get("spatial_downsample") or (True,) * (len(vae.channel_mults) - 1)
  return (2 ** sum(bool(x) for x in vae.temporal_downsample),
          int(vae.get("patch_size", 1)) * 2 ** sum(bool(x) for x in spatial))


def _validate_mixture(config) -> None:
  """config.data.mixture: a list of parts {source, weight, path (file and latent kinds), name, data fields}."""
  parts = config.data.get("mixture")
  if not parts:
    return
  from sora_jax.data import sources  # noqa: PLC0415 (keeps config parsing import-light)
  if not isinstance(parts, (list, tuple)):
    _fail("data.mixture", parts, "must be a list of dicts, e.g. [dict(source='folder', path=..., weight=0.7)]")
  allowed = ("source", "path", "weight", "name") + sources.PART_FIELDS
  names = set()
  for k, part in enumerate(parts):
    field = f"data.mixture[{k}]"
    if not hasattr(part, "keys"):
      _fail(field, part, "must be a dict like dict(source='synthetic', weight=0.3)")
    unknown = sorted(set(part.keys()) - set(allowed))
    if unknown:
      _fail(f"{field}.{unknown[0]}", part[unknown[0]], f"unknown mixture field; known: {allowed}")
    kind = part.get("source")
    if kind not in sources.MIXTURE_KINDS:
      _fail(f"{field}.source", kind, f"unknown source kind; choose one of {sources.MIXTURE_KINDS}")
    weight = part.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
      _fail(f"{field}.weight", weight, "must be a positive finite number")
    if kind != "synthetic" and not part.get("path"):
      _fail(f"{field}.path", part.get("path", ""), f"is required for source {kind!r}")
    name = part.get("name", f"{kind}_{k}")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
      _fail(f"{field}.name", name, "must be snake_case (it names the part's latent cache)")
    if name in names:
      _fail(f"{field}.name", name, "is used by an earlier part; names must be unique")
    names.add(name)
  if config.get("mode") in ("train_vae", "encode", "all") and all(p.get("source") == "latents" for p in parts):
    _fail("data.mixture", [p.get("source") for p in parts],
          f"mode {config.mode!r} needs pixels: add a synthetic, folder or tfds part")


def _validate_clip_spec(config) -> None:
  """How clips are cut from files (config.data and each mixture part): sampling, stride/fps, crop."""
  from sora_jax.data import sources  # noqa: PLC0415
  datas = [config.data] + [{**config.data, **p} for p in (config.data.get("mixture") or [])]
  for data in datas:
    try:
      sources.ClipSpec.from_config(data)
    except (TypeError, ValueError) as e:
      raise ConfigError(str(e).split("\n")[0]) from None


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks a resolved config before anything compiles; raises ConfigError naming the field."""
  if config.get("mode") is not None and config.mode not in MODES:
    _fail("mode", config.mode, f"unknown mode; choose one of {MODES}")
  # Mesh.
  names = [n for n, _ in config.mesh]
  if tuple(names) != MESH_AXES:
    _fail("mesh", config.mesh, f"axes must be {MESH_AXES} in this order")
  sizes = [s for _, s in config.mesh]
  if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
    _fail("mesh", config.mesh, "sizes must be positive, with at most one -1 (fill)")
  # VAE.
  vae = config.vae
  if len(vae.temporal_downsample) != len(vae.channel_mults) - 1:
    _fail("vae.temporal_downsample", tuple(vae.temporal_downsample),
          f"needs one entry per downsampling level ({len(vae.channel_mults) - 1})")
  for f in ("vae.base_channels", "vae.latent_channels", "vae.num_res_blocks"):
    _positive(config, f)
  if vae.get("layout", "default") not in ("default", "wan"):
    _fail("vae.layout", vae.layout, "must be 'default' or 'wan' (Wan2.1's blocks, see models/vae.py)")
  if vae.get("temporal_kernel", 3) not in (1, 3):
    _fail("vae.temporal_kernel", vae.temporal_kernel, "must be 1 or 3 (time taps of the non-resampling convs)")
  if vae.get("layout", "default") == "wan" and (vae.get("temporal_kernel", 3) != 3
                                                 or not vae.get("head_norm", True)):
    _fail("vae.layout", vae.layout, "'wan' needs temporal_kernel=3 and head_norm=True (Wan2.1's blocks)")
  if vae.get("inference_dtype", "float32") not in ("float32", "bfloat16"):
    _fail("vae.inference_dtype", vae.inference_dtype, "must be 'float32' or 'bfloat16' (the restored VAE's "
          "weights and activations when it encodes and decodes)")
  st, ss = vae_strides(vae)
  # Data sizes must go through the VAE and then the patcher.
  pt, ph, pw = config.dit.patch_size
  for i, (t, h, w) in enumerate(config.data.sizes):
    if (t - 1) % st:
      _fail(f"data.sizes[{i}]", (t, h, w), f"frames must be 1 + {st}*k for the VAE's temporal stride {st}")
    lt = 1 + (t - 1) // st
    if h % (ss * ph) or w % (ss * pw):
      _fail(f"data.sizes[{i}]", (t, h, w),
            f"height and width must divide by VAE stride {ss} x patch {ph}x{pw} = {ss * ph}x{ss * pw}")
    if lt % pt:
      _fail("dit.patch_size", tuple(config.dit.patch_size),
            f"temporal patch {pt} does not divide {lt} latent frames of data.sizes[{i}]={(t, h, w)}")
    tokens = (lt // pt) * (h // ss // ph) * (w // ss // pw)
    if tokens > config.train_dit.seq_len:
      _fail("train_dit.seq_len", config.train_dit.seq_len,
            f"shorter than the {tokens} tokens of data.sizes[{i}]={(t, h, w)}")
  _validate_mixture(config)
  _validate_clip_spec(config)
  # VAE passes: chunks in latent frames, tiles in pixels (0: whole clip / whole frame).
  for f in ("encode.chunk", "encode.tile", "encode.tile_overlap", "sample.vae_chunk"):
    section, key = f.split(".")
    if key in config.get(section, {}):
      _positive(config, f, allow_zero=True)
  stride = vae_strides(config.vae)[1]
  if config.get("encode", {}).get("tile", 0) % stride:
    _fail("encode.tile", config.encode.tile, f"must be a multiple of the VAE's spatial stride {stride}")
  # DiT.
  dit = config.dit
  for f in ("dit.width", "dit.depth", "dit.num_heads", "dit.mlp_ratio"):
    _positive(config, f)
  if dit.width % dit.num_heads:
    _fail("dit.num_heads", dit.num_heads, f"must divide dit.width={dit.width}")
  head_dim = dit.width // dit.num_heads
  if head_dim % 2 or head_dim < 6:
    _fail("dit.width", dit.width, f"head dim {head_dim} must be even and >= 6 for 3D RoPE (t, h, w pairs)")
  if not 0.0 <= config.data.get("exit_fraction", 0.0) <= 1.0:
    _fail("data.exit_fraction", config.data.exit_fraction, "must be in [0, 1]")
  if not 0.0 <= config.data.get("enter_fraction", 0.0) <= 1.0 - config.data.get("exit_fraction", 0.0):
    _fail("data.enter_fraction", config.data.enter_fraction, "must be in [0, 1 - data.exit_fraction]")
  if not 0.0 <= config.data.get("exit_depth", 0.0) <= 1.0:
    _fail("data.exit_depth", config.data.exit_depth, "must be in [0, 1] (a fraction of the shape's travel)")
  if "scan_unroll" in dit:
    _positive(config, "dit.scan_unroll")
  if dit.get("text_proj", False) and (not dit.get("cross_attention", True) or config.text.encoder == "class"):
    _fail("dit.text_proj", dit.text_proj, "projects the text for cross-attention, which this config does not "
          "have (dit.cross_attention=False or a class-conditional text.encoder)")
  if dit.get("rope_theta", 10000.0) <= 1.0:
    _fail("dit.rope_theta", dit.rope_theta, "must be > 1 (the RoPE base wavelength)")
  if config.text.get("pool", "mean") not in ("mean", "words", "words_sum"):
    _fail("text.pool", config.text.pool, "must be 'mean', 'words' or 'words_sum'")
  if config.text.get("pool", "mean") != "mean" and config.text.encoder != "trainable":
    _fail("text.pool", config.text.pool, f"bag-of-words pooling needs text.encoder='trainable', not "
          f"{config.text.encoder!r} (use text.pool='mean')")
  from sora_jax.models import rope as rope_lib  # noqa: PLC0415 (keeps config parsing import-light)
  if dit.get("abs_pos_kind", "axes") not in rope_lib.ABS_POS_KINDS:
    *rest, last = [repr(k) for k in rope_lib.ABS_POS_KINDS]
    _fail("dit.abs_pos_kind", dit.abs_pos_kind, f"must be {', '.join(rest)} or {last}")
  if config.text.max_len < 2:
    _fail("text.max_len", config.text.max_len, "must be at least 2 (BOS + one token)")
  from sora_jax.models import text as text_lib  # noqa: PLC0415 (keeps config parsing import-light)
  encoders = ("trainable", "class") + text_lib.PRETRAINED_TOKENIZERS
  if config.text.get("encoder", "trainable") not in encoders:
    _fail("text.encoder", config.text.encoder, f"choose one of {encoders}")
  if config.text.get("tokenizer", "bytes") not in text_lib.TOKENIZERS:
    _fail("text.tokenizer", config.text.tokenizer, f"choose one of {text_lib.TOKENIZERS}")
  if config.text.get("precomputed") and (config.text.get("encoder") not in text_lib.PRETRAINED_TOKENIZERS
                                         or config.text.get("trainable", False)):
    _fail("text.precomputed", config.text.precomputed,
          f"needs a frozen pretrained text.encoder (one of {text_lib.PRETRAINED_TOKENIZERS}, text.trainable "
          f"False), not {config.text.get('encoder')!r}" + (" (trainable)" if config.text.get("trainable") else ""))
  if config.train_dit.text_seq_len < config.text.max_len:
    _fail("train_dit.text_seq_len", config.train_dit.text_seq_len,
          f"must hold at least one caption of text.max_len={config.text.max_len} tokens")
  # Training schedules.
  for stage in ("train_vae", "train_dit"):
    for f in ("steps", "batch_size"):
      _positive(config, f"{stage}.{f}", allow_zero=(f == "steps"))
    _positive(config, f"{stage}.lr")
    if config[stage].warmup_steps < 0:
      _fail(f"{stage}.warmup_steps", config[stage].warmup_steps, "must be non-negative")
  if not 0.0 <= config.train_dit.ema_decay < 1.0:
    _fail("train_dit.ema_decay", config.train_dit.ema_decay, "must be in [0, 1)")
  if not 0.0 <= config.train_dit.caption_dropout <= 1.0:
    _fail("train_dit.caption_dropout", config.train_dit.caption_dropout, "must be in [0, 1]")
  cond = config.get("cond") or {}
  if cond.get("start_step", 0) < 0:
    _fail("cond.start_step", config.cond.start_step, "must be non-negative")
  from sora_jax.diffusion import masks  # noqa: PLC0415 (keeps config parsing import-light)
  for tag, name in dict(cond.get("tag_strategies") or {}).items():
    if name and name not in masks.STRATEGIES[1:]:
      _fail(f"cond.tag_strategies.{tag}", name,
            f"choose a frame-conditioning strategy from {masks.STRATEGIES[1:]}, or '' for the mix")
  conditioned = any(w > 0 for k, w in dict(cond.get("mask_ratios") or {}).items() if k != "none")
  if conditioned and 0 < config.train_dit.steps <= cond.get("start_step", 0):
    _fail("cond.start_step", config.cond.start_step,
          f"not before train_dit.steps={config.train_dit.steps}, so frame conditioning would never be trained "
          "(lower it, or set cond.mask_ratios to none only)")
  if not 0.0 <= config.train_dit.get("token_drop_rate", 0.0) < 1.0:
    _fail("train_dit.token_drop_rate", config.train_dit.token_drop_rate, "must be in [0, 1)")
  if config.train_dit.max_segments < 1:
    _fail("train_dit.max_segments", config.train_dit.max_segments, "must be at least 1")
  _positive(config, "sample.steps")
  from sora_jax.models import attention as attention_lib  # noqa: PLC0415 (keeps config parsing import-light)
  if config.attention not in attention_lib.BACKENDS:
    *rest, last = attention_lib.BACKENDS
    _fail("attention", config.attention, f"unknown backend; choose {', '.join(rest)} or {last}")
  if not math.isfinite(config.sample.guidance) or config.sample.guidance < 0:
    _fail("sample.guidance", config.sample.guidance, "must be a finite non-negative number")
