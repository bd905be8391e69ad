"""The launcher runs the whole chain on the one-minute config and reports what the demo reports."""
import json
import os
import shutil

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


def test_sample_mode_writes_a_prompts_file_to_a_folder_of_its_own(tiny_run, tmp_path):
  # `--mode=sample --prompts=mine.jsonl` writes to samples/mine, leaving the held-out samples of --mode=eval
  # as they were; condition paths are read relative to the file. A rerun with fewer prompts (--out naming
  # the same folder) leaves none of the earlier run's videos behind.
  workdir = tiny_run
  held_out = os.path.join(workdir, "samples", "samples.json")
  with open(held_out) as f:
    before = f.read()
  shutil.copy(json.loads(before)["samples"][0]["file"], tmp_path / "given.mp4")
  rows = [{"prompt": "a red circle moving left", "seed": 3},
          {"prompt": "a blue square moving up", "mode": "i2v", "video": "given.mp4"}]
  prompts = tmp_path / "mine.jsonl"
  prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
  base = ["--config=configs/tiny_t2v.py:runlocal", "--mode=sample", f"--prompts={prompts}",
          "--config.compilation_cache="]
  proc = _run(base, workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = os.path.join(workdir, "samples", "mine")
  with open(os.path.join(out, "samples.json")) as f:
    records = json.load(f)["samples"]
  assert [(r["mode"], r["given_latent_frames"]) for r in records] == [("t2v", []), ("i2v", [0])]
  assert sorted(f for f in os.listdir(out) if f.endswith(".mp4")) == ["sample_000.mp4", "sample_001.mp4"]
  assert f"samples           {out}" in proc.stdout
  with open(held_out) as f:
    assert f.read() == before
  prompts.write_text(json.dumps(rows[0]) + "\n")
  proc = _run(base + [f"--out={out}"], workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(f for f in os.listdir(out) if f.endswith(".mp4")) == ["sample_000.mp4"]


def test_bad_prompts_file_fails_in_one_line_naming_the_line_and_field(tmp_path):
  prompts = tmp_path / "p.jsonl"
  prompts.write_text('{"prompt": "a red circle"}\n{"prompt": "b", "mode": "i2v", "video": "clips/a.mp4"}\n')
  base = ["--config=configs/tiny_t2v.py:runlocal", "--mode=sample", "--config.compilation_cache="]
  proc = _run(base + [f"--prompts={prompts}"], str(tmp_path / "w"))
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: {prompts}:2: field 'video': no such file '{tmp_path / 'clips' / 'a.mp4'}'")
  proc = _run(base + [f"--prompts={tmp_path / 'missing.jsonl'}"], str(tmp_path / "w"))
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == f"error: --prompts={tmp_path / 'missing.jsonl'}: no such file"


def test_a_condition_file_that_does_not_decode_fails_in_one_line(tiny_run, tmp_path):
  # Found when the clip is loaded (after the models are restored, before any sampling): still one line.
  (tmp_path / "a.mp4").write_bytes(b"not a video")
  prompts = tmp_path / "p.jsonl"
  prompts.write_text('{"prompt": "b", "mode": "i2v", "video": "a.mp4"}\n')
  proc = _run(["--config=configs/tiny_t2v.py:runlocal", "--mode=sample", "--config.compilation_cache=",
               f"--prompts={prompts}"], tiny_run)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f"error: prompt 0: field 'video': cannot read '{tmp_path / 'a.mp4'}' (InvalidDataError: ")
  assert not os.path.exists(os.path.join(tiny_run, "samples", "p"))


def test_a_mode_whose_earlier_stage_is_missing_says_which_to_run(tmp_path):
  proc = _run(["--config=configs/tiny_t2v.py:runlocal", "--mode=sample", "--config.compilation_cache="],
              str(tmp_path))
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: no VAE checkpoint under {tmp_path / 'vae' / 'checkpoints'}: run --mode=train_vae first")


def test_a_data_path_that_is_missing_fails_in_one_line(tmp_path):
  # Found when the data source opens (not by validate()): still one line naming the field, exit code 2.
  missing = tmp_path / "no_videos_here"
  proc = _run([f"--config=configs/folder_t2v.py:runlocal,path={missing}", "--mode=train_vae",
               "--config.compilation_cache="], str(tmp_path / "w"))
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: config.data.path='{missing}': no such folder or captions file")


def test_bad_config_fails_in_one_line_naming_the_field(tmp_path):
  proc = _run(["--config=configs/tiny_t2v.py:runlocal", "--config.train_dit.steps=-1"], str(tmp_path))
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: config.train_dit.steps=-1: must be non-negative")


def test_unknown_mode_is_named(tmp_path):
  proc = _run(["--config=configs/tiny_t2v.py:runlocal", "--mode=trian"], str(tmp_path))
  assert proc.returncode == 2
  assert "config.mode='trian': unknown mode" in proc.stderr
