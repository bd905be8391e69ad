"""experiments/tiny_t2v/inspect.ipynb runs headless against a checkpoint made by a tiny run."""
import os

import pytest

from tests.conftest import ROOT
from tests.conftest import launcher_env

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = os.path.join(ROOT, "experiments", "tiny_t2v", "inspect.ipynb")


# The notebook (kernel start, a restore, two 2-step samples, metrics) takes about 1.5 min on a 2-core CPU;
# the tiny run it reads is the `tiny_run` fixture of tests/conftest.py.
def test_inspect_notebook_runs(tiny_run):
  workdir = tiny_run
  nb = nbformat.read(NOTEBOOK, as_version=4)
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1
  params[0].source = f"workdir = {workdir!r}\nnum_prompts = 2\nsample_steps = 2\nfvd_clips = 0"
  saved = dict(os.environ)
  os.environ.clear()
  os.environ.update(launcher_env())  # the kernel inherits this process's environment
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
