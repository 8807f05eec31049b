"""Greedy decode throughput of `LLM("default")` vs transformers `generate` on the same prompts, in one run.

Both sides: float32, the same prompt token ids, exactly --new_tokens generated tokens per prompt (EOS ignored), batch
sizes from --batch_sizes, a warm-up pass first (jit compilation / torch first-call overhead are not timed). The figure
is generated tokens per second of wall time, prefill included. Prints a table and appends it to benchmarks/RESULTS.md.

    python benchmarks/generate_cpu.py [--new_tokens 64] [--batch_sizes 1,8] [--weights f32,bf16,int8,kv-int8]
"""

import argparse
import datetime
import os
import time

import common

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def quicksort(arr):",
    "In 1969, the first humans landed on",
    "The three primary colors are",
    "Explain photosynthesis in simple terms:",
    "Once upon a time there was a dragon who",
    "The best way to learn a new language is",
]


def time_ours(llm, batch, new_tokens):
  from jaxllm import SamplingParams

  params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
  llm.generate(prompt_token_ids=batch, sampling_params=params)  # compile
  start = time.perf_counter()
  out = llm.generate(prompt_token_ids=batch, sampling_params=params)
  elapsed = time.perf_counter() - start
  assert all(len(o.token_ids) == new_tokens for o in out)
  return elapsed


def time_hf(model, batch, new_tokens, pad_id):
  import torch

  width = max(len(b) for b in batch)  # left padding, as HF batched generation requires
  ids = torch.tensor([[pad_id] * (width - len(b)) + b for b in batch])
  mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
  kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                pad_token_id=pad_id)
  with torch.no_grad():
    model.generate(ids, **kwargs)
    start = time.perf_counter()
    out = model.generate(ids, **kwargs)
    elapsed = time.perf_counter() - start
  assert out.shape[1] - width == new_tokens
  return elapsed


VARIANTS = {"f32": dict(dtype="float32"), "bf16": dict(dtype="bfloat16"), "int8": dict(quantization="int8"),
            "q8_0": dict(quantization="q8_0"),
            "bf16+int8": dict(dtype="bfloat16", quantization="int8"), "kv-int8": dict(kv_cache_dtype="int8"),
            "kv-fp8": dict(kv_cache_dtype="fp8")}
VARIANTS = {name: {"quantization": None, **v} for name, v in VARIANTS.items()}  # float unless named (not "auto")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--batch_sizes", default="1,8")
  ap.add_argument("--max_model_len", type=int, default=512, help="each engine's context (prompt + new tokens); it "
                  "sizes the KV cache, so the default model's 8,192 would hold GBs per variant")
  ap.add_argument("--weights", default="f32", help=f"comma-separated jaxllm weight / KV-cache variants: "
                  f"{', '.join(VARIANTS)}")
  ap.add_argument("--results", default=common.RESULTS)
  args = ap.parse_args()

  import jax
  import torch
  from transformers import AutoModelForCausalLM

  from jaxllm import LLM, default_model

  torch.set_num_threads(os.cpu_count())
  path = default_model.gguf_path()
  hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                            dtype=torch.float32).eval()
  sizes = [int(x) for x in args.batch_sizes.split(",")]
  variants = args.weights.split(",")
  rows, theirs, weight_bytes = [], {}, {}
  for name in variants:
    llm = LLM("default", max_model_len=args.max_model_len, max_num_seqs=max(sizes), **VARIANTS[name])
    weight_bytes[name] = sum(x.nbytes for x in jax.tree.leaves(llm.engine.params))  # what a decode step streams
    for b in sizes:
      batch = [llm.tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(b)]
      if b not in theirs:
        theirs[b] = b * args.new_tokens / time_hf(hf, batch, args.new_tokens, llm.tokenizer.pad_id or 0)
      rows.append((name, b, b * args.new_tokens / time_ours(llm, batch, args.new_tokens)))
    del llm
    jax.clear_caches()  # the next variant compiles its own programs; these would only hold memory

  bandwidth = common.copy_bandwidth_gbs()
  device = common.device_name()
  lines = [
      f"### generate_cpu.py — {datetime.date.today()} — {device}",
      "",
      f"SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized; int8 / q8_0: requantized per output channel / per block of "
      f"32, embedding / LM head kept float; kv-*: the KV cache's dtype), greedy, {args.new_tokens} new tokens per prompt, prefill included, one run; transformers in "
      f"float32. Batch-1 bound: weight bytes per step at a measured {bandwidth:.1f} GB/s copy bandwidth.",
      "",
      "| weights | bytes/step | bound tok/s (b=1) | batch | jaxllm tok/s | transformers f32 tok/s | ratio |",
      "|---|---:|---:|---:|---:|---:|---:|",
  ] + [f"| {n} | {weight_bytes[n] / 1e6:.0f} MB | {bandwidth * 1e9 / weight_bytes[n]:.0f} | {b} | {o:.1f} | "
       f"{theirs[b]:.1f} | {o / theirs[b]:.2f}x |" for n, b, o in rows] + [""]
  common.publish(lines, args.results)


if __name__ == "__main__":
  main()
