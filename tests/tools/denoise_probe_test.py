"""tools/denoise_probe.py on the shared tiny run: per-noise-level scores of one-step denoised clips, as JSON."""
from sora_jax.data import synthetic
from tests.conftest import run_tool


def test_denoise_probe_scores_every_noise_level(tiny_run):
  result = run_tool("denoise_probe", tiny_run, "--t=0,1", "--num_clips=3")
  assert result["dit_step"] == 4 and 1 <= result["num_clips"] <= 3
  assert result["latent_grid"][0] >= 3
  assert set(result["t"]) == {"0.0", "1.0"}
  for figures in result["t"].values():
    assert set(synthetic.ATTRIBUTE_NAMES) <= set(figures)
    assert all(0.0 <= v <= 1.0 for v in figures.values())
