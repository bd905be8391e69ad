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
