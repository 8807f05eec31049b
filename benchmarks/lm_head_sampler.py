"""Where a decode step's "LM head + sampler" time goes at a large vocabulary (e.g. Llama-3's 128,256 on a GPU).

Times, for 1 and --rows sequences, each stage of the engine's `pick` program on its own and the program whole: the LM
head as the model computes it (float32 accumulation and result) and as a plain dot in the weights' dtype upcast after,
the argmax alone (`jnp.argmax` and `jaxllm.sampling.argmax`), `jaxllm.sampling.greedy` (argmax + its logprob: what a
batch of bare greedy rows runs), the sampler (`jaxllm.sampling.sample`) on greedy rows / with top-n logprobs / drawing
with top_p, and `pick` as the engine compiles it: the argmax program (greedy rows) and the sampler program (under an
all-ones bitmask). The model is the preset's shape cut to --layers layers with random weights (the LM head and the
sampler do not depend on the layers). Also reads the optimized HLO of each LM head and of `pick`: whether a float32 copy
of the [V, D] weight is materialized before the GEMM, and how many conditionals the program has (on XLA:GPU each one
reads its predicate back to the host). Times are medians of rounds of back-to-back calls (>= 20 ms a round). Prints a
table and appends it to benchmarks/RESULTS.md.

    python benchmarks/lm_head_sampler.py --preset llama3-8b --dtype bfloat16   # on a GPU
    python benchmarks/lm_head_sampler.py --preset smollm2-135m --dtype float32 --reps 3   # a CPU smoke run
"""

import argparse
import dataclasses
import datetime
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

import common


