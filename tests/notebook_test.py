"""experiments/tiny_t2v/inspect.ipynb runs headless against a checkpoint made by a tiny run."""
import os
import subprocess
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "tiny_t2v", "inspect.ipynb")


def _env():
  # One CPU device, as a user's run: conftest's 8 fake devices would not divide the runlocal batch of 2.
  return {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu",
          "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  wd = tmp_path_factory.mktemp("tiny_run")
  result = subprocess.run([sys.executable, "-m", "sora_jax.main", "--config=configs/tiny_t2v.py:runlocal",
                           f"--workdir={wd}", "--mode=all"], cwd=ROOT, timeout=900, capture_output=True,
                          text=True, env=_env())
  assert result.returncode == 0, result.stderr[-3000:]
  return str(wd)


# The tiny run and the notebook take 3-6 minutes on a 2-core CPU (compiles dominate).
@pytest.mark.slow
def test_inspect_notebook_runs(workdir):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1
  params[0].source = f"workdir = {workdir!r}\nnum_prompts = 2\nsample_steps = 2\nfvd_clips = 0"
  saved = dict(os.environ)
  os.environ.clear()
  os.environ.update(_env())  # the kernel inherits this process's environment
  try:
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
  finally:
    os.environ.clear()
    os.environ.update(saved)
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
  assert html.count("data:image/gif;base64,") == 2
  markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
  assert "prompt_adherence/mean" in markdown and "val_loss" in markdown and "vae_psnr" in markdown
