"""The launcher runs the whole chain on the one-minute config and reports what the demo reports."""
import json
import os

from tests.conftest import run_launcher as _run


def test_mode_all_end_to_end(tiny_run):
  workdir = tiny_run
  with open(os.path.join(workdir, "report.json")) as f:
    report = json.load(f)
  assert set(report["stage_seconds"]) >= {"train_vae", "encode", "train_dit", "eval_vae", "eval_dit"}
  assert report["vae_psnr"] > 0
  assert set(report["prompt_adherence"]) >= {"color", "direction"}
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["mode"] == "all"
  samples = os.path.join(workdir, "samples")
  assert os.path.exists(os.path.join(samples, "grid.gif"))
  with open(os.path.join(samples, "samples.json")) as f:
    records = json.load(f)["samples"]
  assert len(records) == 4 and all(os.path.getsize(r["file"]) > 0 for r in records)
  for name in ("vae", "dit"):
    assert os.path.exists(os.path.join(workdir, name, "metrics.jsonl"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, name)))
  # A second call in the same workdir resumes: nothing is retrained.
  proc = _run(["--config=configs/tiny_t2v.py:runlocal", "--mode=train_dit", "--config.compilation_cache="],
              workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_bad_config_fails_in_one_line_naming_the_field(tmp_path):
  proc = _run(["--config=configs/tiny_t2v.py:runlocal", "--config.train_dit.steps=-1"], str(tmp_path))
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: config.train_dit.steps=-1: must be non-negative")


def test_unknown_mode_is_named(tmp_path):
  proc = _run(["--config=configs/tiny_t2v.py:runlocal", "--mode=trian"], str(tmp_path))
  assert proc.returncode == 2
  assert "config.mode='trian': unknown mode" in proc.stderr
