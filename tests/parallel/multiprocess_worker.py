"""One process of the multi-process test: a few DiT steps on a fixed packed batch, results to a .npz.

  python -m tests.parallel.multiprocess_worker OUT.npz NUM_LOCAL_DEVICES [DISTRIBUTED_FLAG]
"""
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("XLA_FLAGS", None)  # the device count comes from jax_num_cpu_devices below

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import tiny_t2v  # noqa: E402
from sora_jax.parallel import distributed  # noqa: E402
from sora_jax.parallel import mesh as mesh_lib  # noqa: E402
from sora_jax.train import train_dit  # noqa: E402

STEPS = 3


def packed_batch(config, batch_size):
  """A deterministic packed batch: two clips per row (4x4 and 2x4 patch grids) plus padding."""
  rng = np.random.default_rng(0)
  L, Lt, S = config.train_dit.seq_len, config.train_dit.text_seq_len, config.train_dit.max_segments
  grids = [(1, 4, 4), (1, 2, 4)]
  seg, coords, text_seg, pos = (np.zeros((L,), np.int32), np.zeros((L, 3), np.int32),
                                np.zeros((Lt,), np.int32), np.zeros((Lt,), np.int32))
  start = tstart = 0
  for i, g in enumerate(grids):
    n = int(np.prod(g))
    seg[start:start + n] = i + 1
    coords[start:start + n] = np.stack(np.meshgrid(*map(np.arange, g), indexing="ij"), -1).reshape(-1, 3)
    text_seg[tstart:tstart + 6], pos[tstart:tstart + 6] = i + 1, np.arange(6)
    start, tstart = start + n, tstart + 6
  grid = np.zeros((S, 3), np.int32)
  grid[:2] = grids
  tile = lambda x: np.repeat(x[None], batch_size, 0)
  p = 4 * config.vae.latent_channels
  return {"tokens": rng.standard_normal((batch_size, L, p)).astype(np.float32) * (seg > 0)[None, :, None],
          "tokens_segment_ids": tile(seg), "coords": tile(coords),
          "text": rng.integers(2, 258, (batch_size, Lt)).astype(np.int32) * (text_seg > 0),
          "text_segment_ids": tile(text_seg), "text_positions": tile(pos), "grid": tile(grid),
          "grid_segment_ids": tile((np.arange(S) < 2).astype(np.int32) * np.arange(1, S + 1, dtype=np.int32))}


def main(out, num_local_devices, flag="off"):
  jax.config.update("jax_num_cpu_devices", int(num_local_devices))
  jax.config.update("jax_disable_most_optimizations", True)
  distributed.initialize(flag)
  config = tiny_t2v.get_config("runlocal")
  config.mesh = [("data", 2), ("fsdp", -1), ("context", 1), ("tensor", 1)]
  config.train_dit.update(batch_size=jax.device_count(), seq_len=32, text_seq_len=16)
  mesh = mesh_lib.make_mesh(config.mesh)
  created, tx = train_dit.create(config, mesh)
  # Each process feeds only its own rows, as the data pipeline does.
  n, i = jax.process_count(), jax.process_index()
  local = jax.tree.map(lambda x: np.split(x, n)[i], packed_batch(config, config.train_dit.batch_size))
  state, losses = created.state, []
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    step = train_dit.make_train_step(config, created.graphdef, tx, created.shardings)
    for _ in range(STEPS):
      state, metrics = step(state, mesh_lib.global_batch(local, mesh))
      losses.append(float(metrics["loss"]))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  params = multihost_utils.process_allgather(state.params, tiled=True)
  if i == 0:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    np.savez(out, losses=np.asarray(losses), devices=jax.device_count(), processes=n,
             **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})


if __name__ == "__main__":
  main(*sys.argv[1:])
