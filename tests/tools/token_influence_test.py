"""tools/token_influence.py on the shared tiny run: per-frame influence of a middle token, as JSON."""
import pytest

from tests.conftest import run_tool


def test_token_influence_reports_per_frame_figures(tiny_run):
  result = run_tool("token_influence", tiny_run, "--t=0.5", "--num_clips=1")
  assert result["num_clips"] == 1 and result["dit_step"] == 4
  figures = result["t"]["0.5"]
  # 9-frame clips have 5 latent frames; the source sits in frame 2, whose own influence is left out.
  assert len(figures["per_frame_without_self"]) == 5
  assert figures["self"] > 0 and figures["other_tokens"] >= 0
  assert figures["same_position_ratio"] == pytest.approx(
      figures["same_position_adjacent_frames"] / figures["other_tokens"], rel=1e-6)
