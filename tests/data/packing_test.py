"""Patchify/unpatchify, best-fit packing contract, token dropping, size policies."""
import numpy as np
import pytest

from sora_jax.data import packing
from sora_jax.data import sizes


def test_patchify_roundtrip_and_coords():
  lat = np.random.default_rng(0).standard_normal((3, 4, 6, 2)).astype(np.float32)
  tokens, coords, grid = packing.patchify(lat, (1, 2, 2))
  assert tokens.shape == (3 * 2 * 3, 8) and tuple(grid) == (3, 2, 3)
  np.testing.assert_array_equal(coords[4], [0, 1, 1])
  # Token k holds the patch at its coords.
  t, h, w = coords[7]
  np.testing.assert_array_equal(tokens[7].reshape(2, 2, 2), lat[t, 2 * h:2 * h + 2, 2 * w:2 * w + 2])
  np.testing.assert_array_equal(packing.unpatchify(tokens, grid, (1, 2, 2), 2), lat)
  with pytest.raises(ValueError, match=r"latent shape \(3, 4, 5\) does not divide by patch size \(1, 2, 2\)"):
    packing.patchify(lat[:, :, :5], (1, 2, 2))


def _features(n_tokens, n_text, index):
  return packing.sample_features(np.full((n_tokens, 3), index, np.float32), np.zeros((n_tokens, 3), np.int32),
                                 [1, 1, n_tokens], np.arange(n_text) + 1, np.full(6, index), index,
                                 given=index % 3 - 1)


def test_packed_rows_keep_every_sample_whole_and_tables_aligned():
  samples = [_features(n, t, i) for i, (n, t) in enumerate([(10, 5), (3, 9), (20, 4), (7, 7), (1, 2), (12, 3)])]
  rows = packing.pack_list(samples, seq_len=24, text_seq_len=16, max_segments=3)
  seen = []
  for r in rows:
    for s in range(3):
      if r["grid_segment_ids"][s] == 0:
        continue
      idx = int(r["index"][s])
      seen.append(idx)
      sel = r["tokens_segment_ids"] == s + 1
      assert sel.sum() == r["grid"][s, 2] == len(samples[idx]["tokens"])
      assert np.all(r["tokens"][sel] == idx)  # the table row belongs to the segment's tokens
      assert (r["text_segment_ids"] == s + 1).sum() == len(samples[idx]["text"])
      np.testing.assert_array_equal(r["labels"][s], np.full(6, idx))
      assert r["given"][s] == idx % 3 - 1
    assert np.all(r["tokens"][r["tokens_segment_ids"] == 0] == 0)
    assert (r["grid_segment_ids"] > 0).sum() <= 3
  assert sorted(seen) == list(range(6))


def test_token_dropping_keeps_coords_with_tokens():
  lat = np.arange(4 * 4 * 4 * 1, dtype=np.float32).reshape(4, 4, 4, 1)
  tokens, coords, _ = packing.patchify(lat, (1, 1, 1))
  kept_t, kept_c = packing.drop_tokens(tokens, coords, 0.75, np.random.default_rng(0))
  assert len(kept_t) == 16
  for tok, (t, h, w) in zip(kept_t, kept_c):
    assert tok[0] == lat[t, h, w, 0]
  assert packing.drop_tokens(tokens, coords, 0.0, np.random.default_rng(0))[0] is tokens
  assert len(packing.drop_tokens(tokens[:1], coords[:1], 0.9, np.random.default_rng(0))[0]) == 1
  with pytest.raises(ValueError, match="token drop rate must be in"):
    packing.drop_tokens(tokens, coords, 1.0, np.random.default_rng(0))


def test_size_policies_keep_aspect_and_divisibility():
  grid = sizes.Grid(temporal_stride=4, spatial_stride=8, patch=(1, 2, 2))
  assert grid.round(121, 720, 1280) == (121, 720, 1280)
  assert grid.round(10, 100, 50) == (9, 96, 48)
  f, h, w = sizes.native_size((121, 720, 1280), grid, max_tokens=8192)
  assert grid.tokens(f, h, w) <= 8192 and h % 16 == 0 and w % 16 == 0 and (f - 1) % 4 == 0
  assert abs(w / h - 1280 / 720) < 0.1
  rng = np.random.default_rng(0)
  for _ in range(50):
    f, h, w = sizes.random_size((33, 480, 640), grid, rng, min_side=128, max_side=256, min_frames=1,
                                max_frames=17)
    assert 112 <= min(h, w) <= 256 and f <= 17 and (f - 1) % 4 == 0 and abs(w / h - 4 / 3) < 0.15
  assert sizes.native_size((1, 64, 64), grid, max_tokens=100) == (1, 64, 64)


def test_pipeline_token_dropping_is_deterministic_and_consistent():
  from sora_jax.data import pipeline
  lat = np.random.default_rng(0).standard_normal((3, 4, 4, 2)).astype(np.float32)
  example = {"latent": lat, "caption": "a red circle", "labels": np.zeros(6, np.int32), "source_id": 3}
  fn = pipeline.LatentToFeatures((1, 2, 2), 16, 0.0, "words", None, 0.5)
  a = fn.random_map(example, np.random.default_rng(1))
  b = fn.random_map(example, np.random.default_rng(1))
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert len(a["tokens"]) == 6 and tuple(a["grid"][0]) == (3, 2, 2)  # the grid keeps the full sample size
  full, coords, _ = packing.patchify(lat, (1, 2, 2))
  for tok, c in zip(a["tokens"], a["coords"]):
    k = int(np.flatnonzero((coords == c).all(-1))[0])
    np.testing.assert_array_equal(tok, full[k])


def test_tags_pick_the_strategy_a_sample_always_trains_with():
  from configs import tiny_t2v  # noqa: PLC0415
  from sora_jax.data import pipeline  # noqa: PLC0415
  from sora_jax.diffusion import masks  # noqa: PLC0415
  config = tiny_t2v.get_config("runlocal")
  assert pipeline.tag_strategies(config) == ()  # the default: tagged clips train like any other
  config.cond.tag_strategies = {"exits": "prefix", "cut": "first"}
  table = pipeline.tag_strategies(config)
  assert dict(table) == {"exits": masks.STRATEGIES.index("prefix"), "cut": masks.STRATEGIES.index("first")}
  assert pipeline.given_strategy("", table) == -1
  assert pipeline.given_strategy("night, cut", table) == masks.STRATEGIES.index("first")
  assert pipeline.given_strategy(b"exits,cut", table) == masks.STRATEGIES.index("prefix")  # the clip's first
  assert pipeline.given_strategy("cut,exits", table) == masks.STRATEGIES.index("first")
  assert pipeline.given_strategy("exit", table) == -1  # whole tags only
  example = {"latent": np.zeros((3, 4, 4, 16), np.float32), "caption": "a red circle", "labels": np.zeros(6),
             "source_id": 5, "tags": "exits"}
  rng = np.random.default_rng(0)
  assert pipeline.latent_to_features(config).random_map(example, rng)["given"][0, 0] == dict(table)["exits"]
  assert pipeline.latent_to_features(config, train=False).random_map(example, rng)["given"][0, 0] == -1
