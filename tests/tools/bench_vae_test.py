"""tools/bench_vae.py --layers: the conv calls of one chunk, recorded from the model itself."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import bench_vae  # noqa: E402


def _bench(*flags):
  """bench_vae.py with ours only, at a tiny Wan2.1 shape; its last line of output, parsed."""
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_vae.py"), "--ref_python=", "--base=8",
                        "--sizes=5x32x32", *flags],
                       env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT), check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def layers_run():
  return _bench("--layers", "--repeats=1")


def test_layers_are_one_steady_chunk_of_the_wan_vae(layers_run):
  """A chunk of 4 frames: the first conv reads them with 2 frames of causal context (6 in), the last conv
  writes them at full resolution, and every conv of the model appears with its calls per chunk."""
  layers = layers_run["layers"]
  assert layers["3->8 k3x3x3 s1x1x1 in 6x32x32"]["count"] == 1  # encoder's first conv
  assert layers["8->3 k3x3x3 s1x1x1 in 6x32x32"]["count"] == 1  # decoder's last conv
  # 2 res blocks at each of 4 encoder levels and 3 per decoder level, 2 convs each, plus the middle blocks'.
  assert sum(row["count"] for row in layers.values()) > 2 * (4 * 2 + 4 * 3)
  total = sum(row["count"] * row["ours_ms"] for row in layers.values())
  assert layers_run["conv_ms_per_chunk"]["ours"] == pytest.approx(total, rel=0.01, abs=0.5)
  assert layers_run["time_ratio"] is None  # no peer
  assert layers_run["ours_matmul_gflops"] > 0


def test_bfloat16_halves_the_arguments_of_the_pass():
  # --dtype=bfloat16 runs ours as `vae.inference_dtype=bfloat16` does: weights stored in bfloat16, so the
  # compiled pass's arguments (weights + a float32 clip of 5 x 32 x 32 x 3, 60 KB) are about half.
  full, half = (_bench("--memory_analysis", f"--dtype={d}") for d in ("float32", "bfloat16"))
  assert half["dtype"] == "bfloat16"
  clip_mb = 5 * 32 * 32 * 3 * 4 / 2**20
  ratio = (half["runs"]["ours/5x32x32"]["xla_argument_mb"] - clip_mb) / (
      full["runs"]["ours/5x32x32"]["xla_argument_mb"] - clip_mb)
  assert ratio == pytest.approx(0.5, abs=0.01)


def test_compare_layers_weights_each_class_by_its_calls():
  layer = {"x": [1, 6, 8, 8, 4], "kernel": [3, 3, 3, 4, 4], "strides": [1, 1, 1], "spatial_pad": None,
           "out": [1, 4, 8, 8, 4]}
  wider = {**layer, "x": [1, 6, 8, 8, 8], "kernel": [3, 3, 3, 8, 4]}
  ours = [{**layer, "count": 3, "ms": 2.0}, {**wider, "count": 1, "ms": 4.0}]
  peer = [{**layer, "count": 3, "ms": 1.0}, {**wider, "count": 1, "ms": 4.0}]
  got = bench_vae.compare_layers(ours, peer)
  assert got["conv_ms_per_chunk"] == {"ours": 10.0, "peer": 7.0}
  assert got["conv_time_ratio"] == pytest.approx(10 / 7)
  row = got["layers"]["4->4 k3x3x3 s1x1x1 in 6x8x8"]
  assert row["time_ratio"] == 2.0
  # 2 x 4 frames x 8 x 8 pixels x 4 out x 27 taps x 4 in = 221,184 FLOP in 2 ms.
  assert row["ours_gflops"] == pytest.approx(0.1, abs=0.01)
  assert got["layers"]["8->4 k3x3x3 s1x1x1 in 6x8x8"]["time_ratio"] == 1.0


def test_memory_analysis_reports_xla_buffers_without_running():
  run = _bench("--memory_analysis")["runs"]["ours/5x32x32"]
  assert run["xla_argument_mb"] > 0 and run["xla_temp_mb"] > 0
  assert "seconds" not in run  # compiled, not run


def test_memory_ratios_take_medians_over_rounds_and_subtract_the_loaded_model():
  ours = [{"peak_rss_mb": 1250.0, "pass_memory_mb": 390.0}, {"peak_rss_mb": 1300.0, "pass_memory_mb": 400.0},
          {"peak_rss_mb": 1260.0, "pass_memory_mb": 380.0}]
  peer = [{"peak_rss_mb": 1600.0, "pass_memory_mb": 700.0}, {"peak_rss_mb": 1400.0, "pass_memory_mb": 500.0},
          {"peak_rss_mb": 1650.0, "pass_memory_mb": 780.0}]
  got = bench_vae.memory_ratios(ours, peer)
  assert got["peak_memory_ratio"] == pytest.approx(1260 / 1600)
  assert got["pass_memory_ratio"] == pytest.approx(390 / 700)


def test_timed_passes_report_what_they_hold_above_the_loaded_model():
  held = []

  def fn():  # the warm-up holds nothing; the timed pass keeps 64 MB of written pages
    if held:
      block = bytearray(64 << 20)
      block[::4096] = b"x" * len(block[::4096])
      held.append(block)
    else:
      held.append(None)

  got = bench_vae._time(fn, repeats=1, trim=True)
  assert got["pass_memory_mb"] == pytest.approx(got["peak_rss_mb"] - got["rss_before_timed_mb"])
  assert got["pass_memory_mb"] >= 60
