"""Multi-host start-up: `jax.distributed.initialize` behind one flag string.

  off                      one process (the default; also what 'auto' falls back to)
  auto                     a TPU pod slice or a SLURM job with more than one task: let jax detect it
  coordinator=HOST:PORT,num_processes=N,process_id=I[,local_device_ids=0;1]
                           explicit, for any other cluster (and the two-process CPU test)

Must run before anything touches a device (jax.devices(), building a mesh). After it, `jax.devices()` is the
global device list and every process runs the same program on its own slice of the batch
(`mesh.global_batch` assembles the process-local rows).
"""
from __future__ import annotations

import os

import jax

# Environment variables that mark a multi-host job jax's cluster detection understands.
_TPU_POD_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "CLOUD_TPU_TASK_ID")


def detect() -> str | None:
  """The kind of multi-process job this process belongs to ('tpu', 'slurm', 'env'), None for one process."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return "env"
  if int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1"))) > 1:
    return "slurm"
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts or any(os.environ.get(k) for k in _TPU_POD_ENV[1:]):
    return "tpu"
  return None


def parse(flag: str) -> dict | None:
  """Flag string -> keyword arguments of `jax.distributed.initialize` ({} = auto-detect), None = off."""
  flag = (flag or "off").strip()
  if flag == "off":
    return None
  if flag == "auto":
    return {} if detect() else None
  kwargs = {}
  for part in flag.split(","):
    name, sep, value = part.partition("=")
    if not sep or name not in ("coordinator", "num_processes", "process_id", "local_device_ids"):
      raise ValueError(f"--distributed={flag!r}: expected 'off', 'auto' or "
                       "'coordinator=HOST:PORT,num_processes=N,process_id=I[,local_device_ids=0;1]'")
    if name == "coordinator":
      kwargs["coordinator_address"] = value
    elif name == "local_device_ids":
      kwargs[name] = [int(x) for x in value.split(";")]
    else:
      kwargs[name] = int(value)
  missing = {"coordinator_address", "num_processes", "process_id"} - set(kwargs)
  if missing:
    raise ValueError(f"--distributed={flag!r}: missing {sorted(missing)}")
  return kwargs


def initialize(flag: str) -> bool:
  """Joins the multi-process job described by `flag`; returns whether jax is now multi-process."""
  kwargs = parse(flag)
  if kwargs is None:
    return False
  jax.distributed.initialize(**kwargs)
  return True
