r"""Quality against steps: prompt adherence of held-out prompts per solver and step count.

  JAX_PLATFORMS=cpu .venv/bin/python tools/bench_solvers.py --config=configs/tiny_t2v.py \
      --workdir=/tmp/sora_jax_demo [--solvers=euler,heun,dpmpp_2m --steps=10,25,50 --num_prompts=32] \
      [--cond_modes=i2v,extend_forward,extend_forward_half]

1. Text-to-video: the scorer's prompt adherence (`sora_jax/eval/scorer.py`) of the held-out prompts for each
   solver x steps, with the model calls per video (Heun makes 2N - 1) and wall time.
2. With --cond_modes: held-out clips condition the sampler (i2v: their first frame; extend_forward: their
   last frames; extend_forward_half: the last frames of their first half; extend_backward: their first
   frames; extend_backward_half: the first frames of their second half) with their own caption; the
   scorer's colour and direction of each generated video are compared with the conditioning clip's labels
   (the first solver and step count of the lists). Extension modes are scored twice: the whole video, whose
   first frames are the given ones, and `continuation`, the last given frame and every frame generated after
   it (whether the new frames keep going), next to `continuation_true`, the same frames of the clip's true
   past or future (its motion carried on), the ceiling, and `continuation_speed`: how much of the true
   continuation's motion the new frames keep (`scorer.speed_kept`: 1 the same velocity, 0 stopped or sideways,
   below 0 reversed). `--context_frames` sets how many latent frames they are given.
The last line printed is one JSON object with all figures.
"""
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file of the trained workdir.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Trained workdir (VAE and DiT checkpoints).")
_SOLVERS = flags.DEFINE_list("solvers", ["euler", "heun", "dpmpp_2m"], "Flow solvers to compare.")
_STEPS = flags.DEFINE_list("steps", ["10", "25", "50"], "Step counts to compare.")
_NUM = flags.DEFINE_integer("num_prompts", None, "Held-out prompts (default: sample.num_heldout_prompts).")
_COND = flags.DEFINE_list("cond_modes", [], "Conditioned modes to score: i2v, extend_forward, "
                          "extend_forward_half, extend_backward, extend_backward_half.")
_CONTEXT = flags.DEFINE_integer("context_frames", None, "Latent frames the extension modes are given (default: the "
                               "sampler's, half the clip's latent frames).", lower_bound=1)
flags.mark_flags_as_required(["config", "workdir"])

