"""Greedy decode throughput of `LLM("default")` vs transformers `generate` on the same prompts, in one run.

Both sides: float32, the same prompt token ids, exactly --new_tokens generated tokens per prompt (EOS ignored), batch
sizes from --batch_sizes, a warm-up pass first (jit compilation / torch first-call overhead are not timed). The figure
is generated tokens per second of wall time, prefill included. Prints a table and appends it to benchmarks/RESULTS.md.

    python benchmarks/generate_cpu.py [--new_tokens 64] [--batch_sizes 1,8]
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


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--batch_sizes", default="1,8")
  ap.add_argument("--results", default=common.RESULTS)
  args = ap.parse_args()

  import torch
  from transformers import AutoModelForCausalLM

  from jaxllm import LLM, default_model

  torch.set_num_threads(os.cpu_count())
  llm = LLM("default", dtype="float32")
  path = default_model.gguf_path()
  hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                            dtype=torch.float32).eval()
  rows = []
  for b in [int(x) for x in args.batch_sizes.split(",")]:
    batch = [llm.tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(b)]
    ours = time_ours(llm, batch, args.new_tokens)
    theirs = time_hf(hf, batch, args.new_tokens, llm.tokenizer.pad_id or 0)
    rows.append((b, b * args.new_tokens / ours, b * args.new_tokens / theirs))

  bandwidth = common.copy_bandwidth_gbs()
  weight_bytes = llm.config.num_params * 4
  ceiling = bandwidth * 1e9 / weight_bytes  # batch-1 steps/s if a step did nothing but stream the f32 weights
  device = common.device_name()
  lines = [
      f"### generate_cpu.py — {datetime.date.today()} — {device}",
      "",
      f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32), greedy, {args.new_tokens} new tokens per prompt, "
      "prefill included, one run.",
      f"Memory-bandwidth bound for batch 1: {weight_bytes / 1e6:.0f} MB of f32 weights per step at a measured "
      f"{bandwidth:.1f} GB/s copy bandwidth = at most {ceiling:.0f} tok/s.",
      "",
      "| batch | jaxllm tok/s | transformers tok/s | ratio |",
      "|---:|---:|---:|---:|",
  ] + [f"| {b} | {o:.1f} | {t:.1f} | {o / t:.2f}x |" for b, o, t in rows] + [""]
  common.publish(lines, args.results)


if __name__ == "__main__":
  main()
