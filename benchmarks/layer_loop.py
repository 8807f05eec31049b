"""The layer loop's form on this device: a decode step's forward program with the layers scanned vs unrolled
(`Llama.unroll_layers`), and on CPU scanned with the native weight matmuls (the default there: each layer's weights
read in place from the stacked arrays) vs XLA's dots (`Llama.native_matmul = False`: each layer's slice copied out
first), against the weights' bandwidth floor and the FLOPs' compute floor, with each program's compile time.

On an accelerator `Llama` unrolls the loop by default: in a scan XLA:GPU copies each layer's slice of the stacked weights
out before its GEMMs read it. This script is the measurement behind that default and the CPU's, for a preset's shape
with random weights (layers cut with --num_layers to keep compile time short):

    python benchmarks/layer_loop.py --preset llama3-8b --num_layers 8 --variants bf16,bf16+int8,bf16+q8_0
    python benchmarks/layer_loop.py --preset smollm2-135m --num_layers 30 --variants f32,f32+q8_0 --slots 1,32,256
"""

import argparse
import dataclasses
import datetime
import time

import common

VARIANTS = {"f32": ("float32", None), "bf16": ("bfloat16", None), "bf16+int8": ("bfloat16", "int8"),
            "bf16+q8_0": ("bfloat16", "q8_0"), "f32+int8": ("float32", "int8"), "f32+q8_0": ("float32", "q8_0")}
# form: (Llama.unroll_layers, Llama.native_matmul); None = the backend's default
FORMS = {"scan": (False, None), "scan-xla-dots": (False, False), "unrolled": (True, None)}


def forward_ms(eng, slots, context, reps=8):
  """(best ms of the compiled forward program, compile seconds) for `slots` sequences decoding at `context`."""
  import jax

  from jaxllm.serving import engine as engine_lib

  batch, state = common.decode_batch(eng, slots, context), eng.init_state()
  start = time.perf_counter()
  compiled = engine_lib._forward.lower(eng.graphdef, eng.params, state, batch,
                                       attention_impl=eng.config.attention_impl).compile()
  compile_s = time.perf_counter() - start
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    state, h, _ = compiled(eng.params, state, batch)
    jax.block_until_ready(h)
    best = min(best, time.perf_counter() - start)
  return best * 1e3, compile_s


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="llama3-8b")
  ap.add_argument("--num_layers", type=int, default=8, help="layers kept from the preset")
  ap.add_argument("--variants", default="bf16", help=f"comma-separated, of {', '.join(VARIANTS)}")
  ap.add_argument("--slots", default="1,32", help="sequences decoding in the step")
  ap.add_argument("--context", type=int, default=256)
  ap.add_argument("--forms", default=None, help=f"comma-separated, of {', '.join(FORMS)} (default: all on CPU, "
                  "scan and unrolled elsewhere)")
  ap.add_argument("--results", default=common.RESULTS)
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jaxllm.config import ModelConfig
  from jaxllm.layers import Llama
  from jaxllm.serving.config import EngineConfig
  from jaxllm.serving.engine import Engine

  forms = (args.forms or ",".join(FORMS if jax.default_backend() == "cpu" else ("scan", "unrolled"))).split(",")
  bandwidth = common.copy_bandwidth_gbs()
  slots_list = [int(s) for s in args.slots.split(",")]
  config = dataclasses.replace(ModelConfig.from_preset(args.preset), num_layers=args.num_layers)
  pages = max(max(slots_list) * -(-(args.context + 2) // 16), -(-(args.context + 64) // 16)) + 1  # >= 1 full sequence
  rows = []
  for name in args.variants.split(","):
    dtype, quantization = VARIANTS[name]
    model = Llama(config, dtype=jnp.dtype(dtype), quantization=quantization, rngs=nnx.Rngs(0))
    eng = Engine(model, EngineConfig(max_model_len=args.context + 64, max_num_seqs=max(slots_list),
                                     max_num_batched_tokens=max(512, max(slots_list)), num_pages=pages))
    layer_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model.layers)))  # what the layers read
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * jnp.dtype(eng.kv_dtype).itemsize
    tflops = common.matmul_tflops(dtype)
    c = config  # the projections' and MLP's weights: 2 FLOPs per weight per row
    layer_weights = c.num_layers * c.d_model * ((2 * c.num_heads + 2 * c.num_kv_heads) * c.head_dim + 3 * c.d_ff)
    for form in forms:
      model.unroll_layers, model.native_matmul = FORMS[form]
      eng.graphdef = nnx.split(model)[0]  # the loop's form is a static attribute of the traced program
      for slots in slots_list:
        ms, compile_s = forward_ms(eng, slots, args.context)
        floor_ms = (layer_bytes + slots * args.context * kv_per_token) / (bandwidth * 1e9) * 1e3
        compute_ms = 2 * layer_weights * slots / (tflops * 1e12) * 1e3
        rows.append((name, form, slots, ms, floor_ms, compute_ms, compile_s))
        print(rows[-1], flush=True)
    del eng, model

  lines = [f"### layer_loop.py — {datetime.date.today()} — {common.device_name()} — jax {jax.__version__}", "",
           f"{args.preset} shape with {args.num_layers} layers, random weights; decode forward program at context "
           f"{args.context} (no LM head); bandwidth floor = bytes of the layers' weights and of the K/V read / "
           f"{bandwidth:.0f} GB/s measured copy bandwidth; compute floor = 2 FLOPs per layer weight per sequence / "
           f"{tflops * 1e3:.0f} GFLOP/s measured "
           "matmul peak (attention's FLOPs left out). 'of floor' is the larger floor over the forward time.", "",
           "| variant | layer loop | sequences | forward ms | bandwidth floor ms | compute floor ms | of floor | "
           "compile s |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
  lines += [f"| {n} | {form} | {s} | {ms:.2f} | {f:.2f} | {cf:.2f} | {max(f, cf) / ms:.0%} | {c:.1f} |"
            for n, form, s, ms, f, cf, c in rows]
  common.publish(lines + [""], args.results)


if __name__ == "__main__":
  main()
