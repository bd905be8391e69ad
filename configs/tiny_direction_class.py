r"""Control for the demo's direction problem: tiny_t2v with the motion direction as the only condition.

The caption and its text encoder are replaced by a class label (the sample's direction, one of four) added
to the timestep embedding, as in the class-conditional DiT. If the DiT cannot follow this clean label, the
text path is not what keeps the demo from following directions (experiments/tiny_t2v/README.md, run R):

  python -m sora_jax.main --config=configs/tiny_direction_class.py:variable=False,dit_steps=1000 \
      --workdir=/tmp/dir_class --mode=all --config.cond.start_step=0

(run R's setting: absolute positions and shift base 9 are tiny_t2v's defaults since 2026-12-01, and the
last two flags undo the demo's later 2,000 steps and frame conditioning from halfway).

Prompt adherence then scores only `direction` meaningfully; the other attributes are not conditioned.
Takes the same arguments as configs/tiny_t2v.py.
"""
from configs import dit_image
from configs import tiny_t2v
from sora_jax.data import synthetic


def get_config(arg=None):
  c = tiny_t2v.get_config(arg)
  dit_image.class_conditional(c, num_classes=len(synthetic.DIRECTIONS),
                              class_column=synthetic.ATTRIBUTE_NAMES.index("direction"))
  c.sample.guidance = 4.0  # as tiny_t2v, so the two compare at the same guidance
  return c
