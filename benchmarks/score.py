"""Scoring throughput: jaxllm's length-bucketed scoring (the path of `jaxllm score` and `LLM.score`) vs transformers
doing the same work, in one run; and the padding fraction with and without length bucketing.

Workload: --num_records token sequences with log-normal lengths (median --median, clipped to [--min_len,
--max_len]), random vocabulary ids, each scored whole (logprob of every token after the first), float32.
  jaxllm bucketed:   `scoring.Scorer` (rows grouped by padded length, R x T <= --max_batch_tokens, R <= --max_batch_size).
  jaxllm unbucketed: the same Scorer with rows batched in arrival order (what a plain loader pays in padding).
  transformers:      rows sorted by length, batches of the same size cap, right-padded (a causal model's real
                     positions do not see it), log_softmax + gather of the targets, torch.no_grad.
  job:               `jaxllm.serving.score_job.run` end to end on a JSONL of the decoded texts (grain, tokenization
                     in --num_workers processes, checkpoints every --checkpoint_every records, output written).
Each side runs once untimed first (compilation, first-call overhead). Figure: scored tokens per second of wall time.
Also checked: both sides' summed logprobs agree per record.

    python benchmarks/score.py [--num_records 128] [--median 48]
"""

import argparse
import datetime
import json
import os
import tempfile
import time

import numpy as np

import common


def hf_score(model, rows, max_batch_size, max_batch_tokens):
  import torch

  out = [None] * len(rows)
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
  k = 0
  while k < len(order):
    T = len(rows[order[k]])
    n = max(1, min(max_batch_size, max_batch_tokens // T))
    idx = order[k:k + n]
    k += n
    batch = torch.zeros((len(idx), T), dtype=torch.long)
    for b, i in enumerate(idx):
      batch[b, :len(rows[i])] = torch.tensor(rows[i])
    with torch.no_grad():
      lp = torch.log_softmax(model(batch).logits.float(), -1)
      chosen = lp[:, :-1].gather(-1, batch[:, 1:, None])[..., 0].numpy()
    for b, i in enumerate(idx):
      out[i] = float(chosen[b, :len(rows[i]) - 1].sum(dtype=np.float64))
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--num_records", type=int, default=128)
  ap.add_argument("--median", type=int, default=48)
  ap.add_argument("--min_len", type=int, default=4)
  ap.add_argument("--max_len", type=int, default=512)
  ap.add_argument("--max_batch_size", type=int, default=64)
  ap.add_argument("--max_batch_tokens", type=int, default=4096)
  ap.add_argument("--num_workers", type=int, default=1)
  ap.add_argument("--checkpoint_every", type=int, default=64)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--skip_hf", action="store_true")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--results", default=common.RESULTS)
  args = ap.parse_args()

  from jaxllm import LLM
  from jaxllm.serving import score_job, scoring

  llm = LLM("default", dtype=args.dtype, max_model_len=args.max_len, max_num_seqs=1)
  rng = np.random.default_rng(args.seed)
  lengths = np.clip(np.round(rng.lognormal(np.log(args.median), 0.8, args.num_records)), args.min_len,
                    args.max_len).astype(int)
  rows = [rng.integers(3, llm.config.vocab_size, int(n)).tolist() for n in lengths]
  items = [scoring.text_item(r) for r in rows]
  scored = sum(len(r) - 1 for r in rows)

  results = {}
  for name, sort in (("bucketed", True), ("unbucketed", False)):
    scorer = scoring.Scorer(llm.engine, max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens,
                            sort_by_length=sort)
    scorer.score(items)  # compile this workload's buckets
    scorer.stats = scoring.Stats()
    start = time.perf_counter()
    got = scorer.score(items)
    seconds = time.perf_counter() - start
    results[name] = (seconds, scorer.stats.padding_fraction, scorer.stats.batches, [g.sum_logprob for g in got])

  # End to end: the same texts as JSONL records through the job (tokenization re-splits them a little).
  texts = [llm.tokenizer.decode(r) for r in rows]
  with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, "in.jsonl")
    with open(src, "w") as f:
      for i, t in enumerate(texts):
        f.write(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n")
    cfg = dict(num_workers=args.num_workers, checkpoint_every=args.checkpoint_every, overwrite=True,
               max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens, log_every_s=1e9)
    score_job.run(llm, score_job.JobConfig(src, os.path.join(tmp, "warm.jsonl"), **cfg))
    job = score_job.run(llm, score_job.JobConfig(src, os.path.join(tmp, "out.jsonl"), **cfg))

  hf = None
  if not args.skip_hf:
    import torch
    from transformers import AutoModelForCausalLM

    from jaxllm import default_model

    torch.set_num_threads(os.cpu_count())
    d, f = os.path.split(default_model.gguf_path())
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    hf_score(model, rows[:4], args.max_batch_size, args.max_batch_tokens)
    start = time.perf_counter()
    ref = hf_score(model, rows, args.max_batch_size, args.max_batch_tokens)
    hf = (time.perf_counter() - start, ref)

  device = common.device_name()
  day = datetime.date.today().isoformat()
  b_s, b_pad, b_n, b_lp = results["bucketed"]
  u_s, u_pad, u_n, _ = results["unbucketed"]
  lines = [
      "", f"## Scoring throughput ({day}, {device})", "",
      f"SmolLM2-135M-Instruct ({args.dtype}), {args.num_records} records, lengths log-normal median {args.median} in "
      f"[{args.min_len}, {args.max_len}] ({int(lengths.sum())} tokens, {scored} scored), max_batch_size "
      f"{args.max_batch_size}, max_batch_tokens {args.max_batch_tokens}; `python benchmarks/score.py`.", "",
      "| run | batches | padding | seconds | scored tok/s |", "|---|---:|---:|---:|---:|",
      f"| jaxllm, length-bucketed | {b_n} | {100 * b_pad:.1f}% | {b_s:.2f} | {scored / b_s:.0f} |",
      f"| jaxllm, arrival order | {u_n} | {100 * u_pad:.1f}% | {u_s:.2f} | {scored / u_s:.0f} |",
  ]
  if hf is not None:
    lines.append(f"| transformers, length-sorted batches | - | - | {hf[0]:.2f} | {scored / hf[0]:.0f} |")
  lines.append(f"| `score_job.run` end to end ({args.num_workers} grain workers) | - | "
               f"{100 * job['padding_fraction']:.1f}% | {job['seconds']:.2f} | "
               f"{job['scored_tokens'] / job['seconds']:.0f} |")
  if hf is not None:
    worst = max(abs(a - b) for a, b in zip(b_lp, hf[1]))
    lines += ["", f"jaxllm (bucketed) is {hf[0] / b_s:.2f}x transformers' speed; summed logprobs agree within "
              f"{worst:.1e} per record."]
  common.publish(lines, args.results)


if __name__ == "__main__":
  main()
