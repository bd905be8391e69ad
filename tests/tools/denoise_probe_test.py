"""tools/denoise_probe.py on the shared tiny run: per-noise-level scores of one-step denoised clips, as JSON."""
import json
import os
import subprocess
import sys

from sora_jax.data import synthetic
from tests.conftest import ROOT
from tests.conftest import launcher_env


def test_denoise_probe_scores_every_noise_level(tiny_run):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "denoise_probe.py"),
                         "--config=configs/tiny_t2v.py:runlocal", f"--workdir={tiny_run}", "--t=0,1",
                         "--num_clips=3"], cwd=ROOT, env=launcher_env(), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["dit_step"] == 4 and 1 <= result["num_clips"] <= 3
  assert result["latent_grid"][0] >= 3
  assert set(result["t"]) == {"0.0", "1.0"}
  for figures in result["t"].values():
    assert set(synthetic.ATTRIBUTE_NAMES) <= set(figures)
    assert all(0.0 <= v <= 1.0 for v in figures.values())
