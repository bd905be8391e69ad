r"""Packing efficiency: sora_jax best-fit packing vs padding to the longest vs Open-Sora-style buckets.

  python tools/bench_packing.py [--samples=4000] [--seq_len=32768] [--throughput_steps=6]

The mixed distribution (stated, seeded): aspect ratios 16:9, 9:16, 4:3, 1:1 and 2.35:1; short side uniform
in 128..512 px; 30% images, the rest videos of 1 frame to 5 s at 24 fps; VAE 4x8x8, patch 1x2x2; sizes by
the `native` policy under a budget of `seq_len` tokens per sample.

Real-token fractions:
- (a) packing: real tokens / row slots, rows of `seq_len` filled by grain's best-fit packer;
- (b) padding: batches of `pad_batch` samples each padded to the longest sample of the batch;
- (c) buckets (Open-Sora style): each sample snapped down to the largest bucket (resolution x frames x
  aspect) that fits it and batched with its bucket at floor(seq_len / bucket tokens) samples per batch;
  the fraction counts the batch's unfilled budget and the content lost by snapping down.
Throughput: the real DiT train step on packed rows vs padded batches, on the same distribution scaled down
by `--scale` in tokens so it runs on a CPU; real tokens per second, ratio (a) / (b), side by side.
The last line is one JSON object.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402

from sora_jax.data import packing, sizes  # noqa: E402

FLAGS = flags.DEFINE_integer("samples", 4000, "samples drawn from the mixed distribution")
_SEQ = flags.DEFINE_integer("seq_len", 32768, "tokens per packed row (and per-sample budget)")
_PAD_BATCH = flags.DEFINE_integer("pad_batch", 8, "samples per padded batch")
_STEPS = flags.DEFINE_integer("throughput_steps", 6, "timed train steps per method (0 skips throughput)")
_BINS = flags.DEFINE_integer("bins", 64, "best-fit packing bins (rows open at once)")
_SCALE = flags.DEFINE_integer("scale", 32, "token down-scaling of the distribution for the throughput run")

ASPECTS = (16 / 9, 9 / 16, 4 / 3, 1.0, 2.35)
GRID = sizes.Grid(temporal_stride=4, spatial_stride=8, patch=(1, 2, 2))
BUCKET_SIDES = (144, 240, 360, 480)
BUCKET_FRAMES = (1, 17, 33, 49, 65, 97, 121)


def draw(n: int, seed: int = 0):
  """Native (frames, height, width) per sample, then the `native` policy under the token budget."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    aspect = ASPECTS[rng.integers(len(ASPECTS))]
    short = rng.uniform(128, 512)
    h, w = (short, short * aspect) if aspect >= 1 else (short / aspect, short)
    frames = 1 if rng.random() < 0.3 else int(rng.integers(1, 121 + 1))
    out.append(sizes.native_size((frames, h, w), GRID, max_tokens=_SEQ.value))
  return out


def packed_fraction(token_counts, seq_len):
  import grain
  feats = [{"tokens": np.zeros((n, 1), np.float32)} for n in token_counts]
  ds = grain.MapDataset.source(feats).to_iter_dataset()
  rows = list(grain.experimental.BestFitPackIterDataset(ds, length_struct={"tokens": seq_len},
                                                        num_packing_bins=_BINS.value, shuffle_bins=False))
  real = sum(int((r["tokens_segment_ids"] > 0).sum()) for r in rows)
  return real / (len(rows) * seq_len), len(rows)


def padded_fraction(token_counts, batch):
  real = total = 0
  for i in range(0, len(token_counts) - batch + 1, batch):
    chunk = token_counts[i:i + batch]
    real += sum(chunk)
    total += batch * max(chunk)
  return real / total


def bucket_of(size):
  """Largest bucket not larger than the sample in any dimension, keeping its aspect class."""
  f, h, w = size
  aspect = w / h
  side = max([s for s in BUCKET_SIDES if s <= min(h, w)] or [BUCKET_SIDES[0]])
  bh, bw = (side, side * aspect) if aspect >= 1 else (side / aspect, side)
  bf = max(b for b in BUCKET_FRAMES if b <= f)
  return GRID.round(bf, bh, bw)


