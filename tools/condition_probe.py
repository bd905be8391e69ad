r"""Does a trained DiT's estimate under heavy noise follow each attribute of the caption as the data does?

  JAX_PLATFORMS=cpu .venv/bin/python tools/condition_probe.py --config=configs/tiny_t2v.py \
      --workdir=/tmp/sora_jax_demo [--t=1,0.8 --num_clips=16 --num_noise=4]

At flow time t = 1 the best one-step estimate of x0 is the mean of the data given the caption, and close to
1 it still mostly is. For every attribute of the embedded data and every value it can take, the probe
rewrites the captions (or class labels) of `num_clips` latent-cache clips to that value, averages the EMA
denoiser's one-step estimate x0 = x_t - t v over the clips and `num_noise` seeded noises, and subtracts
the average over values: the model's per-value pattern. The data's pattern is the same difference of the
latent cache's conditional means (every cache clip of the probe's grid). Per attribute and t it reports
the mean absolute size of both patterns (`data`, `model`), their ratio and their correlation: a model that
has learnt how the attribute changes the clip has ratio and correlation near 1; one that ignores it has
both near 0, whatever its samples look like. Needs labelled synthetic-data caches.
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
_WORKDIR = flags.DEFINE_string("workdir", None, "Trained workdir (latent cache and DiT checkpoints).")
_T = flags.DEFINE_list("t", ["1", "0.8"], "Noise levels (flow time, 1 = pure noise).")
_NUM = flags.DEFINE_integer("num_clips", 16, "Clips whose captions are rewritten (same grid).")
_NOISE = flags.DEFINE_integer("num_noise", 4, "Seeded noises averaged per clip.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from sora_jax import generate  # pylint: disable=import-outside-toplevel
  from sora_jax.data import packing, synthetic  # pylint: disable=import-outside-toplevel
  from sora_jax.eval import probes  # pylint: disable=import-outside-toplevel
  from sora_jax.models import text as text_lib  # pylint: disable=import-outside-toplevel
  from sora_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from sora_jax.train import train_dit  # pylint: disable=import-outside-toplevel

  config = _CONFIG.value
  mesh = mesh_lib.make_mesh(config.mesh)
  models = generate.restore_models(config, _WORKDIR.value, mesh)
  clips = probes.cache_clips(config, _WORKDIR.value, _NUM.value)
  cache = train_dit.latent_caches(config, _WORKDIR.value)[0][0]
  patch = tuple(config.dit.patch_size)
  grid_shape = clips[0]["latent"].shape

  def rows_with(attribute, value):
    samples = []
    for i, ex in enumerate(clips):
      labels = np.array(ex["labels"], np.int32)
      labels[synthetic.ATTRIBUTE_NAMES.index(attribute)] = value
      text = text_lib.tokenize(synthetic.caption(synthetic.attrs_of(labels)), config.text.max_len,
                               config.text.tokenizer)
      tokens, coords, grid = packing.patchify(np.asarray(ex["latent"], np.float32), patch)
      samples.append(packing.sample_features(tokens, coords, grid, text, labels, i))
    return probes.one_clip_per_row(samples, config.train_dit.max_segments)

  result = {"workdir": _WORKDIR.value, "dit_step": models.dit_step, "num_clips": len(clips),
            "latent_grid": list(grid_shape[:3]), "t": {}}
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    graphdef, state = nnx.split(nnx.merge(*models.dit))
    one_step = probes.make_one_step(graphdef, config.train_dit.max_segments)
    for t in (float(x) for x in _T.value):
      figures = {}
      for attribute in synthetic.ATTRIBUTE_NAMES:
        data, present = probes.data_patterns(cache, grid_shape, attribute)
        data = np.stack([packing.patchify(d.astype(np.float32), patch)[0] for d in data])  # [V, L, P]
        model = []
        for value in range(len(synthetic.ATTRIBUTES[attribute])):
          rows = rows_with(attribute, value)
          total = 0.0
          for k in range(_NOISE.value):
            noise = jax.random.normal(jax.random.key(config.seed + k), rows["tokens"].shape)
            total = total + np.asarray(one_step(state, rows, noise, jnp.float32(t)))
          model.append(total.mean(0) / _NOISE.value)  # one clip per row: [L, P]
        model = np.stack(model)[present]
        model -= model.mean(0)
        data = data[present]
        size_data, size_model = float(np.abs(data).mean()), float(np.abs(model).mean())
        figures[attribute] = {"data": round(size_data, 4), "model": round(size_model, 4),
                              "ratio": round(size_model / max(size_data, 1e-12), 3),
                              # undefined (null) when a pattern is flat, e.g. one value in the cache
                              "corr": (round(float(np.corrcoef(data.ravel(), model.ravel())[0, 1]), 3)
                                       if data.std() > 0 and model.std() > 0 else None)}
      print(json.dumps({f"t={t}": figures}), flush=True)
      result["t"][str(t)] = figures
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
