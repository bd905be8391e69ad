"""tools/sweep.py: sweep expansion, launch commands, and result collection from synthetic runs."""
import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("sweep_tool", os.path.join(ROOT, "tools", "sweep.py"))
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def test_product_times_zip():
  runs = sweep.expand(["config.train_dit.lr=1e-3,5e-4", "arg=runlocal;runlocal,width=64"],
                      ["config.seed=0,1", "config.train_dit.steps=4,8"])
  assert len(runs) == 2 * 2 * 2
  assert {"config.train_dit.lr": "1e-3", "arg": "runlocal,width=64", "config.seed": "1",
          "config.train_dit.steps": "8"} in runs
  # Zipped axes move together.
  assert all((r["config.seed"], r["config.train_dit.steps"]) in {("0", "4"), ("1", "8")} for r in runs)
  assert len({sweep.run_name(r) for r in runs}) == len(runs)


def test_bad_axes_fail():
  with pytest.raises(ValueError, match="equal lengths"):
    sweep.expand([], ["config.seed=0,1", "config.train_dit.steps=4"])
  with pytest.raises(ValueError, match="expected"):
    sweep.parse_axis("train_dit.lr=1")


def test_print_only_commands(tmp_path):
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "sweep.py"), "--config=configs/tiny_t2v.py",
       f"--workdir={tmp_path}", "--mode=train_dit", "--print_only", "--product=arg=runlocal",
       "--product=config.train_dit.lr=1e-3,5e-4"],
      capture_output=True, text=True, cwd=ROOT, check=True, timeout=60)
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 2
  assert "-m sora_jax.main --config=configs/tiny_t2v.py:runlocal" in lines[0]
  assert f"--workdir={tmp_path}/arg=runlocal,lr=1e-3" in lines[0] and "--config.train_dit.lr=1e-3" in lines[0]
  assert not os.listdir(tmp_path)  # nothing ran


def test_collect_synthetic_runs(tmp_path):
  runs = sweep.expand(["config.train_dit.lr=1e-3,5e-4"], [])
  for k, r in enumerate(runs[:1] + runs[1:]):
    d = tmp_path / sweep.run_name(r)
    (d / "dit").mkdir(parents=True)
    (d / "report.json").write_text(json.dumps({"vae_psnr": 20.0 + k, "prompt_adherence": {"color": 0.5 * k},
                                               "mode": "all"}))
    (d / "dit" / "metrics.jsonl").write_text(
        json.dumps({"step": 2, "time": 1.0, "loss": 3.0}) + "\n" + json.dumps({"step": 4, "time": 2.0, "loss": 1.5 + k}) + "\n")
  csv_path, md_path = sweep.collect(str(tmp_path), runs)
  with open(csv_path) as f:
    rows = list(csv.DictReader(f))
  assert [r["config.train_dit.lr"] for r in rows] == ["1e-3", "5e-4"]
  assert [float(r["dit/loss"]) for r in rows] == [1.5, 2.5]
  assert [float(r["prompt_adherence/color"]) for r in rows] == [0.0, 0.5]
  assert "time" not in "".join(rows[0])  # wall-clock stamps are not results
  table = open(md_path).read()
  assert table.startswith("| run |") and "| lr=1e-3 |" in table
