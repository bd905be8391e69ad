"""The trainable caption encoder: each word must stay legible at its own position."""
import numpy as np
import pytest
from flax import nnx

from sora_jax.models import text as text_lib
from tests.conftest import one_device_dit_mesh
from tests.conftest import pack_captions


def _states(encoder, captions):
  """Per-caption states [n, len, D] of captions of equal token count, packed into one row."""
  toks = [text_lib.tokenize(c, 16, "words") for c in captions]
  states = np.asarray(encoder(*pack_captions(toks)))[0]
  return states.reshape(len(toks), len(toks[0]), -1)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_changed_word_changes_its_own_state_at_init(seed):
  # The DiT cross-attends to these states: if the context the blocks add swamps each token's own embedding,
  # every position carries the same caption average and the DiT cannot tell "left" from "right" (the demo
  # DiT never learnt direction while the embeddings started at 0.02 of the blocks' scale).
  with one_device_dit_mesh():
    encoder = text_lib.TextEncoder(vocab_size=text_lib.VOCAB_SIZES["words"], width=64, depth=2, num_heads=4,
                                   rngs=nnx.Rngs(seed))
    a, b = _states(encoder, ["a red circle moving left", "a red circle moving right"])
  word = 5  # BOS, a, red, circle, moving, left
  cos = np.sum(a[word] * b[word]) / (np.linalg.norm(a[word]) * np.linalg.norm(b[word]))
  assert cos < 0.5, cos
  # Positions before the word still see it through attention, but less than the word itself does.
  assert np.linalg.norm(a[word] - b[word]) > 2 * np.linalg.norm(a[1] - b[1])


def test_bag_of_words_gives_each_word_a_unit_scale_share():
  # text.pool='words': swapping one word moves the pooled vector by exactly the two embeddings' difference
  # over sqrt(caption length), and two captions packed in one row do not mix.
  with one_device_dit_mesh():
    encoder = text_lib.TextEncoder(vocab_size=text_lib.VOCAB_SIZES["words"], width=64, depth=1, num_heads=4,
                                   rngs=nnx.Rngs(0))
    toks = [text_lib.tokenize(c, 16, "words") for c in
            ["a red circle moving left", "a red circle moving right", "a blue square"]]
    tokens, seg, _ = pack_captions(toks, length=20)
    pooled = np.asarray(encoder.bag_of_words(tokens, seg, 4))[0]
    summed = np.asarray(encoder.bag_of_words(tokens, seg, 4, normalize=False))[0]
  embed = np.asarray(encoder.embed[...])
  word = 5  # BOS, a, red, circle, moving, left
  np.testing.assert_allclose(pooled[1] - pooled[0], (embed[toks[1][word]] - embed[toks[0][word]]) / np.sqrt(6),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pooled[2], embed[toks[2]].sum(0) / np.sqrt(len(toks[2])), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(pooled[3], 0.0)  # an empty segment
  np.testing.assert_allclose(summed[2], embed[toks[2]].sum(0), rtol=1e-5, atol=1e-5)  # text.pool='words_sum'
