"""What a decode step's forward program holds beside the KV pages: XLA's memory analysis of the compiled program (per
device) against the per-device pool, for pools of two sizes. A temp buffer that grows with the pool means the step
copies the pool (which costs time in proportion to the cache, not to the batch); one that stays flat means the pages
are updated in place.

A tiny random Llama (8 query heads, --kv_heads KV heads, 2 layers) on the meshes asked for; on CPU the devices are
simulated (XLA_FLAGS gets their count).

    python benchmarks/step_memory.py --meshes "one;model=8;data=2,model=4" --kv_heads 1,2,8
"""

import argparse
import datetime
import math
import os

import common


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--meshes", default="one;model=8;data=2,model=4", help="';'-separated meshes ('one': one device)")
  ap.add_argument("--kv_heads", default="1,2,8", help="comma-separated KV head counts of the model")
  ap.add_argument("--pages", default="1000,4000", help="comma-separated KV pages per layer and replica")
  ap.add_argument("--results", default=common.RESULTS)
  args = ap.parse_args()
  meshes = args.meshes.split(";")
  from jaxllm.sharding import parse_mesh

  devices = max([math.prod(parse_mesh(m).values()) for m in meshes if m != "one"] or [1])
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jaxllm import checkpoint
  from jaxllm.config import ModelConfig
  from jaxllm.layers import Llama
  from jaxllm.serving import engine as engine_lib
  from jaxllm.serving.config import EngineConfig
  from jaxllm.sharding import default_layout, make_mesh

  rows = []
  for kv in (int(k) for k in args.kv_heads.split(",")):
    config = ModelConfig(vocab_size=512, d_model=128, d_ff=256, num_layers=2, num_heads=8, num_kv_heads=kv,
                         head_dim=16)
    params = jax.tree.map(jnp.asarray, nnx.state(Llama(config, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict())
    for spec in meshes:
      mesh = None if spec == "one" else make_mesh(spec, jax.devices()[:math.prod(parse_mesh(spec).values())])
      model = checkpoint.build_model(config, params, "float32", mesh, default_layout(mesh.shape) if mesh else "tp")
      for pages in (int(p) for p in args.pages.split(",")):
        eng = engine_lib.Engine(model, EngineConfig(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64,
                                                    num_pages=pages))
        state = eng.init_state()
        compiled = engine_lib._forward.lower(eng.graphdef, eng.params, state, common.decode_batch(eng, 4, 100),
                                             attention_impl=None, mesh=eng.mesh).compile()
        pool = state.k.addressable_shards[0].data.nbytes
        rows.append((kv, spec, pages, state.k.addressable_shards[0].data.shape[1], pool,
                     compiled.memory_analysis().temp_size_in_bytes))
        print(rows[-1], flush=True)
        del state, eng
  lines = [f"### step_memory.py — {datetime.date.today()} — {common.device_name()} x {len(jax.devices())} — "
           f"jax {jax.__version__}", "",
           "Decode forward program (4 sequences at context 100) of a 2-layer tiny Llama with 8 query heads: XLA's "
           "temp bytes per device beside the per-device K pool (V is the same size). A temp that grows with the "
           "pool is a copy of it in every step.", "",
           "| KV heads | mesh | pages / layer | KV heads / device | K pool / device MB | forward temp MB |",
           "|---:|---|---:|---:|---:|---:|"] + [
           f"| {kv} | {m} | {p} | {k} | {pool / 1e6:.2f} | {t / 1e6:.2f} |" for kv, m, p, k, pool, t in rows] + [""]
  common.publish(lines, args.results)


if __name__ == "__main__":
  main()
