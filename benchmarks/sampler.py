"""Sampler step benchmark: jaxllm.sampling.sample (fast paths) against the straightforward sampler it replaced
(tests/sampler_oracle.py: full log_softmax, every stage applied, a full-vocabulary sort whenever a row samples).

Both are jitted and called as the engine calls them: with a [B, V] token history (penalties read it only if a row
asks) and num_top as the case needs. Each time is the median of --reps rounds of warm calls (>= 20 ms a round) on
the same inputs; the `path` column says how the fast sampler found the filter thresholds (see sampling.filter_path).
Prints a table and appends it to benchmarks/RESULTS.md under "## sampler".

    python benchmarks/sampler.py [--reps 9] [--vocab 49152] [--batch 1 32]

On a shared CPU only the speedup column (both sides measured in one run) means much.
"""

import argparse
import datetime
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import common

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: tests.sampler_oracle

from jaxllm.sampling import SamplingArrays, TokenHistory, filter_path, sample  # noqa: E402
from tests.sampler_oracle import sample_reference  # noqa: E402

# case -> (SamplingArrays.create settings, num_logprobs per row, num_top compiled in)
CASES = {
    "all greedy": (dict(temperature=0.0), 0, 0),
    "temperature 1.0": (dict(temperature=1.0), 0, 0),
    "top_k=50": (dict(temperature=1.0, top_k=50), 0, 0),
    "top_p=0.9": (dict(temperature=1.0, top_p=0.9), 0, 0),
    "penalties (rep 1.2, presence 0.5, freq 0.5)": (
        dict(temperature=1.0, repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5), 0, 0),
    "logprobs=5": (dict(temperature=1.0), 5, 5),
}
PATHS = ("max", "search")


def inputs(B: int, V: int, settings: dict, num_logprobs: int):
  """Logits scaled like a small LM's (std 3), a history of ~1% seen tokens, positions past any min_tokens."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((B, V)).astype(np.float32) * 3)
  s = SamplingArrays.create(B, seed=np.arange(B), **settings).replace(num_logprobs=np.full(B, num_logprobs, np.int32))
  counts = np.where(rng.random((B, V)) < 0.01, rng.integers(1, 4, (B, V)), 0).astype(np.int32)
  history = TokenHistory(output_counts=jnp.asarray(counts), in_prompt=jnp.asarray(rng.random((B, V)) < 0.01))
  return logits, jax.tree.map(jnp.asarray, s), jnp.full((B,), 100, jnp.int32), history


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--reps", type=int, default=9)
  ap.add_argument("--vocab", type=int, default=49152)
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
  ap.add_argument("--results", default=common.RESULTS)
  args = ap.parse_args()
  V = args.vocab
  fast = jax.jit(sample, static_argnames="num_top")
  reference = jax.jit(sample_reference, static_argnames="num_top")
  rows = []
  for B in args.batch:
    for case, (settings, num_logprobs, num_top) in CASES.items():
      logits, s, positions, history = inputs(B, V, settings, num_logprobs)
      path = "greedy" if not np.any(np.asarray(s.temperature) > 0) else PATHS[int(filter_path(s, V))]
      t_fast = common.median_ms(lambda *a: fast(*a, num_top=num_top), logits, s, positions, history,
                                reps=args.reps)
      t_ref = common.median_ms(lambda *a: reference(*a, num_top=num_top), logits, s, positions, history,
                               reps=args.reps)
      rows.append((case, B, path, t_fast, t_ref))
      print(f"{case} B={B}: {t_fast:.2f} ms vs {t_ref:.2f} ms", file=sys.stderr)
  device = jax.devices()[0].device_kind
  heading = [] if "\n## sampler\n" in open(args.results).read() else ["## sampler", ""]
  load = f" Load average during the run: {os.getloadavg()[0]:.1f}." if hasattr(os, "getloadavg") else ""
  lines = heading + [
      f"### sampler.py — {datetime.date.today()} — {device} ({common.device_name()}, jax {jax.__version__})", "",
      f"One sampler step on float32 logits, V={V}, median of {args.reps} rounds of warm jitted calls, both sides given "
      f"a [B, V] history as the engine does. Same tokens on both sides (tests/test_sampling.py).{load}", "",
      "| case | B | path | jaxllm ms | reference ms | speedup |", "|---|---:|---|---:|---:|---:|"]
  for case, B, path, t_fast, t_ref in rows:
    lines.append(f"| {case} | {B} | {path} | {t_fast:.2f} | {t_ref:.2f} | {t_ref / t_fast:.1f}x |")
  common.publish(lines + [""], args.results)


if __name__ == "__main__":
  main()
