"""Device mesh, logical-axis rules and activation constraints.

Weights and activations carry logical axis names; ordered rules map them to the mesh axes
`('data', 'fsdp', 'context', 'tensor')`. Activation names ('act_*') are kept apart from weight names so a
rule change for one never moves the other.
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.experimental import layout as layout_lib
from jax.sharding import NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "context", "tensor")
BATCH = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes

# DiT and text encoder: FSDP over the embedding dimension of every weight, tensor parallel over heads / MLP.
DIT_RULES = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", None),
    ("patch", None),
    ("cond", None),
    ("layers", None),
    ("norm", None),
    ("act_batch", BATCH),
    ("act_len", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_text_len", None),
    ("act_segments", None),
)

# VAE: convolution channels are sharded FSDP-style on the output channel; activations shard on batch.
VAE_RULES = (
    ("conv_kt", None),
    ("conv_kh", None),
    ("conv_kw", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("act_batch", BATCH),
    ("act_time", None),
    ("act_height", "context"),
    ("act_width", None),
    ("act_channels", None),
)


def mesh_shape(spec: Sequence[tuple[str, int]], num_devices: int) -> tuple[int, ...]:
  """Resolves `[(name, size)]` with at most one -1 into concrete sizes for `num_devices`."""
  names = tuple(n for n, _ in spec)
  if names != AXES:
    raise ValueError(f"mesh axes must be {AXES}, got {names}")
  sizes = [int(s) for _, s in spec]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh {list(spec)}: {num_devices} devices do not divide by the fixed sizes ({known})")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {list(spec)} needs {math.prod(sizes)} devices, have {num_devices}")
  return tuple(sizes)


def make_mesh(spec: Sequence[tuple[str, int]], devices=None) -> jax.sharding.Mesh:
  """A mesh with Auto axis types (plain jit sharding propagation) from a config spec."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(spec, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


@contextlib.contextmanager
def use(mesh: jax.sharding.Mesh, rules):
  """Makes `mesh` and logical `rules` current: models built inside get sharded variables."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    yield


def target_platform() -> str:
  """Platform being compiled for: the context mesh's devices (a TPU topology when compiling ahead of time
  on a CPU host), else the default backend."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def pin_row_major(x: jax.Array) -> jax.Array:
  """Pins x's layout, and through the constraint's transpose rule its cotangent's, to row-major.

  On XLA:CPU the constraint also keeps x a buffer of its own: elementwise producers are not fused into
  (and recomputed by) its consumers. Callers use it only when compiling for CPU (`target_platform()`).
  """
  return layout_lib.with_layout_constraint(x, layout_lib.Layout(tuple(range(x.ndim))))


def logical_to_spec(names: Sequence[str | None], rules) -> P:
  table = dict(rules)
  return P(*(table.get(n) if n is not None else None for n in names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrains an activation by logical names under the current rules; a no-op without a mesh."""
  ctx_rules = spmd.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not ctx_rules or mesh is None or mesh.empty:
    return x
  spec = logical_to_spec(names, ctx_rules)
  return jax.lax.with_sharding_constraint(x, spec)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
  """Sharding of a host batch: leading axis over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def global_batch(batch, mesh: jax.sharding.Mesh):
  """Assembles process-local numpy arrays into global jax arrays sharded on the batch axis."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return jax.tree.map(put, batch)


def state_shardings(abstract_state, mesh, rules):
  """NamedShardings for an abstract nnx.State from its variables' logical annotations."""
  with use(mesh, rules):
    return nnx.get_named_sharding(abstract_state, mesh)
