"""Shared fixtures. The default model and transformers' copy of it load once per session."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for this test session and the CLI processes it starts (they inherit the
# variables): a program compiled once, e.g. the default model's decode step, is loaded by the next process that
# needs it. A fresh directory per session keeps runs independent.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile

  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxllm-test-jit-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"

import numpy as np
import pytest


def pytest_collection_modifyitems(config, items):
  """The longest file first (the 8-device sharding run, ~3-7 min): under `make test`'s pytest-xdist workers
  (--dist loadfile hands out files in collection order) it then overlaps the other files instead of running alone
  at the end."""
  items.sort(key=lambda item: item.path.parent.name != "sharding")


@pytest.fixture(scope="session")
def default_gguf():
  from jaxllm import default_model

  return default_model.gguf_path()


@pytest.fixture(scope="session")
def default_llm():
  """The default model in float32: exactly the GGUF's dequantized weights, what transformers computes from the same
  file (LLM("default") itself runs q8_0, see tests/test_quantization.py). 1,024 KV pages (16,384 tokens, 750 MB)
  instead of the CPU default's 4 GiB: each pytest-xdist worker holds one."""
  from jaxllm import LLM

  return LLM("default", quantization=None, num_pages=1025)


@pytest.fixture(scope="session")
def hf_default(default_gguf):
  """transformers' LlamaForCausalLM and tokenizer, loaded from the same GGUF file (the oracle)."""
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  torch.set_num_threads(2)
  d, f = os.path.split(default_gguf)
  model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
  tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
  return model, tok


@pytest.fixture
def rng():
  return np.random.default_rng(0)
