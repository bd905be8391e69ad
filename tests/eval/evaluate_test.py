"""Evaluation results: per-checkpoint JSON + TensorBoard, merged per step, and the comparison table."""
import json
import os

from sora_jax.eval import evaluate
from sora_jax.train import logging as log_lib


def test_results_per_checkpoint_and_table(tmp_path):
  wd = str(tmp_path / "run")
  evaluate.write_results(wd, 100, {"val_loss": 1.5})
  evaluate.write_results(wd, 100, {"fvd": 900.0, "prompt_adherence": {"color": 0.25, "mean": 0.5}})
  evaluate.write_results(wd, 20, {"val_loss": 2.0})
  with open(os.path.join(wd, "eval", "step_100.json")) as f:
    assert json.load(f) == {"step": 100, "val_loss": 1.5, "fvd": 900.0,
                            "prompt_adherence": {"color": 0.25, "mean": 0.5}}
  logged = log_lib.read_jsonl(os.path.join(wd, "eval", "metrics.jsonl"))
  assert [r["step"] for r in logged] == [100, 100, 20] and logged[1]["prompt_adherence/color"] == 0.25
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(wd, "eval")))
  table = evaluate.compare([wd], ["val_loss", "fvd"]).splitlines()
  assert table[0] == "| checkpoint | val_loss | fvd |"
  assert table[2:] == ["| run@20 | 2 |  |", "| run@100 | 1.5 | 900 |"]  # steps in order


def test_flatten_skips_non_numbers():
  assert evaluate.flatten({"a": {"b": 1, "c": "x"}, "mode": "all", "ok": True, "d": 2.5}) == {"a/b": 1.0, "d": 2.5}


def test_no_synthetic_prompt_scores_for_a_dit_trained_on_other_data(tmp_path):
  from tests.data import folder_fixture  # pylint: disable=import-outside-toplevel
  config = folder_fixture.config("runlocal")
  # Returns before any model is restored: there is nothing under this workdir.
  assert evaluate.sample_metrics(config, str(tmp_path), mesh=None) == {}
