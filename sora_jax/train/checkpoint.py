"""The one checkpoint helper: orbax CheckpointManager with a composite per step.

Each step stores `state` (the sharded train state, an orbax PyTree item), `config` (JSON) and, when a data iterator
is given, `data` (the grain iterator state), so a resumed run continues with exactly the same batches.
Saves are asynchronous; `wait()` before reading a checkpoint back or exiting. A restore reads only what its
target asks for: leaves set to `SKIP` are not read (sampling needs the weights, not the optimizer's moments),
and a leaf whose target dtype differs from the stored one is cast as it is read.
"""
from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

# A leaf of a restore target that is not read (orbax's placeholder); it comes back as `SKIP`.
SKIP = ocp.PLACEHOLDER


def skip(tree):
  """`tree` with every leaf replaced by `SKIP`: a subtree of a restore target that is not read."""
  return jax.tree.map(lambda _: SKIP, tree)


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 2, save_every: int = 1000, async_save: bool = True):
    self.directory = os.path.abspath(os.path.expanduser(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                           enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self.save_every = save_every

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, *, config: dict | None = None, data_iter=None, force: bool = False) -> bool:
    """Saves at multiples of save_every (or when forced); returns whether a save started."""
    if not force and (self.save_every <= 0 or step % self.save_every):
      return False
    if step in self.manager.all_steps():
      return False
    items = {"state": ocp.args.PyTreeSave(state)}
    if config is not None:
      items["config"] = ocp.args.JsonSave(config)
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return True

  def restore(self, abstract_state, *, step: int | None = None, data_iter=None) -> tuple[Any, int]:
    """Restores `state` with the shardings and dtypes of `abstract_state` (arrays or ShapeDtypeStructs;
    `SKIP` leaves are not read) and the iterator in place."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(lambda x: x if x is SKIP else ocp.utils.to_shape_dtype_struct(x), abstract_state)
    restore_args = jax.tree.map(
        lambda x: x if x is SKIP else ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), abstract)
    items = {"state": ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], step

  def restore_config(self, step: int | None = None) -> dict:
    step = self.manager.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
