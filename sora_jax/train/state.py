"""Functional train state: created sharded, stepped by pure jitted functions, saved by orbax.

The NNX model is split once into a graphdef (static structure) and states; the step merges, computes and
splits again. Params are `nnx.Param`; everything else (latent statistics, ...) is `rest`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from sora_jax.parallel import mesh as mesh_lib


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any           # nnx.State of nnx.Param
  rest: Any             # nnx.State of all other variables
  opt_state: Any
  ema: Any = None       # EMA of params (None when disabled)


@dataclasses.dataclass
class Created:
  graphdef: Any
  state: TrainState
  shardings: TrainState


def _initializer(make_model, tx, seed: int, ema: bool):
  def init():
    model = make_model(nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                                opt_state=tx.init(params), ema=params if ema else None)
  return init


def abstract(make_model: Callable[[nnx.Rngs], nnx.Module], tx: optax.GradientTransformation, *, seed: int,
             mesh, rules, ema: bool) -> Created:
  """The TrainState as ShapeDtypeStructs carrying their shardings on `mesh`; allocates nothing.

  `create` builds from it; tools/aot_compile.py compiles for hardware that is not attached from it.
  """
  with mesh_lib.use(mesh, rules):
    graphdef, shapes = nnx.eval_shape(_initializer(make_model, tx, seed, ema))  # graphdef is static
  # Concrete shardings on `mesh` (eval_shape reports them on the abstract mesh).
  shardings = jax.tree.map(
      lambda x: jax.sharding.NamedSharding(mesh, getattr(getattr(x, "sharding", None), "spec", None)
                                           or jax.sharding.PartitionSpec()), shapes)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  return Created(graphdef=graphdef, state=state, shardings=shardings)


def create(make_model: Callable[[nnx.Rngs], nnx.Module], tx: optax.GradientTransformation, *, seed: int,
           mesh, rules, ema: bool) -> Created:
  """Builds a TrainState directly in its sharded layout (eval_shape -> shardings -> jit(init))."""
  created = abstract(make_model, tx, seed=seed, mesh=mesh, rules=rules, ema=ema)
  init = _initializer(make_model, tx, seed, ema)
  with mesh_lib.use(mesh, rules):
    state = jax.jit(lambda: init()[1], out_shardings=created.shardings)()
  return dataclasses.replace(created, state=state)


def num_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def model_from(graphdef, params, rest) -> nnx.Module:
  return nnx.merge(graphdef, params, rest)
