"""Runs in a subprocess with 8 CPU devices (XLA_FLAGS set before jax loads); prints one JSON line of results."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import json
import re

import jax
import numpy as np
from flax import nnx

from jaxllm import checkpoint
from jaxllm.config import ModelConfig
from jaxllm.generate import Generator
from jaxllm.layers import Llama
from jaxllm.sampling import SamplingArrays
from jaxllm.sharding import make_mesh

CASES = [("model=8", "tp"), ("data=2,model=4", "tp"), ("x=2,y=4", "2d"), ("data=8", "dp")]
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def greedy(n):
  return SamplingArrays(temperature=np.zeros(n, np.float32), top_k=np.zeros(n, np.int32),
                        top_p=np.ones(n, np.float32), seed=np.zeros(n, np.uint32))


def main():
  out = {"devices": len(jax.devices()), "runs": [], "hlo": {}}
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 512, (8, 24)).astype(np.int32)
  prompts = [rng.integers(0, 512, n).tolist() for n in (5, 17, 9, 30, 2, 11, 8, 20)]
  for kv in (2, 8):
    config = ModelConfig(vocab_size=512, d_model=128, d_ff=256, num_layers=2, num_heads=8, num_kv_heads=kv,
                         head_dim=16)
    params = jax.tree.map(np.asarray, nnx.state(Llama(config, rngs=nnx.Rngs(kv)), nnx.Param).to_pure_dict())
    single = Generator(checkpoint.build_model(config, params, "float32"))
    ref_logits = single.logits(tokens)
    ref_tokens, _ = single.generate(prompts, [6] * 8, greedy(8), lambda i, t: False, max_len=64)
    for spec, layout in CASES:
      mesh = make_mesh(spec)
      g = Generator(checkpoint.build_model(config, params, "float32", mesh, layout), mesh=mesh)
      toks, _ = g.generate(prompts, [6] * 8, greedy(8), lambda i, t: False, max_len=64)
      out["runs"].append({"kv": kv, "mesh": spec, "layout": layout,
                          "max_logit_diff": float(np.abs(g.logits(tokens) - ref_logits).max()),
                          "decode_equal": toks == ref_tokens})
      if kv == 8 and layout == "tp" and spec == "model=8":
        positions = np.broadcast_to(np.arange(24, dtype=np.int32), tokens.shape)
        compiled = g._forward_logits.lower(g.params, tokens, positions).compile()
        text = compiled.as_text()
        out["hlo"] = {op: [l.strip()[:120] for l in text.splitlines() if re.search(rf"= \S+ {op}(-start)?\(", l)]
                      for op in COLLECTIVES}
        weights = sum(x.nbytes for x in jax.tree.leaves(params))
        out["arg_bytes_sharded"] = compiled.memory_analysis().argument_size_in_bytes
        out["weight_bytes"] = weights
  print(json.dumps(out))


if __name__ == "__main__":
  main()
