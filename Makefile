# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= test
WORKDIR ?= /tmp/sora_jax_demo
export JAX_PLATFORMS ?= cpu

.PHONY: venv demo test test-all lock clean

$(STAMP): setup.py requirements/lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/lock.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

venv: $(STAMP)

# Trains the VAE and the DiT on the embedded synthetic data, encodes latents, samples held-out prompts,
# scores them and writes $(WORKDIR)/report.json.
demo: $(STAMP)
	$(PY) -m sora_jax.main --config=configs/tiny_t2v.py --workdir=$(WORKDIR) --mode=all

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 tests

# Includes tests marked slow.
test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 --runslow tests

# Regenerates the exact lock of what CI installs (run in a fresh venv).
lock:
	$(PY) -m pip freeze --exclude-editable | grep -v '^-e' > requirements/lock.txt

clean:
	rm -rf $(VENV) .pytest_cache
