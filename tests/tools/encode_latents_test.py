"""tools/encode_latents.py writes the cache `--mode=encode` writes, anywhere, readable by tfds and the DiT."""
import json
import os
import subprocess
import sys

import numpy as np
import tensorflow_datasets as tfds

from sora_jax.data import latent_cache

from tests.conftest import ROOT, launcher_env


def _encode(workdir, out, *args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "encode_latents.py"),
                         "--config=configs/tiny_t2v.py:runlocal", f"--vae_workdir={workdir}", f"--out={out}",
                         "--name=tiny", *args], cwd=ROOT, env=launcher_env(), capture_output=True, text=True,
                        timeout=600)


def _by_source(ds):
  return {int(ex["source_id"]): ex for ex in (ds[i] for i in range(len(ds)))}


def test_chunked_tool_cache_equals_the_launchers(tiny_run, tmp_path):
  out = tmp_path / "latents"
  # Chunked, one latent frame at a time: the causal pass equals the launcher's whole-clip pass.
  proc = _encode(tiny_run, out, "--config.encode.chunk=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["path"] == str(out / "tiny" / "1.0.0") and summary["skipped"] == 0
  assert "VAE-pass CPU settings" in proc.stderr

  ours = _by_source(tfds.data_source("tiny", data_dir=str(out), split="train"))
  launcher = _by_source(tfds.data_source("latent_cache", data_dir=os.path.join(tiny_run, "latents"),
                                         split="train"))
  assert len(ours) == summary["num_examples"] == len(launcher) == 16
  for i, ex in launcher.items():
    assert ours[i]["caption"] == ex["caption"]
    np.testing.assert_array_equal(ours[i]["size"], ex["size"])
    np.testing.assert_allclose(ours[i]["latent"], ex["latent"], rtol=1e-4, atol=1e-4)
  assert any(ex["size"][0] > 1 for ex in launcher.values())  # videos, not only images, went through chunks

  # The DiT's 'latents' parts read it through the same source class.
  assert len(latent_cache.LatentCacheSource(str(out / "tiny"))) == 16

  # A second run does not replace the cache unless asked to.
  again = _encode(tiny_run, out)
  assert again.returncode == 2
  assert again.stderr.strip().splitlines()[-1] == (
      f"error: encode: a latent cache exists at {out / 'tiny' / '1.0.0'}; choose another name or overwrite it")


def test_bad_name_and_missing_vae_fail_in_one_line(tmp_path):
  proc = _encode(tmp_path, tmp_path / "out", "--name=Bad-Name")
  assert proc.returncode != 0 and "--name" in proc.stderr and "snake_case" in proc.stderr
  proc = _encode(tmp_path, tmp_path / "out")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: no VAE checkpoint under ")
