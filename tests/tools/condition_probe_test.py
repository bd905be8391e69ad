"""tools/condition_probe.py on the shared tiny run: per-attribute pattern sizes and correlations, as JSON."""
import pytest

from sora_jax.data import synthetic
from tests.conftest import run_tool


def test_condition_probe_reports_every_attribute(tiny_run):
  result = run_tool("condition_probe", tiny_run, "--t=1", "--num_clips=2", "--num_noise=1")
  assert result["dit_step"] == 4 and 1 <= result["num_clips"] <= 2
  figures = result["t"]["1.0"]
  assert set(figures) == set(synthetic.ATTRIBUTE_NAMES)
  for f in figures.values():
    assert f["data"] >= 0 and f["model"] >= 0 and (f["corr"] is None or -1.0 <= f["corr"] <= 1.0)
    assert f["ratio"] == pytest.approx(f["model"] / f["data"], rel=1e-2, abs=1e-3)
