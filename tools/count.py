r"""Parameters and forward FLOPs of a config's denoiser, without allocating it.

  python tools/count.py --config=configs/dit_image.py:variant=XL/2
  python tools/count.py --config=configs/tiny_t2v.py [--config.a.b=value ...]

Parameters come from the real NNX model built under `nnx.eval_shape` (shapes only); FLOPs from the analytic
count of `sora_jax/train/flops.py` for one sample filling `train_dit.seq_len` tokens. `forward_gflops`
follows the DiT paper's table, which counts a multiply-accumulate as one flop (DiT-XL/2 at 256x256: 118.6);
`forward_gflops_2_per_mac` is the same work at 2 FLOPs per multiply-accumulate (what MFU uses). The last line
of output is one JSON object.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (python, get_config(arg)).",
                                          lock_config=False)


def count(config) -> dict:
  """{'params', 'dit_params', 'text_params', 'tokens', 'forward_gflops', 'forward_gflops_2_per_mac'}."""
  from sora_jax.train import flops as flops_lib
  sizes = flops_lib.param_counts(config)
  flops = flops_lib.forward_flops_per_row(config)
  return {"params": sizes["dit"] + sizes["text"], "dit_params": sizes["dit"], "text_params": sizes["text"],
          "tokens": int(config.train_dit.seq_len), "forward_gflops": round(flops / 2e9, 3),
          "forward_gflops_2_per_mac": round(flops / 1e9, 3)}


def main(argv):
  del argv
  config = _CONFIG.value
  out = count(config)
  print(f"parameters: {out['params'] / 1e6:.2f}M (DiT {out['dit_params'] / 1e6:.2f}M, "
        f"text encoder {out['text_params'] / 1e6:.2f}M)")
  print(f"forward over {out['tokens']} tokens: {out['forward_gflops']:.2f} GMACs (the DiT paper's 'Gflops'), "
        f"{out['forward_gflops_2_per_mac']:.2f} GFLOPs")
  print(json.dumps(out))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
