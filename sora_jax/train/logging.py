"""The one metric writer: console progress bar, TensorBoard event files and a JSONL file per workdir."""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import tqdm
from absl import logging
from tensorboardX import SummaryWriter


class MetricWriter:
  """Writes scalars to `<workdir>/<name>/` (TensorBoard) and `<workdir>/<name>/metrics.jsonl`."""

  def __init__(self, workdir: str, name: str, *, total_steps: int | None = None, initial_step: int = 0,
               is_main: bool = True):
    self.dir = os.path.join(workdir, name)
    self.is_main = is_main
    self.name = name
    if is_main:
      os.makedirs(self.dir, exist_ok=True)
      self._tb = SummaryWriter(self.dir, flush_secs=30)
      self._jsonl = open(os.path.join(self.dir, "metrics.jsonl"), "a")
    self._bar = None
    if is_main and total_steps:
      self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, desc=name, dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0, smoothing=0.1)

  def write(self, step: int, metrics: dict):
    if not self.is_main:
      return
    clean = {k: float(np.asarray(v)) for k, v in metrics.items()}
    for k, v in clean.items():
      self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
    self._jsonl.flush()
    shown = {k: f"{v:.4g}" for k, v in clean.items() if k in ("loss", "step_time", "psnr", "lr")}
    if self._bar is not None:
      self._bar.set_postfix(shown, refresh=False)
    logging.info("%s step %d: %s", self.name, step, ", ".join(f"{k}={v:.5g}" for k, v in clean.items()))

  def advance(self, n: int = 1):
    if self._bar is not None:
      self._bar.update(n)

  def close(self):
    if self.is_main:
      if self._bar is not None:
        self._bar.close()
      self._tb.close()
      self._jsonl.close()


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
