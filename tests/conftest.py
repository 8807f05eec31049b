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


@pytest.fixture(scope="session")
def default_gguf():
  from jaxllm import default_model

  return default_model.gguf_path()


@pytest.fixture(scope="session")
def default_llm():
  from jaxllm import LLM

  return LLM("default")


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
