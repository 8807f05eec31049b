"""The layer loop's form on this device: a decode step's forward program with the layers scanned vs unrolled
(`Llama.unroll_layers`), against the weights' bandwidth floor, with each program's compile time.

On an accelerator `Llama` unrolls the loop by default: in a scan XLA:GPU copies each layer's slice of the stacked weights
out before its GEMMs read it. This script is the measurement behind that default, for a preset's shape with random
weights (layers cut with --num_layers to keep compile time short):

    python benchmarks/layer_loop.py --preset llama3-8b --num_layers 8 --variants bf16,bf16+int8,bf16+q8_0
"""

import argparse
import dataclasses
import datetime
import time

import common

VARIANTS = {"f32": ("float32", None), "bf16": ("bfloat16", None), "bf16+int8": ("bfloat16", "int8"),
            "bf16+q8_0": ("bfloat16", "q8_0"), "f32+int8": ("float32", "int8")}


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
  ap.add_argument("--results", default=common.RESULTS)
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jaxllm.config import ModelConfig
  from jaxllm.layers import Llama
  from jaxllm.serving.config import EngineConfig
  from jaxllm.serving.engine import Engine

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
    floor_ms = sum(x.nbytes for x in jax.tree.leaves(eng.params)) / (bandwidth * 1e9) * 1e3
    for unroll in (False, True):
      model.unroll_layers = unroll
      eng.graphdef = nnx.split(model)[0]  # the loop's form is a static attribute of the traced program
      for slots in slots_list:
        ms, compile_s = forward_ms(eng, slots, args.context)
        rows.append((name, "unrolled" if unroll else "scan", slots, ms, floor_ms, compile_s))
        print(rows[-1], flush=True)
    del eng, model

  lines = [f"### layer_loop.py — {datetime.date.today()} — {common.device_name()} — jax {jax.__version__}", "",
           f"{args.preset} shape with {args.num_layers} layers, random weights; decode forward program at context "
           f"{args.context}; bandwidth floor = bytes of the placed weights / {bandwidth:.0f} GB/s measured copy "
           "bandwidth.", "",
           "| variant | layer loop | sequences | forward ms | floor ms | of floor | compile s |",
           "|---|---|---:|---:|---:|---:|---:|"]
  lines += [f"| {n} | {form} | {s} | {ms:.2f} | {f:.2f} | {f / ms:.0%} | {c:.1f} |" for n, form, s, ms, f, c in rows]
  common.publish(lines + [""], args.results)


if __name__ == "__main__":
  main()
