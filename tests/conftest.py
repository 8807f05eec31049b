"""Shared fixtures. The default model and transformers' copy of it load once per session."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
