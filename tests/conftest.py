"""Shared test setup: CPU with 8 fake devices, fast compiles, a `slow` marker, one shared tiny run."""
import json
import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Fast compiles here and in the launcher/tool subprocesses the tests start (they inherit the environment).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")

import jax  # noqa: E402,F401  (initialised with the settings above)
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launcher_env():
  """The environment of a user's launcher run: one CPU device (8 fake ones would not divide batch 2)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return env


def run_launcher(args, workdir):
  return subprocess.run([sys.executable, "-m", "sora_jax.main", f"--workdir={workdir}", *args],
                        cwd=ROOT, env=launcher_env(), capture_output=True, text=True, timeout=900)


def pack_captions(token_lists, length=None):
  """Token lists of captions -> one packed text row (tokens, segment ids, positions) [1, L], right-padded."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  tokens = np.concatenate(token_lists)
  seg = np.concatenate([np.full(len(t), i + 1) for i, t in enumerate(token_lists)])
  pos = np.concatenate([np.arange(len(t)) for t in token_lists])
  pad = (length or len(tokens)) - len(tokens)
  return tuple(jnp.asarray(np.pad(a, (0, pad))[None], jnp.int32) for a in (tokens, seg, pos))


def one_device_dit_mesh():
  """Context of a 1-device mesh with the DiT's logical-axis rules (for building sharded modules eagerly)."""
  from sora_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  mesh = mesh_lib.make_mesh([(a, 1) for a in mesh_lib.AXES], devices=jax.devices()[:1])
  return mesh_lib.use(mesh, mesh_lib.DIT_RULES)


def run_tool(name, workdir, *args):
  """Runs tools/<name>.py on the tiny run's config and workdir; returns its last line, parsed as JSON."""
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", f"{name}.py"),
                         "--config=configs/tiny_t2v.py:runlocal", f"--workdir={workdir}", *args], cwd=ROOT,
                        env=launcher_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """Workdir of one `--mode=all` run of configs/tiny_t2v.py:runlocal, made once per pytest(-xdist worker)
  process for the tests that read a trained workdir (launcher, notebook, tools)."""
  workdir = str(tmp_path_factory.mktemp("tiny_run") / "run")
  proc = run_launcher(["--config=configs/tiny_t2v.py:runlocal", "--mode=all", "--config.compilation_cache="],
                      workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes minutes; run with --runslow")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow"):
    return
  skip = pytest.mark.skip(reason="slow: run with --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
