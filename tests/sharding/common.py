"""What the sharded workers share: the tiny model, its inputs and greedy sampling arrays (no jax backend started)."""

import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.sampling import SamplingArrays

TINY_8_2 = ModelConfig(vocab_size=512, d_model=128, d_ff=256, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16)


def inputs():
  """Token rows for prefill logits and ragged prompts for greedy decode, the same in every process."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 512, (8, 24)).astype(np.int32)
  prompts = [rng.integers(0, 512, n).tolist() for n in (5, 17, 9, 30, 2, 11, 8, 20)]
  return tokens, prompts


def greedy(n):
  return SamplingArrays.create(n, temperature=0.0)
