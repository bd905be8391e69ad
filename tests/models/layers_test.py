"""Dense layer: the CPU path (layout pins, the weight-gradient rule) changes neither values nor derivatives."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax.models import layers
from sora_jax.parallel import mesh as mesh_lib


@pytest.fixture
def mesh():
  m = mesh_lib.make_mesh([(a, 1) for a in mesh_lib.AXES], devices=jax.devices()[:1])
  with mesh_lib.use(m, mesh_lib.DIT_RULES):
    yield m


@pytest.mark.parametrize("in_features,out_features", [(6, 10), ((3, 4), (2, 5))])
def test_pinned_dense_matches_einsum_in_value_gradient_and_jvp(mesh, in_features, out_features):
  in_shape = (in_features,) if isinstance(in_features, int) else in_features
  out_shape = (out_features,) if isinstance(out_features, int) else out_features
  dense = layers.Dense(in_features, out_features, (None,) * (len(in_shape) + len(out_shape)),
                       rngs=nnx.Rngs(0))
  dense.bias[...] = jax.random.normal(jax.random.key(1), out_shape)
  x = jax.random.normal(jax.random.key(2), (2, 7) + in_shape)
  graphdef, params = nnx.split(dense)
  spec = "xyzw"[:len(in_shape)]

  def ours(params, x):
    return jnp.sin(nnx.merge(graphdef, params)(jnp.tanh(x)))

  def reference(params, x):
    return jnp.sin(jnp.einsum(f"pq{spec},{spec}...->pq...", jnp.tanh(x), params["kernel"][...])
                   + params["bias"][...])

  assert jax.default_backend() == "cpu"
  assert "layout_constraint" in str(jax.make_jaxpr(ours)(params, x))  # traced for CPU: the pinned path
  assert "layout_constraint" not in str(jax.make_jaxpr(reference)(params, x))
  results = []
  for fn in (ours, reference):
    value, grads = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(fn(p, x)), argnums=(0, 1)))(params, x)
    # Forward mode too (tools/token_influence.py takes a jacfwd through the model).
    tangent = jax.jit(lambda p, x: jax.jvp(lambda x: fn(p, x), (x,), (jnp.cos(x),))[1])(params, x)
    results.append(jax.tree.leaves((value, grads, tangent)))
  for got, want in zip(*results):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_pinned_dense_builds_the_weight_term_only_when_the_weight_is_differentiated(mesh):
  """Frozen weights (a frozen encoder, `jax.jacfwd` over the input) cost no weight-gradient matmul or copy."""
  dense = layers.Dense(6, 10, (None, None), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(dense)
  x = jax.random.normal(jax.random.key(2), (2, 7, 6))

  def loss(params, x):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x)))

  def matmuls(fn, *args):
    return str(jax.make_jaxpr(fn)(*args)).count("dot_general")

  assert matmuls(jax.grad(loss, argnums=1), params, x) == 2        # forward, input gradient
  assert matmuls(jax.grad(loss, argnums=0), params, x) == 2        # forward, weight gradient
  assert matmuls(jax.grad(loss, argnums=(0, 1)), params, x) == 3
  assert matmuls(lambda x: jax.jvp(lambda x: loss(params, x), (x,), (x,))[1], x) == 2
