"""Runs in a subprocess with 8 CPU devices (XLA_FLAGS set before jax loads); prints one JSON line of results."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import json
import re
import sys

import jax
import numpy as np
from flax import nnx

from jaxllm import checkpoint
from jaxllm.config import ModelConfig
from jaxllm.layers import Llama
from jaxllm.sharding import make_mesh

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]  # common.py, and the repo root for tests.oracle
from common import greedy, inputs  # noqa: E402
from tests.oracle import Generator  # noqa: E402

CASES = [("model=8", "tp"), ("data=2,model=4", "tp"), ("x=2,y=4", "2d"), ("data=8", "dp")]
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def main():
  out = {"devices": len(jax.devices()), "runs": [], "hlo": {}}
  tokens, prompts = inputs()
  # (query heads, KV heads, cases, family variations): the last is Qwen's shape (q/k/v biases, which are replicated
  # with their KV heads, and q/k norms) on a mesh that copies its KV heads
  qwen = {"qkv_bias": True, "o_bias": True, "qk_norm": True}
  # Gemma's shape: a local (window 5, its own RoPE base) and a global layer, soft-caps, GeGLU, (1 + w) norms and
  # post-norms, scaled embeddings; prompts of 24 tokens are several windows long
  gemma = {"qk_norm": True, "sliding_window": 5, "sliding_layers": (True, False), "rope_local_theta": 100.0,
           "mlp_activation": "gelu_tanh", "norm_plus_one": True, "post_norms": True, "scale_embeddings": True,
           "attn_scale": 0.2, "attn_soft_cap": 5.0, "final_soft_cap": 3.0}
  # with 6 query heads over 2 KV heads on model=4 the query heads do not split either: 2 zero heads pad them to 8
  models = [(8, 2, CASES, {}), (8, 8, [("model=8", "tp"), ("x=2,y=4", "2d")], {}),
            (6, 3, [("data=4,model=2", "tp")], {}),
            (8, 2, [("data=2,model=4", "tp"), ("x=2,y=4", "2d")], qwen), (6, 2, [("data=2,model=4", "tp")], qwen),
            (8, 2, [("model=8", "tp"), ("x=2,y=4", "2d")], gemma)]
  for heads, kv, cases, variations in models:
    config = ModelConfig(vocab_size=512, d_model=96 if heads == 6 else 128, d_ff=256, num_layers=2, num_heads=heads,
                         num_kv_heads=kv, head_dim=16, **variations)
    params = jax.tree.map(np.asarray, nnx.state(Llama(config, rngs=nnx.Rngs(kv)), nnx.Param).to_pure_dict())
    if variations:  # biases start at 0 and norms at their identity: make them matter
      rng = np.random.default_rng(0)
      unit = 0.0 if config.norm_plus_one else 1.0
      attn = params["layers"]["attn"]
      for name in ("bq_NH", "bk_KH", "bv_KH", "bo_D"):
        if name in attn:
          attn[name] = rng.normal(0, 0.1, attn[name].shape).astype(np.float32)
      norms = [attn["q_norm"], attn["k_norm"]] + [params["layers"][n] for n in ("post_attn_norm", "post_mlp_norm")
                                                   if n in params["layers"]]
      for norm in norms:
        norm["weight"] = (unit + rng.normal(0, 0.1, norm["weight"].shape)).astype(np.float32)
    if heads == 8 and kv == 2 and not variations:
      first = (params, config)
    single = Generator(checkpoint.build_model(config, params, "float32"))
    ref_logits = single.logits(tokens)
    ref_tokens, _ = single.generate(prompts, [6] * 8, greedy(8), lambda i, t: False, max_len=64)
    for spec, layout in cases:
      mesh = make_mesh(spec)
      model = checkpoint.build_model(config, params, "float32", mesh, layout)
      g = Generator(model, mesh=mesh)
      toks, _ = g.generate(prompts, [6] * 8, greedy(8), lambda i, t: False, max_len=64)
      cache = g._new_cache(8, 64)
      out["runs"].append({"heads": heads, "kv": kv, "mesh": spec, "layout": layout, "family": sorted(variations),
                          "max_logit_diff": float(np.abs(g.logits(tokens) - ref_logits).max()),
                          "decode_equal": toks == ref_tokens,
                          "placement": model.kv_placement.kind, "runtime_kv_heads": model.config.num_kv_heads,
                          "runtime_heads": model.config.num_heads,
                          "wk_shard": list(g.params["layers"]["attn"]["wk_DKH"].value.addressable_shards[0].data.shape),
                          "cache_shard": list(cache.k.addressable_shards[0].data.shape)})
      if layout == "tp" and spec == "model=8" and not variations:
        positions = np.broadcast_to(np.arange(24, dtype=np.int32), tokens.shape)
        compiled = g._forward_logits.lower(g.params, tokens, positions).compile()
        text = compiled.as_text()
        out["hlo"][kv] = {op: [l.strip()[:120] for l in text.splitlines() if re.search(rf"= \S+ {op}(-start)?\(", l)]
                          for op in COLLECTIVES}
        out["hlo"][kv]["arg_bytes_sharded"] = compiled.memory_analysis().argument_size_in_bytes
        out["hlo"][kv]["weight_bytes"] = sum(x.nbytes for x in jax.tree.leaves(params))
        out["hlo"][kv]["runtime_weight_bytes"] = sum(x.nbytes for x in jax.tree.leaves(g.params))  # global shapes
  out["orbax"] = orbax_round_trip(*first)
  out["int8"] = int8_runs(tokens, prompts)
  print(json.dumps(out))


def int8_runs(tokens, prompts):
  """The 8/2-head model with int8 (per channel) and q8_0 (per block of 32; head_dim 32 so wo's blocks stay within a
  head) weights on tp and 2d vs one device, and each device's weight bytes beside the planner's count. The 2 KV heads
  are copied 4x on model=8 with their scales; on 2d, D = 128 splits into whole blocks over x."""
  from jaxllm.sharding import planner

  runs = []
  for quantization, head_dim in (("int8", 16), ("q8_0", 32)):
    config = ModelConfig(vocab_size=512, d_model=128, d_ff=256, num_layers=2, num_heads=8, num_kv_heads=2,
                         head_dim=head_dim)
    model = Llama(config, quantization=quantization, rngs=nnx.Rngs(3))
    params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())
    single = Generator(checkpoint.build_model(config, params, "float32", quantization=quantization))
    ref_logits = single.logits(tokens)
    ref_tokens, _ = single.generate(prompts, [6] * 8, greedy(8), lambda i, t: False, max_len=64)
    for spec, layout in (("model=8", "tp"), ("x=2,y=4", "2d")):
      mesh = make_mesh(spec)
      g = Generator(checkpoint.build_model(config, params, "float32", mesh, layout, quantization), mesh=mesh)
      toks, _ = g.generate(prompts, [6] * 8, greedy(8), lambda i, t: False, max_len=64)
      device0 = jax.devices()[0]
      held = sum(s.data.nbytes for x in jax.tree.leaves(g.params) for s in x.addressable_shards
                 if s.device == device0)
      plan = planner.plan(config, dict(mesh.shape), "float32", 64, planner.GiB, layout, quantization=quantization)
      runs.append({"quantization": quantization, "mesh": spec,
                   "max_logit_diff": float(np.abs(g.logits(tokens) - ref_logits).max()),
                   "decode_equal": toks == ref_tokens, "device0_bytes": held,
                   "planned_bytes": plan.weight_bytes_per_device,
                   "wq_dtype": str(g.params["layers"]["attn"]["wq_DNH"].value.dtype),
                   "scale_shard": list(g.params["layers"]["attn"]["wo_scale"].value.addressable_shards[0].data.shape)})
  return runs


def orbax_round_trip(params, config):
  """Params placed on model=8, saved with orbax shard by shard, restored with a mesh: each lands on its shards."""
  import tempfile

  from jaxllm.checkpoint import orbax_io

  mesh = make_mesh("model=8")
  placed = checkpoint.place_params(params, checkpoint.param_shardings(config, "float32", mesh, "tp"))
  with tempfile.TemporaryDirectory() as d:
    orbax_io.save(d, config, placed, "float32")
    restored = checkpoint.load_checkpoint(d, "float32", mesh, "tp").params
  wq = restored["layers"]["attn"]["wq_DNH"]
  return {"equal": all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), b)), restored,
                                                     params))),
          "wq_spec": list(wq.sharding.spec), "wq_shard": list(wq.addressable_shards[0].data.shape),
          "wq_devices": len(wq.sharding.device_set)}


if __name__ == "__main__":
  main()