def bucketed_fraction(sample_sizes, seq_len):
  buckets = {}
  lost = kept = 0
  for s in sample_sizes:
    b = bucket_of(s)
    buckets.setdefault(b, 0)
    buckets[b] += 1
    kept += min(GRID.tokens(*b), GRID.tokens(*s))
    lost += max(0, GRID.tokens(*s) - GRID.tokens(*b))
  slots = used = 0
  for b, count in buckets.items():
    t = GRID.tokens(*b)
    per_batch = max(1, seq_len // t)
    batches = math.ceil(count / per_batch)
    slots += batches * max(seq_len, t)
    used += count * t
  return (used / slots) * (kept / (kept + lost)), len(buckets)


def throughput(sample_sizes):
  """Real tokens/s of the DiT train step: packed rows vs batches padded to their longest sample."""
  import jax
  from configs import tiny_t2v
  from sora_jax.models import text as text_lib
  from sora_jax.parallel import mesh as mesh_lib
  from sora_jax.train import train_dit

  scale = _SCALE.value
  L = _SEQ.value // scale
  rng = np.random.default_rng(1)
  # Scale the token grid: keep frames, shrink area (tokens / scale), at least one patch.
  small = []
  for f, h, w in sample_sizes:
    s = math.sqrt(1 / scale)
    small.append(GRID.round(f, max(16, h * s), max(16, w * s)))
  small = [s for s in small if GRID.tokens(*s) <= L]
  caption = text_lib.tokenize("a large red circle moving left on a gray background", 64)

  def features(size, index):
    lt = 1 + (size[0] - 1) // 4
    lat = rng.standard_normal((lt, size[1] // 8, size[2] // 8, 4)).astype(np.float32)
    tok, coords, grid = packing.patchify(lat, (1, 2, 2))
    return packing.sample_features(tok, coords, grid, caption, np.zeros(6), index)

  results = {}
  mesh = mesh_lib.make_mesh([("data", -1), ("fsdp", 1), ("context", 1), ("tensor", 1)])
  for method in ("packed", "padded"):
    # The layout experiments/packing/README.md measured: cross-attention to the caption, RoPE only.
    config = tiny_t2v.use_standard_schedule(tiny_t2v.use_cross_attention(tiny_t2v.get_config("")))
    config.attention = "blockwise"
    config.dit.update(width=96, depth=2, num_heads=2)
    config.text.update(width=64, depth=1, num_heads=2)
    rows_per_batch = 2
    feats = [features(s, i) for i, s in enumerate(small[:400])]
    if method == "packed":
      config.train_dit.update(seq_len=L, text_seq_len=16 * 64, max_segments=16, batch_size=rows_per_batch)
      rows = packing.pack_list(feats, seq_len=L, text_seq_len=16 * 64, max_segments=16)
      batches = [packing.stack_rows(rows[i:i + rows_per_batch]) for i in range(0, len(rows) - rows_per_batch + 1,
                                                                              rows_per_batch)]
    else:
      # Same samples, `pad_batch` per batch, each row one sample padded to the batch's longest (x128).
      batches = []
      for i in range(0, len(feats) - _PAD_BATCH.value + 1, _PAD_BATCH.value):
        chunk = feats[i:i + _PAD_BATCH.value]
        longest = -(-max(len(f["tokens"]) for f in chunk) // 128) * 128
        rows = packing.pack_list(chunk, seq_len=longest, text_seq_len=64, max_segments=1)
        batches.append(packing.stack_rows(rows))
      config.train_dit.update(max_segments=1)
    created, tx = train_dit.create(config, mesh)
    state = created.state
    done_tokens = 0
    elapsed = 0.0
    compiled = {}
    with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
      for b in batches[:_STEPS.value]:
        key = b["tokens"].shape
        if key not in compiled:  # compile (and warm) each shape outside the timing
          config.train_dit.update(seq_len=key[1], batch_size=key[0])
          compiled[key] = train_dit.make_train_step(config, created.graphdef, tx, created.shardings)
          state, m = compiled[key](state, mesh_lib.global_batch(b, mesh))
          jax.block_until_ready(m)
        t0 = time.perf_counter()
        state, m = compiled[key](state, mesh_lib.global_batch(b, mesh))
        jax.block_until_ready(m)
        elapsed += time.perf_counter() - t0
        done_tokens += int((b["tokens_segment_ids"] > 0).sum())
    results[method] = done_tokens / elapsed
    print(f"throughput {method}: {results[method]:.0f} real tokens/s over {min(len(batches), _STEPS.value)} steps")
  return results


def main(_):
  sample_sizes = draw(FLAGS.value)
  counts = [GRID.tokens(*s) for s in sample_sizes]
  print(f"{len(counts)} samples: tokens min {min(counts)} median {int(np.median(counts))} max {max(counts)}; "
        f"images {sum(s[0] == 1 for s in sample_sizes)}")
  a, rows = packed_fraction(counts, _SEQ.value)
  b = padded_fraction(counts, _PAD_BATCH.value)
  c, nb = bucketed_fraction(sample_sizes, _SEQ.value)
  print(f"(a) packing: {a:.4f} real tokens in {rows} rows of {_SEQ.value}")
  print(f"(b) padding to the longest of {_PAD_BATCH.value}: {b:.4f}")
  print(f"(c) {nb} buckets: {c:.4f}")
  out = {"real_token_fraction": a, "padded_fraction": b, "bucketed_fraction": c, "samples": len(counts),
         "seq_len": _SEQ.value}
  if _STEPS.value:
    tp = throughput(sample_sizes)
    out.update(packed_real_tokens_per_s=tp["packed"], padded_real_tokens_per_s=tp["padded"],
               throughput_ratio_vs_padded=tp["packed"] / tp["padded"])
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
