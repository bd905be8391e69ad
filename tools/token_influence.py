r"""Which tokens a trained DiT listens to: the influence of one latent token on every output token.

  JAX_PLATFORMS=cpu .venv/bin/python tools/token_influence.py --config=configs/tiny_t2v.py \
      --workdir=/tmp/sora_jax_demo [--t=0.3,0.6,0.9 --num_clips=4]

For clips of the workdir's latent cache (their own captions, noised at each t with seeded noise), the
Frobenius norm of d velocity[j] / d x_t[src] for a source token in the middle of the clip (the Jacobian of
the EMA denoiser), summed per latent frame. A model that tracks motion listens to the source's own position
in the neighbouring frames more than to other positions: `same_position_ratio` (influence on the same
(h, w) in frames t-1 and t+1 over the mean influence on the other tokens of those frames) well above 1. A
ratio near 1 with small `other_tokens` means attention carries no positional structure (each output is a
function of its own token plus a global average).
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
_WORKDIR = flags.DEFINE_string("workdir", None, "Trained workdir (latent cache and DiT checkpoint).")
_T = flags.DEFINE_list("t", ["0.3", "0.6", "0.9"], "Noise levels (flow time, 1 = pure noise).")
_NUM = flags.DEFINE_integer("num_clips", 4, "Clips of the latent cache with at least 3 latent frames.")
flags.mark_flags_as_required(["config", "workdir"])


def make_jacobian(graphdef, max_segments: int):
  """jit: (state, rows, noise, t, src) -> d velocity / d x_t[src] [L, P, P] of one packed row."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from sora_jax.diffusion import flow  # pylint: disable=import-outside-toplevel

  @jax.jit
  def jacobian(state, rows, noise, t, src):
    model = nnx.merge(graphdef, state)
    states, pooled = model.encode_text(rows["text"], rows["text_segment_ids"], rows["text_positions"],
                                       max_segments)
    t_table = jnp.full(rows["grid"].shape[:2], t, jnp.float32)
    x_t = flow.interpolate(rows["tokens"], noise, t)

    def velocity(x_src):
      x = x_t.at[0, src].set(x_src)
      return model(x, rows["coords"], rows["tokens_segment_ids"], t_table, states, rows["text_segment_ids"],
                   pooled)[0]

    return jax.jacfwd(velocity)(x_t[0, src])  # P input dims << L * P outputs: forward mode

  return jacobian


def influence(config, jacobian, state, example, t: float, seed: int):
  """Per-token influence [T', H', W'] of the middle token of a latent-cache example at noise level t."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from sora_jax.data import packing  # pylint: disable=import-outside-toplevel
  from sora_jax.models import text as text_lib  # pylint: disable=import-outside-toplevel

  caption = example["caption"]
  caption = caption if isinstance(caption, str) else caption.decode()
  tokens, coords, grid = packing.patchify(np.asarray(example["latent"], np.float32), config.dit.patch_size)
  text = text_lib.tokenize(caption, config.text.max_len, config.text.tokenizer)
  rows = packing.stack_rows(packing.pack_list(
      [packing.sample_features(tokens, coords, grid, text, np.asarray(example["labels"]), 0)],
      seq_len=len(tokens), text_seq_len=len(text), max_segments=config.train_dit.max_segments))
  noise = jax.random.normal(jax.random.key(seed), rows["tokens"].shape)
  nt, nh, nw = (int(n) for n in grid)
  centre = (nt // 2, nh // 2, nw // 2)
  src = (centre[0] * nh + centre[1]) * nw + centre[2]
  jac = jacobian(state, jax.tree.map(jnp.asarray, rows), noise, jnp.float32(t), jnp.int32(src))
  return np.asarray(jnp.sqrt((jac ** 2).sum((1, 2)))).reshape(nt, nh, nw), centre


def main(argv):
  del argv
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from sora_jax import generate  # pylint: disable=import-outside-toplevel
  from sora_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from sora_jax.train import train_dit  # pylint: disable=import-outside-toplevel

  config = _CONFIG.value
  config.attention = "xla"  # forward-mode differentiation; the fused kernels define reverse mode only
  mesh = mesh_lib.make_mesh(config.mesh)
  models = generate.restore_models(config, _WORKDIR.value, mesh)
  cache = train_dit.latent_caches(config, _WORKDIR.value)[0][0]
  clips = []
  for i in range(len(cache)):
    ex = cache[i]
    if ex["latent"].shape[0] >= 3:
      clips.append(ex)
    if len(clips) == _NUM.value:
      break
  if not clips:
    raise app.UsageError(f"{_WORKDIR.value}: the latent cache has no clip of 3 or more latent frames")
  result = {"workdir": _WORKDIR.value, "dit_step": models.dit_step, "num_clips": len(clips), "t": {}}
  with mesh_lib.use(mesh, mesh_lib.DIT_RULES):
    graphdef, state = nnx.split(nnx.merge(*models.dit))
    jacobian = make_jacobian(graphdef, config.train_dit.max_segments)
    for t in (float(x) for x in _T.value):
      self_, same, other, per_frame = [], [], [], []
      for k, ex in enumerate(clips):
        infl, (ts, hs, ws) = influence(config, jacobian, state, ex, t, seed=k)
        self_.append(infl[ts, hs, ws])
        for dt in (-1, 1):
          frame = infl[ts + dt]
          same.append(frame[hs, ws])
          other.append((frame.sum() - frame[hs, ws]) / (frame.size - 1))
        per_frame.append(infl.sum((1, 2)) - np.eye(infl.shape[0])[ts] * infl[ts, hs, ws])
      figures = {"self": float(np.mean(self_)), "same_position_adjacent_frames": float(np.mean(same)),
                 "other_tokens": float(np.mean(other)),
                 "same_position_ratio": float(np.mean(same) / max(np.mean(other), 1e-12)),
                 "per_frame_without_self": [round(float(v), 4) for v in np.mean(per_frame, 0)]}
      print(json.dumps({f"t={t}": figures}), flush=True)
      result["t"][str(t)] = figures
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