def hlo_facts(compiled_text: str, V: int, D: int, dtype) -> str:
  """Whether the optimized HLO of a model in a narrower dtype makes a float32 [V, D] / [D, V] weight outside a GEMM
  fusion (an upcast materialized before the GEMM; inside one the convert happens as the tiles load), and how many
  conditionals the program runs."""
  pattern = re.compile(rf"f32\[({V},{D}|{D},{V})\]")
  copies = dtype != jnp.float32 and any(
      pattern.search(block) and "gemm" not in block.split("\n", 1)[0] for block in compiled_text.split("\n\n"))
  conds = len(re.findall(r"\bconditional\(", compiled_text))
  return f"{'f32 weight materialized' if copies else 'weight read in place'}, {conds} conditionals"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="llama3-8b")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--layers", type=int, default=1)
  ap.add_argument("--rows", type=int, default=32)
  ap.add_argument("--reps", type=int, default=9)
  ap.add_argument("--hlo_dir", default=None, help="write the optimized HLO of each program here")
  ap.add_argument("--results", default=common.RESULTS)
  args = ap.parse_args()

  from flax import nnx

  from jaxllm.config import ModelConfig
  from jaxllm.layers import Llama
  from jaxllm.sampling import SamplingArrays, argmax, greedy, sample
  from jaxllm.serving import engine as engine_lib
  from jaxllm.serving.config import EngineConfig

  mc = ModelConfig.from_preset(args.preset)
  mc = dataclasses.replace(mc, num_layers=args.layers,
                           sliding_layers=None if mc.sliding_layers is None else mc.sliding_layers[:args.layers])
  dtype = jnp.dtype(args.dtype)
  model = Llama(mc, dtype=dtype, rngs=nnx.Rngs(0))
  V, D = mc.vocab_size, mc.d_model
  eng = engine_lib.Engine(model, EngineConfig(max_model_len=512, max_num_seqs=args.rows, max_num_batched_tokens=512,
                                              num_pages=args.rows * 33 + 1))
  w = model.embed_VD[...] if model.lm_head_DV is None else model.lm_head_DV[...]
  graphdef, params = nnx.split(model)

  # The weights go in as arguments: a closed-over array would be a compile-time constant.
  def head_model(params, h_SD):
    return nnx.merge(graphdef, params).logits(h_SD[None])[0]

  def head_plain(w, h_SD):
    return jnp.einsum("SD,VD->SV" if model.lm_head_DV is None else "SD,DV->SV", h_SD, w).astype(jnp.float32)

  lines = [f"### lm_head_sampler.py — {datetime.date.today()} — {common.device_name()} — jax {jax.__version__}", "",
           f"{args.preset} shape ({mc.num_layers} layer{'s' if mc.num_layers > 1 else ''}), {args.dtype} weights, "
           f"V = {V}, D = {D}; median of {args.reps} rounds of back-to-back calls. The LM head's floor: its weight "
           f"read once at the measured copy bandwidth.", "",
           "| stage | rows | ms | HLO |", "|---|---:|---:|---|"]
  bandwidth = common.copy_bandwidth_gbs()
  head_floor_ms = w.nbytes / (bandwidth * 1e9) * 1e3
  rng = np.random.default_rng(0)
  num_top = eng.config.num_top_logprobs
  for rows in sorted({1, args.rows}):
    h = jnp.asarray(rng.standard_normal((rows, D)), dtype)
    logits = jax.block_until_ready(jax.jit(head_model)(params, h))
    greedy_rows = SamplingArrays.create(rows, temperature=0.0)
    top = dataclasses.replace(greedy_rows, num_logprobs=np.full((rows,), 5, np.int32))
    draw = SamplingArrays.create(rows, temperature=1.0, top_p=0.9)
    pos = jnp.zeros((rows,), jnp.int32)
    stages = [
        ("LM head as the model (float32 accumulation and result)", jax.jit(head_model), (params, h)),
        ("LM head, plain dot in the weights' dtype, then upcast", jax.jit(head_plain), (w, h)),
        ("jnp.argmax alone", jax.jit(lambda x: jnp.argmax(x, axis=-1)), (logits,)),
        ("sampling.argmax alone (what greedy and sample use)", jax.jit(argmax), (logits,)),
        ("greedy() (argmax and its logprob)", jax.jit(greedy), (logits,)),
        ("sample, greedy rows", jax.jit(lambda x, s: sample(x, s, pos)), (logits, greedy_rows)),
        (f"sample, greedy, num_top={num_top} compiled in, 5 asked",
         jax.jit(lambda x, s: sample(x, s, pos, num_top=num_top)), (logits, top)),
        ("sample, temperature 1, top_p 0.9", jax.jit(lambda x, s: sample(x, s, pos)), (logits, draw)),
    ]
    for name, fn, a in stages:
      print(f"{name}, {rows} rows: {time.strftime('%T')}", flush=True)
      ms = common.median_ms(fn, *a, reps=args.reps)
      facts = hlo_facts(fn.lower(*a).compile().as_text(), V, D, dtype) if name.startswith("LM head") else ""
      lines.append(f"| {name} | {rows} | {ms:.3f} | {facts} |")
      print(lines[-1], flush=True)
    batch = common.decode_batch(eng, rows, 64)
    st = eng.init_state()
    st, hs, _ = eng.forward(st, batch)
    # Donating the state, as the engine does (an undonated state is copied by every call: ~10 ms at 32 rows on CPU);
    # each call's state feeds the next.
    pick = jax.jit(engine_lib.pick, static_argnums=0, static_argnames="num_top", donate_argnums=2)
    for kind, mask in [("argmax program, greedy rows", None), ("sampler program, greedy rows", eng.full_bitmask(rows))]:
      state = [jax.tree.map(jnp.copy, st)]
      compiled = pick.lower(eng.graphdef, eng.params, state[0], hs, batch.seqs, mask, num_top=num_top).compile()

      def call():
        state[0], result = compiled(eng.params, state[0], hs, batch.seqs, mask)
        return result.tokens

      ms = common.median_ms(call, reps=args.reps)
      text = compiled.as_text()
      if args.hlo_dir:
        os.makedirs(args.hlo_dir, exist_ok=True)
        with open(os.path.join(args.hlo_dir, f"pick_{kind.split()[0]}_{rows}.txt"), "w") as f:
          f.write(text)
      lines.append(f"| pick (the engine's {kind}: LM head + sampler + state updates) | {rows} | {ms:.3f} | "
                   f"{hlo_facts(text, V, D, dtype)} |")
      print(lines[-1], flush=True)
  lines += ["", f"LM head floor: {w.nbytes / 1e6:.0f} MB at {bandwidth:.0f} GB/s = {head_floor_ms:.3f} ms.", ""]
  common.publish(lines, args.results)


if __name__ == "__main__":
  main()
