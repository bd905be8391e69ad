"""Golden sharding specs: the PartitionSpec of every DiT and VAE parameter under each main config's mesh.

A change to a logical-axis rule or a parameter's annotation shows up here as a readable diff. After an
intended change, regenerate the goldens and review the JSON diff:

  SORA_JAX_UPDATE_GOLDEN=1 JAX_PLATFORMS=cpu python -m pytest tests/parallel/sharding_test.py
"""
import importlib.util
import json
import os

import jax
import pytest

from sora_jax import configs_lib
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.train import train_dit
from sora_jax.train import train_vae

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
CONFIGS = {"tiny_t2v": ("configs/tiny_t2v.py", None), "dit_wan1p3b": ("configs/dit_wan1p3b.py", None)}


def _config(name):
  path, arg = CONFIGS[name]
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config(arg)
  configs_lib.validate(config)
  return config


def _specs(created) -> dict:
  """{'dit/blocks/attn/q/kernel': 'None, fsdp, tensor, None'} for every parameter (nothing allocated)."""
  flat = jax.tree_util.tree_flatten_with_path(created.shardings.params)[0]
  names = lambda path: "/".join(str(k.key) for k in path if hasattr(k, "key"))
  return {names(path): ", ".join(map(str, s.spec)) for path, s in flat}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("model", ["dit", "vae"])
def test_parameter_specs_match_golden(name, model):
  assert jax.device_count() == 8
  config = _config(name)
  mesh = mesh_lib.make_mesh(config.mesh)
  create = train_dit.create if model == "dit" else train_vae.create
  specs = _specs(create(config, mesh, abstract=True)[0])
  path = os.path.join(GOLDEN, f"{name}_{model}.json")
  if os.environ.get("SORA_JAX_UPDATE_GOLDEN"):
    with open(path, "w") as f:
      json.dump({"mesh": dict(zip(mesh_lib.AXES, mesh.axis_sizes)), "params": specs}, f, indent=1,
                sort_keys=True)
      f.write("\n")
  with open(path) as f:
    golden = json.load(f)
  assert golden["params"] == specs


def test_optimizer_state_follows_parameters():
  config = _config("dit_wan1p3b")
  created, _ = train_dit.create(config, mesh_lib.make_mesh(config.mesh), abstract=True)
  adam = created.shardings.opt_state[1][0]
  for tree in (adam.mu, adam.nu, created.shardings.ema):
    assert jax.tree.map(lambda s: s.spec, tree) == jax.tree.map(lambda s: s.spec, created.shardings.params)
