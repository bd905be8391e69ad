r"""Runs one config over a sweep, one run after another (or prints the commands), and tabulates results.

  python tools/sweep.py --config=configs/tiny_t2v.py --workdir=/tmp/sweep --mode=all \
      --product="config.train_dit.lr=1e-3,5e-4" --product="arg=runlocal;runlocal,width=64" \
      --zip="config.seed=0,1" --zip="config.train_dit.steps=4,8" [--print_only] [-- extra main.py flags]

A sweep axis is `NAME=V1,V2,...` (`;` separates values instead when they contain commas). `config.a.b`
names become `--config.a.b=V` overrides, `arg` picks the `:arg` variant of the config file. All --product axes
are crossed; all --zip axes advance together (equal lengths) and are crossed with the product. Each run goes
to `<workdir>/<run_name>` (run_name from its settings) via `python -m sora_jax.main`; `--print_only` prints
those commands for a cluster launcher instead. Afterwards the final metrics of every run (its
`report.json`, the last line of each `*/metrics.jsonl`, `eval.json`) are collected into
`<workdir>/sweep.csv` and `<workdir>/sweep.md`. `--collect_only` just collects.
"""
import csv
import itertools
import json
import os
import re
import shlex
import subprocess
import sys

from absl import app
from absl import flags


def _define_flags():
  """Registers the command-line flags (only when run as a script, so tests can import this module)."""
  global _CONFIG, _WORKDIR, _MODE, _PRODUCT, _ZIP, _PRINT_ONLY, _COLLECT_ONLY, _PYTHON
  _CONFIG = flags.DEFINE_string("config", None, "Config file, without :arg (the sweep's `arg` axis sets it).")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Parent directory: one sub-directory per run.")
  _MODE = flags.DEFINE_string("mode", "all", "--mode of every run.")
  _PRODUCT = flags.DEFINE_multi_string("product", [], "NAME=V1,V2: crossed with every other axis.")
  _ZIP = flags.DEFINE_multi_string("zip", [], "NAME=V1,V2: zipped with the other --zip axes.")
  _PRINT_ONLY = flags.DEFINE_bool("print_only", False, "Print the launch commands instead of running them.")
  _COLLECT_ONLY = flags.DEFINE_bool("collect_only", False, "Only collect the results of existing runs.")
  _PYTHON = flags.DEFINE_string("python", sys.executable, "Interpreter of the runs.")
  flags.mark_flags_as_required(["config", "workdir"])


def parse_axis(spec: str) -> tuple[str, list[str]]:
  """'config.a=1,2' -> ('config.a', ['1', '2']); values split on ';' when there is one."""
  name, sep, values = spec.partition("=")
  if not sep or not values or not (name == "arg" or name.startswith("config.")):
    raise ValueError(f"sweep axis {spec!r}: expected config.a.b=V1,V2 or arg=V1;V2")
  return name.strip(), [v.strip() for v in values.split(";" if ";" in values else ",")]


def expand(product: list[str], zipped: list[str]) -> list[dict[str, str]]:
  """Settings of every run: the cross product of `product` axes with the zipped `zipped` axes."""
  axes = [parse_axis(s) for s in product]
  zips = [parse_axis(s) for s in zipped]
  if zips and len({len(v) for _, v in zips}) != 1:
    raise ValueError(f"--zip axes need equal lengths: {[(n, len(v)) for n, v in zips]}")
  zip_points = [dict(zip([n for n, _ in zips], vs)) for vs in zip(*[v for _, v in zips])] if zips else [{}]
  runs = []
  for values in itertools.product(*[v for _, v in axes]):
    for z in zip_points:
      runs.append({**dict(zip([n for n, _ in axes], values)), **z})
  return runs


def run_name(settings: dict[str, str]) -> str:
  """A directory-safe name from the settings, e.g. 'lr=0.001,seed=1'."""
  parts = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in settings.items()]
  return re.sub(r"[^A-Za-z0-9=,._+-]", "_", ",".join(parts)) or "base"


def command(python: str, config: str, workdir: str, mode: str, settings: dict[str, str],
            extra: list[str]) -> list[str]:
  """The `python -m sora_jax.main` command line of one run."""
  arg = settings.get("arg")
  cmd = [python, "-m", "sora_jax.main", f"--config={config}" + (f":{arg}" if arg else ""),
         f"--workdir={os.path.join(workdir, run_name(settings))}", f"--mode={mode}"]
  cmd += [f"--{k}={v}" for k, v in settings.items() if k != "arg"]
  return cmd + list(extra)


def final_metrics(run_dir: str) -> dict[str, float]:
  """A run's final numbers: report.json (flattened), the last line of each metrics.jsonl, eval.json."""
  from sora_jax.eval import evaluate  # pylint: disable=g-import-not-at-top
  out = {}
  for name in ("report.json", "eval.json"):
    path = os.path.join(run_dir, name)
    if os.path.exists(path):
      with open(path) as f:
        out.update(evaluate.flatten(json.load(f), "" if name == "report.json" else "eval/"))
  for path in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
    jsonl = os.path.join(run_dir, path, "metrics.jsonl")
    if os.path.exists(jsonl):
      with open(jsonl) as f:
        lines = [line for line in f if line.strip()]
      if lines:
        last = json.loads(lines[-1])
        out.update({f"{path}/{k}": float(v) for k, v in last.items() if k != "time" and isinstance(v, (int, float))})
  return out


def collect(workdir: str, runs: list[dict[str, str]]) -> tuple[str, str]:
  """Writes `<workdir>/sweep.csv` and `sweep.md` (one row per run, settings then metrics)."""
  rows = [(s, final_metrics(os.path.join(workdir, run_name(s)))) for s in runs]
  keys = sorted({k for s, _ in rows for k in s})
  metrics = sorted({k for _, m in rows for k in m})
  csv_path, md_path = os.path.join(workdir, "sweep.csv"), os.path.join(workdir, "sweep.md")
  os.makedirs(workdir, exist_ok=True)
  with open(csv_path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["run"] + keys + metrics)
    for s, m in rows:
      w.writerow([run_name(s)] + [s.get(k, "") for k in keys] + [m.get(k, "") for k in metrics])
  lines = ["| run | " + " | ".join(keys + metrics) + " |", "|---" * (1 + len(keys) + len(metrics)) + "|"]
  for s, m in rows:
    cells = [s.get(k, "") for k in keys] + [f"{m[k]:.4g}" if k in m else "" for k in metrics]
    lines.append(f"| {run_name(s)} | " + " | ".join(cells) + " |")
  with open(md_path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return csv_path, md_path


def main(argv):
  extra = argv[1:]
  runs = expand(_PRODUCT.value, _ZIP.value)
  workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
  cmds = [command(_PYTHON.value, _CONFIG.value, workdir, _MODE.value, s, extra) for s in runs]
  if _PRINT_ONLY.value:
    for c in cmds:
      print(shlex.join(c))
    return
  failed = []
  if not _COLLECT_ONLY.value:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for i, (s, c) in enumerate(zip(runs, cmds)):
      print(f"[{i + 1}/{len(runs)}] {run_name(s)}", flush=True)
      if subprocess.run(c, cwd=root).returncode:
        failed.append(run_name(s))
  csv_path, md_path = collect(workdir, runs)
  with open(md_path) as f:
    print(f.read())
  print(json.dumps({"runs": len(runs), "failed": failed, "csv": csv_path, "markdown": md_path}))
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
