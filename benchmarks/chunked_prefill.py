"""Chunked prefill: a long prompt arriving while sequences decode. The decoders' inter-token latency (ITL) during its
prefill should be bounded by one chunk step's cost, not by the whole prompt's; the long prompt's output should equal
its output when prefilled in one step.

Scenario, run twice on the same prompts (greedy, EOS ignored, float32, `llm.warmup()` first so no step compiles):
  chunked:    max_num_batched_tokens = --max_num_batched_tokens; the prompt is prefilled over many steps, each
              step one decode token per decoder plus a chunk of what the budget leaves.
  one chunk:  max_num_batched_tokens = --prompt_len + --num_decoding; the whole prompt goes in one step (a second
              LLM, built after the first is deleted; its warmup compiles the larger buckets untimed).
  A. --num_decoding requests with short random prompts decode alone (--warm_tokens tokens first, then
     --alone_steps timed steps);
  B. a --prompt_len-token random prompt (--long_tokens output tokens) arrives; stepping goes on until its first
     token is absorbed (its TTFT);
  C. everything runs to completion.
Each request's `on_update` stamps `time.perf_counter()` whenever its output grows (the scheduler absorbs one step's
tokens while the next step runs, so a token's stamp is when the host got it). ITL = gaps between a decoder's
successive stamps: "alone" over phase A, "during the prefill" over the gaps that end in phase B. A chunk step's cost
is the wall time of the `Scheduler.step()` call that absorbs it (the call after the one that dispatched it).

    python benchmarks/chunked_prefill.py [--prompt_len 4000] [--num_decoding 8] [--max_num_batched_tokens 256]
    python benchmarks/chunked_prefill.py --prompt_len 300 --num_decoding 2 --max_num_batched_tokens 64 \\
        --decode_tokens 40 --results /tmp/scratch.md            # a smoke run
    python benchmarks/chunked_prefill.py --preset llama3-8b --num_layers 8 --dtype bfloat16 --max_num_batched_tokens 512
                                                                # on a GPU: a random model of a real shape
"""

import argparse
import dataclasses
import datetime
import gc
import os
import time

import numpy as np

import common


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
  """What one scenario measured (times in seconds)."""

  itl_alone: np.ndarray  # decoders' gaps between successive tokens in phase A
  itl_prefill: np.ndarray  # their gaps that end while the long prompt is prefilled (phase B)
  decode_step: float  # median step() wall time in phase A
  chunk_steps: np.ndarray  # wall time of each step() call that absorbed a step carrying a chunk of the long prompt
  ttft: float  # long prompt: from `add` to its first token on the host
  prefill_steps: int  # steps that carried a chunk of it
  long_output: list[int]
  decoder_outputs: list[list[int]]


def scenario(llm, short_prompts, long_prompt, args) -> Run:
  from jaxllm import SamplingParams

  sched = llm.scheduler
  stamps: dict[str, list[float]] = {}

  def on_update(req, delta):
    log = stamps.setdefault(req.request_id, [])
    if len(req.output_ids) > len(log):  # once per new token (a finishing call may repeat the count)
      log.append(time.perf_counter())

  def step() -> float:
    start = time.perf_counter()
    sched.step()
    return time.perf_counter() - start

  greedy = lambda n: SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)  # noqa: E731
  decoders = [sched.add(p, greedy(args.decode_tokens), on_update=on_update) for p in short_prompts]
  while min(len(r.output_ids) for r in decoders) < args.warm_tokens:
    step()
  a_start = time.perf_counter()
  alone_walls = [step() for _ in range(args.alone_steps)]
  a_end = time.perf_counter()

  long = sched.add(long_prompt, greedy(args.long_tokens), on_update=on_update)
  b_start = time.perf_counter()
  chunk_steps, carried, prefill_steps = [], False, 0
  while not long.output_ids:
    before = long.num_computed
    wall = step()
    if carried:
      chunk_steps.append(wall)
    carried = before < min(long.num_computed, len(long_prompt))  # a prompt chunk (its first decode row is not)
    prefill_steps += carried
  b_end = stamps[long.request_id][0]
  sched.run_until_done()
  if any(len(r.output_ids) != args.decode_tokens for r in decoders) or len(long.output_ids) != args.long_tokens:
    raise RuntimeError("a request ended early; the scenario needs every request to produce all its tokens.")

  def gaps(lo, hi, both_inside):
    """Decoders' gaps whose later token came in (lo, hi]; `both_inside`: the earlier one too."""
    out = []
    for r in decoders:
      t = np.asarray(stamps[r.request_id])
      keep = (t[1:] > lo) & (t[1:] <= hi) & ((t[:-1] >= lo) if both_inside else True)
      out.append(np.diff(t)[keep])
    return np.concatenate(out)

  if min(stamps[r.request_id][-1] for r in decoders) <= b_end:  # ITL during the prefill needs all of them
    raise RuntimeError(f"a decoder finished before the long prompt's first token; raise --decode_tokens "
                       f"(now {args.decode_tokens}).")
  return Run(itl_alone=gaps(a_start, a_end, True), itl_prefill=gaps(b_start, b_end, False),
             decode_step=float(np.median(alone_walls)), chunk_steps=np.asarray(chunk_steps), ttft=b_end - b_start,
             prefill_steps=prefill_steps,
             long_output=list(long.output_ids), decoder_outputs=[list(r.output_ids) for r in decoders])


