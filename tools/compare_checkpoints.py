r"""Markdown table of evaluation results across checkpoints and runs.

  python tools/compare_checkpoints.py /tmp/run_a /tmp/run_b/eval/step_2000.json [--columns=val_loss,fvd]

A workdir contributes one row per `eval/step_<N>.json` (written by `--mode=eval` and by
`train_dit.eval_every`); a JSON file contributes one row.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

_COLUMNS = flags.DEFINE_list("columns", None, "Metrics to show (default: every metric found).")


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("give workdirs or eval JSON files")
  from sora_jax.eval import evaluate  # pylint: disable=g-import-not-at-top
  print(evaluate.compare(argv[1:], _COLUMNS.value))


if __name__ == "__main__":
  app.run(main)
