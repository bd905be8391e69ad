"""Spacetime patches and NaViT-style packing of variable-size samples into fixed-length rows.

A latent video [T', H', W', C] becomes `tokens [N, pt*ph*pw*C]` and `coords [N, 3]`; samples of any size
are packed best-fit into rows of L video tokens and Lt text tokens (grain's BestFitPackIterDataset). The
per-sample tables (`grid`, `labels`, `index`) are packed as features of length S, so a row holds at most S
segments and table row k belongs to segment id k + 1 (grain numbers segments in insertion order).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import einops
import grain
import numpy as np
from grain import experimental as grain_exp

# Keys of a packed batch; see docs/ARCHITECTURE.md.
SEQUENCE_KEYS = ("tokens", "coords", "text")
TABLE_KEYS = ("grid", "labels", "index", "given")


def patchify(latent: np.ndarray, patch: Sequence[int]):
  """latent [T, H, W, C] -> tokens [N, pt*ph*pw*C], coords [N, 3] (t, h, w), grid (nt, nh, nw)."""
  pt, ph, pw = patch
  t, h, w, c = latent.shape
  if t % pt or h % ph or w % pw:
    raise ValueError(f"latent shape {latent.shape[:3]} does not divide by patch size {tuple(patch)}")
  grid = (t // pt, h // ph, w // pw)
  tokens = einops.rearrange(latent, "(t pt) (h ph) (w pw) c -> (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)
  coords = np.stack(np.meshgrid(*[np.arange(n) for n in grid], indexing="ij"), axis=-1).reshape(-1, 3)
  return tokens, coords.astype(np.int32), np.asarray(grid, np.int32)


def unpatchify(tokens, grid: Sequence[int], patch: Sequence[int], channels: int):
  """Inverse of `patchify` for one sample: tokens [N, P] (N = prod(grid)) -> latent [T, H, W, C]."""
  nt, nh, nw = (int(g) for g in grid)
  pt, ph, pw = patch
  return einops.rearrange(tokens[: nt * nh * nw], "(t h w) (pt ph pw c) -> (t pt) (h ph) (w pw) c",
                          t=nt, h=nh, w=nw, pt=pt, ph=ph, pw=pw, c=channels)


def drop_tokens(tokens: np.ndarray, coords: np.ndarray, rate: float, rng: np.random.Generator):
  """NaViT token dropping: keeps a random subset of round((1 - rate) * N) tokens (at least one).

  Coordinates travel with their tokens, so RoPE still places every kept token in its grid; the order is
  kept, which keeps rows deterministic for a given rng.
  """
  if rate <= 0:
    return tokens, coords
  if not 0 <= rate < 1:
    raise ValueError(f"token drop rate must be in [0, 1), got {rate}")
  n = len(tokens)
  keep = max(1, int(round((1.0 - rate) * n)))
  idx = np.sort(rng.choice(n, size=keep, replace=False))
  return tokens[idx], coords[idx]


def num_tokens(latent_shape: Sequence[int], patch: Sequence[int]) -> int:
  return int(np.prod([s // p for s, p in zip(latent_shape[:3], patch)]))


def sample_features(tokens, coords, grid, text, labels, index, text_states=None, text_pooled=None,
                    given: int = -1) -> dict:
  """One sample's features in the layout the packer expects (tables as length-1 sequences).

  `given`: the frame-conditioning strategy this sample always trains with (an index into
  `sora_jax.diffusion.masks.STRATEGIES`), or -1 to draw one from `cond.mask_ratios`.

  `text_states` [n, D] and `text_pooled` [D]: precomputed text embeddings (`text_embeddings`), packed as a
  text-length sequence next to `text` and as a table.
  """
  out = {
      "tokens": np.asarray(tokens, np.float32),
      "coords": np.asarray(coords, np.int32),
      "text": np.asarray(text, np.int32),
      "grid": np.asarray(grid, np.int32)[None],
      "labels": np.asarray(labels, np.int32)[None],
      "index": np.asarray([index], np.int32)[None],
      "given": np.asarray([given], np.int32)[None],
  }
  if text_states is not None:
    if len(text_states) != len(out["text"]):
      raise ValueError(f"text states of {len(text_states)} tokens for a caption of {len(out['text'])} tokens")
    out["text_states"] = np.asarray(text_states, np.float32)
    out["text_pooled"] = np.asarray(text_pooled, np.float32)[None]
  return out


def pack(ds: grain.IterDataset, *, seq_len: int, text_seq_len: int, max_segments: int,
         num_packing_bins: int, seed: int = 0, shuffle_bins: bool = True,
         text_states: bool = False) -> grain.IterDataset:
  """Best-fit packs per-sample features into rows; returns a dataset of packed rows (see ARCHITECTURE).

  `text_states`: the samples carry precomputed `text_states` / `text_pooled` (see `sample_features`).
  """
  lengths = {"tokens": seq_len, "coords": seq_len, "text": text_seq_len,
             "grid": max_segments, "labels": max_segments, "index": max_segments, "given": max_segments}
  if text_states:
    lengths.update(text_states=text_seq_len, text_pooled=max_segments)
  packed = grain_exp.BestFitPackIterDataset(
      ds, length_struct=lengths, num_packing_bins=num_packing_bins, seed=seed, shuffle_bins=shuffle_bins)
  return packed.map(_finish_row)


def _finish_row(row: dict) -> dict:
  """Keeps one segment-id array per sequence kind and the text positions; drops the redundant ones."""
  out = {
      "tokens": row["tokens"],
      "tokens_segment_ids": row["tokens_segment_ids"].astype(np.int32),
      "coords": row["coords"],
      "text": row["text"],
      "text_segment_ids": row["text_segment_ids"].astype(np.int32),
      "text_positions": row["text_positions"].astype(np.int32),
      "grid": row["grid"],
      "grid_segment_ids": row["grid_segment_ids"].astype(np.int32),
      "labels": row["labels"],
      "index": row["index"][:, 0],
      "given": row["given"][:, 0],
  }
  if "text_states" in row:  # same positions as `text`: the packer places both features of a sample alike
    out.update(text_states=row["text_states"], text_pooled=row["text_pooled"])
  return out


def pack_list(samples: Iterable[dict], *, seq_len: int, text_seq_len: int, max_segments: int,
              text_states: bool = False) -> list[dict]:
  """Packs a finite list of `sample_features` dicts into rows, in a deterministic order (sampling, eval)."""
  samples = list(samples)
  ds = grain.MapDataset.source(samples).to_iter_dataset()
  return list(pack(ds, seq_len=seq_len, text_seq_len=text_seq_len, max_segments=max_segments,
                   num_packing_bins=max(1, len(samples)), shuffle_bins=False, text_states=text_states))


def stack_rows(rows: Sequence[dict], batch_size: int | None = None) -> dict:
  """Stacks packed rows into a batch, padding with empty rows up to `batch_size`."""
  rows = list(rows)
  if batch_size is not None and len(rows) < batch_size:
    empty = {k: np.zeros_like(v) for k, v in rows[0].items()}
    rows += [empty] * (batch_size - len(rows))
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def packing_stats(batch: dict) -> dict:
  """Real-token fraction and segments per row of a packed batch."""
  seg = np.asarray(batch["tokens_segment_ids"])
  return {
      "real_token_fraction": float((seg > 0).mean()),
      "segments_per_row": float((np.asarray(batch["grid_segment_ids"]) > 0).sum(-1).mean()),
  }