def first_difference(a: list[int], b: list[int]) -> int | None:
  """Index of the first differing token (None if equal)."""
  for i, (x, y) in enumerate(zip(a, b)):
    if x != y:
      return i
  return None if len(a) == len(b) else min(len(a), len(b))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--prompt_len", type=int, default=4000, help="the long prompt's tokens")
  ap.add_argument("--num_decoding", type=int, default=8, help="sequences decoding when it arrives")
  ap.add_argument("--max_num_batched_tokens", type=int, default=256, help="the chunked run's step budget")
  ap.add_argument("--short_len", type=int, default=16, help="the decoders' prompt tokens")
  ap.add_argument("--long_tokens", type=int, default=16, help="tokens the long prompt generates")
  ap.add_argument("--warm_tokens", type=int, default=4, help="decoder tokens before phase A is timed")
  ap.add_argument("--alone_steps", type=int, default=32, help="timed steps of the decoders alone (phase A)")
  ap.add_argument("--decode_tokens", type=int, default=None,
                  help="tokens each decoder generates (default: enough to outlast the chunked prefill)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--dtype", default="float32", help="float32 or bfloat16")
  ap.add_argument("--preset", default=None, help="a configs/models.toml preset with random weights instead of the "
                  "default model, e.g. llama3-8b on a GPU")
  ap.add_argument("--num_layers", type=int, default=None, help="with --preset: layers kept (compile time on a GPU)")
  ap.add_argument("--results", default=common.RESULTS)
  args = ap.parse_args()
  chunk = args.max_num_batched_tokens - args.num_decoding
  if chunk < 1:
    ap.error(f"--max_num_batched_tokens={args.max_num_batched_tokens} leaves no room for a prefill chunk beside "
             f"{args.num_decoding} decode tokens.")
  if args.decode_tokens is None:
    args.decode_tokens = args.warm_tokens + args.alone_steps + -(-args.prompt_len // chunk) + args.long_tokens + 8

  import jax

  from jaxllm import LLM

  page = 16
  max_len = -(-max(args.prompt_len + max(64, args.long_tokens), args.short_len + args.decode_tokens + 1) // page) * page
  budgets = {"chunked": args.max_num_batched_tokens, "one chunk": args.prompt_len + args.num_decoding}
  runs, vocab = {}, None
  for name, budget in budgets.items():
    if args.preset:
      llm = common.RandomModel(args.preset, args.dtype, max_len, args.num_decoding + 1, page_size=page,
                               max_num_batched_tokens=budget, num_layers=args.num_layers)
    else:
      llm = LLM("default", dtype=args.dtype, max_model_len=max_len, max_num_seqs=args.num_decoding + 1,
                max_num_batched_tokens=budget, page_size=page)
    if vocab is None:
      vocab = llm.config.vocab_size
      rng = np.random.default_rng(args.seed)
      short_prompts = [rng.integers(3, vocab, args.short_len).tolist() for _ in range(args.num_decoding)]
      long_prompt = rng.integers(3, vocab, args.prompt_len).tolist()
    start = time.perf_counter()
    llm.warmup()
    print(f"{name}: max_num_batched_tokens={budget}, warmup {time.perf_counter() - start:.1f} s", flush=True)
    runs[name] = scenario(llm, short_prompts, long_prompt, args)
    del llm
    gc.collect()

  ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
  cols = list(runs.values())
  row = lambda label, f: f"| {label} | " + " | ".join(f(r) for r in cols) + " |"  # noqa: E731
  chunked, one = runs["chunked"], runs["one chunk"]
  diff = first_difference(chunked.long_output, one.long_output)
  same_decoders = sum(a == b for a, b in zip(chunked.decoder_outputs, one.decoder_outputs))
  lines = [
      f"### chunked_prefill.py — {datetime.date.today()} — {common.device_name()} — jax {jax.__version__}",
      "",
      (f"{args.preset} shape{f' cut to {args.num_layers} layers' if args.num_layers else ''}, random weights"
       if args.preset else "SmolLM2-135M-Instruct") + f" ({args.dtype}), greedy: {args.num_decoding} sequences ({args.short_len}-token random "
      f"prompts) decode, then a {args.prompt_len}-token random prompt arrives ({args.long_tokens} output tokens); "
      f"max_num_seqs {args.num_decoding + 1}, every bucket compiled before timing; ITL over the decoders' tokens, "
      f"'alone' over {args.alone_steps} steps before the long prompt, 'during the prefill' until its first token; "
      f"a chunk step = the `Scheduler.step()` call that absorbs it; one run each"
      + (f"; load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "") + ".",
      "",
      "| | " + " | ".join(f"{n} (max_num_batched_tokens {b})" for n, b in budgets.items()) + " |",
      "|---|" + "---:|" * len(cols),
      row("decoders' ITL alone, p50 / max ms", lambda r: f"{ms(np.median(r.itl_alone))} / {ms(r.itl_alone.max())}"),
      row("decoders' ITL during the long prefill, p50 / max ms",
          lambda r: f"{ms(np.median(r.itl_prefill))} / {ms(r.itl_prefill.max())}"),
      row("decode-only step, median ms", lambda r: ms(r.decode_step)),
      row("step carrying a prefill chunk, median / max ms",
          lambda r: f"{ms(np.median(r.chunk_steps))} / {ms(r.chunk_steps.max())}"),
      row("long prompt TTFT ms", lambda r: ms(r.ttft)),
      row("steps carrying its prefill", lambda r: str(r.prefill_steps)),
      "",
      f"The long prompt's {args.long_tokens} greedy tokens, chunked vs one chunk: "
      + ("equal." if diff is None else f"differ from token {diff} on.")
      + f" Decoders' {args.decode_tokens} tokens equal in both runs: {same_decoders}/{args.num_decoding}.",
      "",
  ]
  common.publish(lines, args.results)


if __name__ == "__main__":
  main()
