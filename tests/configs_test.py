"""Configs parse, validate, and bad ones fail with one line naming the field."""
import glob
import importlib.util
import os

import pytest

from configs import tiny_t2v
from sora_jax import configs_lib

ROOT = os.path.dirname(os.path.dirname(__file__))


def _load(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_every_config_validates(path, arg):
  mod = _load(path)
  if not hasattr(mod, "get_config"):
    pytest.skip("not a config")
  configs_lib.validate(mod.get_config(arg))
  assert "python -m sora_jax.main" in mod.__doc__


def test_parse_arg_types_and_errors():
  arg = configs_lib.parse_arg("runlocal,steps=10,lr=0.5,name=x", runlocal=False, steps=1, lr=1.0, name="")
  assert arg.runlocal is True and arg.steps == 10 and arg.lr == 0.5 and arg.name == "x"
  with pytest.raises(configs_lib.ConfigError, match="unknown name 'stepz'"):
    configs_lib.parse_arg("stepz=3", steps=1)
  with pytest.raises(configs_lib.ConfigError, match="steps: expected int"):
    configs_lib.parse_arg("steps=abc", steps=1)


@pytest.mark.parametrize("field,value,message", [
    ("mode", "trian_dit", r"config.mode='trian_dit': unknown mode"),
    ("train_dit.steps", -3, r"config.train_dit.steps=-3: must be non-negative"),
    ("train_vae.lr", 0.0, r"config.train_vae.lr=0.0: must be positive"),
    ("dit.patch_size", (1, 3, 3), r"config.data.sizes\[0\]=.*divide by VAE stride 4 x patch 3x3"),
    ("dit.patch_size", (2, 2, 2), r"config.dit.patch_size=\(2, 2, 2\): temporal patch 2 does not divide 5"),
    ("dit.num_heads", 5, r"config.dit.num_heads=5: must divide dit.width=144"),
    ("dit.rope_theta", 1.0, r"config.dit.rope_theta=1.0: must be > 1"),
    ("dit.scan_unroll", 0, r"config.dit.scan_unroll=0: must be positive"),
    ("dit.text_proj", True, r"config.dit.text_proj=True: projects the text for cross-attention, which this"),
    ("data.exit_fraction", 1.5, r"config.data.exit_fraction=1.5: must be in \[0, 1\]"),
    ("data.enter_fraction", 1.5, r"config.data.enter_fraction=1.5: must be in \[0, 1 - data.exit_fraction\]"),
    ("data.exit_depth", -0.5, r"config.data.exit_depth=-0.5: must be in \[0, 1\] \(a fraction of the shape's travel\)"),
    ("cond.tag_strategies.exits", "middle", r"config.cond.tag_strategies.exits='middle': choose a frame-conditioning"),
    ("text.pool", "max", r"config.text.pool='max': must be 'mean', 'words' or 'words_sum'"),
    ("cond.start_step", -1, r"config.cond.start_step=-1: must be non-negative"),
    ("cond.start_step", 2000, r"config.cond.start_step=2000: not before train_dit.steps=2000"),
    ("dit.abs_pos_kind", "diagonal",
     r"config.dit.abs_pos_kind=.diagonal.: must be .axes., .oblique., .fractional. or .fractional_space."),
    ("text.tokenizer", "bpe", r"config.text.tokenizer=.bpe.: choose one of \(.bytes., .words."),
    ("data.sizes", [(8, 32, 32)], r"frames must be 1 \+ 2\*k"),
    ("train_dit.seq_len", 16, r"config.train_dit.seq_len=16: shorter than the 80 tokens"),
    ("mesh", [("data", -1), ("fsdp", -1), ("context", 1), ("tensor", 1)], r"config.mesh=.*at most one -1"),
    ("attention", "flash", r"config.attention='flash': unknown backend"),
    ("train_dit.ema_decay", 1.0, r"config.train_dit.ema_decay=1.0: must be in \[0, 1\)"),
    ("vae.temporal_downsample", (True,), r"config.vae.temporal_downsample=\(True,\): needs one entry per"),
    ("vae.temporal_kernel", 2, r"config.vae.temporal_kernel=2: must be 1 or 3"),
    ("vae.layout", "wan", r"config.vae.layout='wan': 'wan' needs temporal_kernel=3 and head_norm=True"),
    ("vae.inference_dtype", "float16", r"config.vae.inference_dtype='float16': must be 'float32' or 'bfloat16'"),
    ("encode.chunk", -1, r"config.encode.chunk=-1: must be non-negative"),
    ("encode.tile", 18, r"config.encode.tile=18: must be a multiple of the VAE's spatial stride 4"),
])
def test_bad_field_is_named(field, value, message):
  config = tiny_t2v.get_config("variable=False")
  *parents, leaf = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(configs_lib.ConfigError, match=message) as e:
    configs_lib.validate(config)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["folder_t2v", "dit_wan1p3b"])
def test_configs_for_real_captions_cross_attend_to_them(name):
  # The demo feeds summed word embeddings through adaLN only; a config for real captions must not inherit
  # that (it drops word order and grows with caption length).
  c = _load(os.path.join(ROOT, "configs", f"{name}.py")).get_config(None)
  assert c.dit.cross_attention and c.text.pool == "mean"
  assert not tiny_t2v.get_config(None).dit.cross_attention


def test_demo_frame_conditioning_starts_halfway_through_its_dit_steps():
  assert tiny_t2v.get_config("dit_steps=3000").cond.start_step == 1500
  # It follows a later override of the step count (as --config.train_dit.steps=500 does) unless set itself.
  c = tiny_t2v.get_config(None)
  c.train_dit.steps = 500
  assert c.cond.start_step == 250
  c.cond.start_step = 100
  c.train_dit.steps = 800
  assert c.cond.start_step == 100
  for name in ("dit_wan1p3b", "dit_image", "dit_class_video"):
    assert _load(os.path.join(ROOT, "configs", f"{name}.py")).get_config(None).cond.start_step == 0


def test_wan1p3b_memory_and_attention_choices_follow_the_resolution():
  """480p keeps attention outputs through remat with splash's fused backward (the fastest estimate that fits);
  720p, where activations decide the largest DiT that fits, keeps full remat and two-kernel splash."""
  get = _load(os.path.join(ROOT, "configs", "dit_wan1p3b.py")).get_config
  c = get(None)
  assert (c.dit.remat, c.attention) == ("save_attention", "splash_fused")
  c = get("res=720p")
  assert (c.dit.remat, c.attention) == ("full", "auto")
  c = get("remat=dots,attention=cudnn")
  assert (c.dit.remat, c.attention) == ("dots", "cudnn")
  assert get("runlocal").attention == "auto"  # runs on a laptop's CPU
