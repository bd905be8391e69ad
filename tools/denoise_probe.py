r"""At which noise level a trained DiT loses each attribute of a clip: one-step denoising, decoded and scored.

  JAX_PLATFORMS=cpu .venv/bin/python tools/denoise_probe.py --config=configs/tiny_t2v.py \
      --workdir=/tmp/sora_jax_demo [--t=0,0.6,0.8,0.9,0.95,1 --num_clips=32]

Clips of the workdir's latent cache (their own captions; all clips share the grid of the first one with at
least 3 latent frames) are noised to each flow time t with seeded noise; the EMA denoiser's velocity gives
the one-step estimate x0 = x_t - t v, which the VAE decodes and `sora_jax/eval/scorer.py` scores against
the clip's labels (an attribute the scorer cannot read counts as wrong). At t = 0 this is the VAE's own
ceiling; as t grows the estimate keeps an attribute only as far as the model can infer it from the caption
and what is left of the clip. Where sampling from pure noise gets an attribute wrong while the probe keeps
it up to some t, the model has not learnt to choose it from the caption above that t.
The last line printed is one JSON object with all figures.
"""
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file of the trained workdir.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Trained workdir (latent cache, VAE and DiT checkpoints).")
_T = flags.DEFINE_list("t", ["0", "0.6", "0.8", "0.9", "0.95", "1"], "Noise levels (flow time, 1 = pure noise).")
_NUM = flags.DEFINE_integer("num_clips", 32, "Clips of the latent cache (same grid, at least 3 latent frames).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from sora_jax import generate  # pylint: disable=import-outside-toplevel
  from sora_jax.data import packing  # pylint: disable=import-outside-toplevel
  from sora_jax.eval import probes  # pylint: disable=import-outside-toplevel
  from sora_jax.eval import scorer  # pylint: disable=import-outside-toplevel
  from sora_jax.models import text as text_lib  # pylint: disable=import-outside-toplevel
  from sora_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from sora_jax.train import train_vae  # pylint: disable=import-outside-toplevel

  config = _CONFIG.value
  mesh = mesh_lib.make_mesh(config.mesh)
  models = generate.restore_models(config, _WORKDIR.value, mesh)
  clips = probes.cache_clips(config, _WORKDIR.value, _NUM.value)
  patch, channels = tuple(config.dit.patch_size), config.vae.latent_channels
  samples, labels = [], []
  for i, ex in enumerate(clips):
    caption = ex["caption"] if isinstance(ex["caption"], str) else ex["caption"].decode()
    tokens, coords, grid = packing.patchify(np.asarray(ex["latent"], np.float32), patch)
    text = text_lib.tokenize(caption, config.text.max_len, config.text.tokenizer)
    samples.append(packing.sample_features(tokens, coords, grid, text, np.asarray(ex["labels"]), i))
    labels.append(np.asarray(ex["labels"]))
  # One clip per row: every row has the same length, so they stack into one batch.
  rows = probes.one_clip_per_row(samples, config.train_dit.max_segments)
  grid = tuple(int(n) for n in samples[0]["grid"][0])
  decode = train_vae.make_decode_fn(models.vae[0], mesh)
  result = {"workdir": _WORKDIR.value, "dit_step": models.dit_step, "num_clips": len(clips),
            "latent_grid": list(grid), "t": {}}
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    graphdef, state = nnx.split(nnx.merge(*models.dit))
    one_step = probes.make_one_step(graphdef, config.train_dit.max_segments)
    noise = jax.random.normal(jax.random.key(config.seed), rows["tokens"].shape)
    for t in (float(x) for x in _T.value):
      x0 = np.asarray(one_step(state, rows, noise, jnp.float32(t)))
      latents = [packing.unpatchify(x0[r][np.asarray(rows["tokens_segment_ids"][r]) == 1], grid, patch, channels)
                 for r in range(len(clips))]
      videos = generate.vae_apply(decode, models.vae[1], models.vae[2], latents, mesh)
      acc = {k: round(float(v), 4) for k, v in scorer.prompt_adherence(videos, np.stack(labels)).items()}
      print(json.dumps({f"t={t}": acc}), flush=True)
      result["t"][str(t)] = acc
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
