"""Structured outputs on the default model: how often constrained outputs validate, and what constraints cost.

    python benchmarks/structured_outputs.py [--num_schemas 50] [--temperature 1.0]

Three runs of the same chat prompts (one per JSON schema: nested objects, arrays with bounds, enums, numbers with
ranges, required fields, additionalProperties false), all submitted at once and batched together:
  free        no request constrained;
  half        every other request constrained to its schema (the others as in `free`);
  all         every request constrained: each output is parsed and validated with `jsonschema`.
Reported: output tokens per second of each run (the cost of constraints, measured in one process), the mean engine
step time, the steps that sampled constrained rows and the host time spent computing their masks, and the share of
constrained outputs that are valid JSON matching their schema.
"""

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

WORDS = ["name", "title", "city", "owner", "color", "status", "kind", "label", "score", "count", "level", "price",
         "tags", "items", "size", "email", "note", "rank", "year", "code"]


def make_schemas(n: int, seed: int = 0) -> list[dict]:
  """n varied JSON schemas (deterministic for a seed): objects nesting objects and arrays, enums, bounded numbers,
  required fields, additionalProperties false. Strings and arrays are bounded (maxLength / maxItems) and every
  number has a range, as a schema meant for a model's output should: an unbounded string or integer lets a sampled
  model go on until max_tokens."""
  rng = np.random.default_rng(seed)

  def leaf(depth):
    kind = rng.choice(["string", "integer", "number", "boolean", "enum", "array", "object"] if depth < 2 else
                      ["string", "integer", "number", "boolean", "enum"])
    if kind == "string":
      return {"type": "string", "maxLength": int(rng.integers(8, 40))}
    if kind == "integer":
      lo = int(rng.integers(-100, 100))
      return {"type": "integer", "minimum": lo, "maximum": lo + int(rng.integers(1, 10_000))}
    if kind == "number":
      return {"type": "number", "minimum": 0, "maximum": float(rng.choice([1, 100, 1e6]))}
    if kind == "boolean":
      return {"type": "boolean"}
    if kind == "enum":
      return {"enum": [str(w) for w in rng.choice(WORDS, size=int(rng.integers(2, 5)), replace=False)]}
    if kind == "array":
      return {"type": "array", "items": leaf(depth + 1), "minItems": int(rng.integers(0, 2)),
              "maxItems": int(rng.integers(2, 5))}
    return obj(depth + 1)

  def obj(depth):
    keys = [str(k) for k in rng.choice(WORDS, size=int(rng.integers(2, 5)), replace=False)]
    props = {k: leaf(depth) for k in keys}
    required = [k for k in keys if rng.random() < 0.7] or keys[:1]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}

  return [obj(0) for _ in range(n)]


def prompt_for(schema: dict) -> list[dict]:
  return [{"role": "user", "content": "Reply with one JSON object with the fields " + ", ".join(schema["properties"])
           + "."}]


def run(llm, convs, params):
  sched = llm.scheduler
  steps0, guided0, mask0 = sched.num_steps, sched.num_guided_steps, sched.mask_seconds
  start = time.perf_counter()
  outs = llm.chat(convs, params, use_tqdm=False)
  seconds = time.perf_counter() - start
  tokens = sum(len(o.outputs[0].token_ids) for o in outs)
  steps = sched.num_steps - steps0
  return dict(outs=outs, seconds=seconds, tokens=tokens, steps=steps, guided=sched.num_guided_steps - guided0,
              mask_ms=(sched.mask_seconds - mask0) * 1e3)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--num_schemas", type=int, default=50)
  ap.add_argument("--temperature", type=float, default=1.0)
  ap.add_argument("--max_tokens", type=int, default=256)
  ap.add_argument("--max_num_seqs", type=int, default=16)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--results", default=common.RESULTS)
  args = ap.parse_args()

  import jsonschema

  from jaxllm import LLM, SamplingParams, StructuredOutputsParams

  llm = LLM("default", max_model_len=1024, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=256)
  llm.warmup()
  schemas = make_schemas(args.num_schemas, args.seed)
  convs = [prompt_for(s) for s in schemas]

  def params(constrained):
    return [SamplingParams(temperature=args.temperature, seed=args.seed + i, max_tokens=args.max_tokens,
                           structured_outputs=StructuredOutputsParams(json=s) if c else None)
            for i, (s, c) in enumerate(zip(schemas, constrained))]

  n = len(schemas)
  runs = {"free": run(llm, convs, params([False] * n)),
          "half": run(llm, convs, params([i % 2 == 0 for i in range(n)])),
          "all": run(llm, convs, params([True] * n))}
  valid, failures = 0, []
  for i, (s, o) in enumerate(zip(schemas, runs["all"]["outs"])):
    try:
      jsonschema.validate(json.loads(o.outputs[0].text), s)
      valid += 1
    except (ValueError, jsonschema.ValidationError) as e:
      failures.append(f"schema {i}: {type(e).__name__}: {str(e)[:100]} ({o.outputs[0].finish_reason})")
  base = runs["free"]["tokens"] / runs["free"]["seconds"]
  lines = [f"### structured_outputs.py — {datetime.date.today()} — {common.device_name()}", "",
           f"SmolLM2-135M-Instruct (default model, f32), {n} chat requests (one per generated JSON schema), "
           f"temperature {args.temperature}, max_tokens {args.max_tokens}, {args.max_num_seqs} sequences at a time; "
           "one run each, in one process.", "",
           "| run | output tokens | seconds | output tok/s | vs free | steps | tokens / step | ms / step | "
           "constrained steps | mask ms / constrained step |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name, r in runs.items():
    tps, steps = r["tokens"] / r["seconds"], max(r["steps"], 1)
    lines.append(f"| {name} | {r['tokens']} | {r['seconds']:.1f} | {tps:.1f} | {tps / base:.2f}x | {r['steps']} | "
                 f"{r['tokens'] / steps:.1f} | {r['seconds'] / steps * 1e3:.0f} | {r['guided']} | "
                 f"{r['mask_ms'] / max(r['guided'], 1):.2f} |")
  lines += ["", "Constrained outputs end when their JSON closes, so they are shorter and the batch thins out sooner "
            "(tokens / step); the cost of the constraint itself is the ms / step."]
  lines += ["", f"Constrained outputs that parse and validate with jsonschema: **{valid}/{n}**."]
  lines += [f"- {f}" for f in failures] + [""]
  common.publish(lines, args.results)


if __name__ == "__main__":
  main()