COND_ATTRIBUTES = ("color", "direction")
# Scored conditioned modes: (sampling mode, prompt field, what of the held-out clip is given).
# `extend_forward` continues from the clip's last frames, where its shape has finished its travel;
# `extend_forward_half` from the end of its first half, mid-travel. `extend_backward` generates what came
# before the clip's first frames, where its shape starts its travel; `extend_backward_half` what came before
# the start of its second half.
# The given part is the clip's frames [a, b) for (a, b) = window(T).
COND_MODES = {
    "i2v": ("i2v", "image", lambda t: (0, 1)),
    "extend_forward": ("extend_forward", "video", lambda t: (0, t)),
    "extend_forward_half": ("extend_forward", "video", lambda t: (0, t // 2)),
    "extend_backward": ("extend_backward", "video", lambda t: (0, t)),
    "extend_backward_half": ("extend_backward", "video", lambda t: (t // 2, t)),
}
EXTENSIONS = ("extend_forward", "extend_backward")


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  from sora_jax import configs_lib, generate  # pylint: disable=import-outside-toplevel
  from sora_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  from sora_jax.eval import scorer  # pylint: disable=import-outside-toplevel
  from sora_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel

  config = _CONFIG.value
  cache = os.path.expanduser(config.get("compilation_cache", "") or "")
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
  mesh = mesh_lib.make_mesh(config.mesh)
  models = generate.restore_models(config, _WORKDIR.value, mesh)
  n = _NUM.value or config.sample.num_heldout_prompts
  size = tuple(config.data.heldout_size)
  prompts = synthetic.heldout_prompts(n, size, seed=config.seed)
  labels = [p["labels"] for p in prompts]
  result = {"workdir": _WORKDIR.value, "dit_step": models.dit_step, "num_prompts": n,
            "guidance": config.sample.guidance, "guidance_image": config.sample.get("guidance_image", 1.0),
            "t2v": []}
  for solver in _SOLVERS.value:
    for steps in (int(s) for s in _STEPS.value):
      t0 = time.perf_counter()
      videos, _ = generate.generate_with(config, models, mesh, prompts, steps=steps, solver=solver,
                                         write_files=False)
      row = {"solver": solver, "steps": steps, "model_calls": 2 * steps - 1 if solver == "heun" else steps,
             "seconds": round(time.perf_counter() - t0, 1), **scorer.prompt_adherence(videos, labels),
             "layout": scorer.layout(videos, labels)}
      print(json.dumps(row), flush=True)
      result["t2v"].append(row)

  if _COND.value:
    solver, steps = _SOLVERS.value[0], int(_STEPS.value[0])
    src = synthetic.SyntheticVideos(n, [size], split="heldout", seed=config.seed + 101)
    clips = [src[i] for i in range(n)]
    cond_labels = [c["labels"] for c in clips]
    stride, _ = configs_lib.vae_strides(config.vae)
    # What the scorer reads from the conditioning clips themselves: the ceiling for the modes below.
    result["cond"] = {"solver": solver, "steps": steps, "attributes": COND_ATTRIBUTES,
                      "clips": scorer.prompt_adherence([c["video"] for c in clips], cond_labels, COND_ATTRIBUTES)}
    for mode in _COND.value:
      given = COND_MODES.get(mode)
      if given is None:
        raise app.UsageError(f"--cond_modes: {mode!r} is not scored; choose from {sorted(COND_MODES)}")
      sample_mode, field, window = given
      a, b = window(size[0])
      cut = (lambda v: v[a]) if field == "image" else (lambda v: v[a:b])
      extra = {}
      if _CONTEXT.value is not None and sample_mode in EXTENSIONS:
        have = b - a
        need = (generate.prefix_pixel_frames(_CONTEXT.value, stride) if sample_mode == "extend_forward"
                else 1 + generate.suffix_pixel_frames(_CONTEXT.value, stride))
        if need > have:
          raise app.UsageError(f"--context_frames={_CONTEXT.value}: {mode} gives {have} frames of each clip, "
                               f"{_CONTEXT.value} latent frames need {need}")
        extra = {"context_frames": _CONTEXT.value}
      cond_prompts = [dict(caption=c["caption"], mode=sample_mode, frames=size[0], height=size[1], width=size[2],
                           seed=i, **extra, **{field: cut(c["video"])}) for i, c in enumerate(clips)]
      videos, records = generate.generate_with(config, models, mesh, cond_prompts, steps=steps, solver=solver,
                                               write_files=False)
      result["cond"][mode] = scorer.prompt_adherence(videos, cond_labels, COND_ATTRIBUTES)
      if sample_mode in EXTENSIONS:
        # The continuation alone: the generated frames and the given frame next to them (forward: the last
        # given frame and every frame after it; backward: every frame before the first given one, and it).
        if sample_mode == "extend_forward":
          new = [v[generate.prefix_pixel_frames(len(r["given_latent_frames"]), stride) - 1:]
                 for v, r in zip(videos, records)]
        else:
          new = [v[:len(v) - generate.suffix_pixel_frames(len(r["given_latent_frames"]), stride) + 1]
                 for v, r in zip(videos, records)]
        generated = len(new[0]) - 1
        result["cond"][mode]["generated_frames"] = generated
        result["cond"][mode]["continuation"] = scorer.prompt_adherence(new, cond_labels, COND_ATTRIBUTES)
        # The ceiling for `continuation`: the same frames of the clip's true past or future (its motion
        # carried on at the same speed, `SyntheticVideos.extended`), read by the same scorer.
        before, after = max(0, generated - a), max(0, b + generated - size[0])
        start = before + (b - 1 if sample_mode == "extend_forward" else a - generated)
        true = [src.extended(i, before, after)[start:start + generated + 1] for i in range(n)]
        result["cond"][mode]["continuation_true"] = scorer.prompt_adherence(true, cond_labels, COND_ATTRIBUTES)
        result["cond"][mode]["continuation_speed"] = scorer.speed_kept(new, true)
      print(json.dumps({mode: result["cond"][mode]}), flush=True)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
