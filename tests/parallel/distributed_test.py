"""Multi-host: the flag parses, and two processes on 127.0.0.1 train exactly like one process."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from sora_jax.parallel import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def test_parse_flag(monkeypatch):
  for k in ("SLURM_NTASKS", "SLURM_NPROCS", "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
            "MEGASCALE_COORDINATOR_ADDRESS", "CLOUD_TPU_TASK_ID"):
    monkeypatch.delenv(k, raising=False)
  assert distributed.parse("off") is None and distributed.parse("") is None
  assert distributed.parse("auto") is None  # one process: nothing to join
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert distributed.parse("auto") == {} and distributed.detect() == "slurm"
  assert distributed.parse("coordinator=10.0.0.1:1234,num_processes=2,process_id=1,local_device_ids=0;1") == {
      "coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1, "local_device_ids": [0, 1]}
  with pytest.raises(ValueError, match="missing"):
    distributed.parse("coordinator=h:1,num_processes=2")
  with pytest.raises(ValueError, match="expected 'off'"):
    distributed.parse("coordinatr=h:1")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _worker(out, devices, flag="off"):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.Popen([sys.executable, "-m", "tests.parallel.multiprocess_worker", str(out), str(devices),
                           flag], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow  # about 1 minute on 2 quiet cores, several when they are shared
def test_two_processes_match_one_process(tmp_path):
  port = _free_port()
  pair = [_worker(tmp_path / f"two_{i}.npz", 2, f"coordinator=127.0.0.1:{port},num_processes=2,process_id={i}")
          for i in range(2)]
  single = _worker(tmp_path / "one.npz", 4)
  for p in pair + [single]:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
  two, one = np.load(tmp_path / "two_0.npz"), np.load(tmp_path / "one.npz")
  assert int(two["processes"]) == 2 and int(one["processes"]) == 1 and int(two["devices"]) == int(one["devices"])
  np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
  assert set(two.files) == set(one.files)
  for k in set(one.files) - {"losses", "devices", "processes"}:  # the parameters after the steps
    np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)
