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
