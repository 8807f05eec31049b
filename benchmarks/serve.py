"""Online serving benchmark: a load generator for an OpenAI-compatible server, after `vllm bench serve`.

Sends --num_prompts streaming completion requests (EOS ignored, so each generates exactly its output length) at
--request_rate requests/s (Poisson arrivals; inf: all at once), at most --max_concurrency in flight, and reports
request and output-token throughput and TTFT / TPOT / ITL mean, median and p99, as vLLM's benchmark does:
  TTFT  arrival of the request to its first generated text,
  TPOT  (latency - TTFT) / (output tokens - 1), per request,
  ITL   the gaps between successive streamed chunks.
Datasets: `random` (prompt and output lengths uniform in [len * (1 - range_ratio), len], random token ids) or
`sharegpt` (a ShareGPT JSON file: the first human turn is the prompt, the first reply's token count the output
length). With --launch the script starts `jaxllm serve` on a free port itself and stops it afterwards.

    python benchmarks/serve.py --launch --num_prompts 64 --max_concurrency 16
    python benchmarks/serve.py --base_url http://127.0.0.1:8000 --dataset_name sharegpt --dataset_path sg.json
"""

import argparse
import asyncio
import datetime
import json
import socket
import subprocess
import sys
import time

import numpy as np

import common


def random_requests(args, rng, vocab):
  lo_in = max(1, int(args.random_input_len * (1 - args.random_range_ratio)))
  lo_out = max(1, int(args.random_output_len * (1 - args.random_range_ratio)))
  ins = rng.integers(lo_in, args.random_input_len + 1, args.num_prompts)
  outs = rng.integers(lo_out, args.random_output_len + 1, args.num_prompts)
  return [(rng.integers(3, vocab, int(n)).tolist(), int(n), int(o)) for n, o in zip(ins, outs)]


def sharegpt_requests(args, rng, tokenize):
  with open(args.dataset_path) as f:
    data = json.load(f)
  out = []
  for conv in (data[i] for i in rng.permutation(len(data))):
    turns = conv.get("conversations") or []
    if len(turns) < 2:
      continue
    prompt, reply = turns[0]["value"], turns[1]["value"]
    n_in, n_out = len(tokenize(prompt)), len(tokenize(reply))
    if n_in < 4 or n_out < 4 or n_in + n_out > args.max_model_len:
      continue
    out.append((prompt, n_in, n_out))
    if len(out) == args.num_prompts:
      break
  return out


async def one_request(session, url, model, prompt, max_tokens):
  body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
          "stream": True, "stream_options": {"include_usage": True}}
  start = time.perf_counter()
  ttft, last, itl, tokens = None, None, [], 0
  async with session.post(url, json=body) as r:
    if r.status != 200:
      return {"ok": False, "error": f"{r.status}: {(await r.text())[:200]}"}
    async for raw in r.content:
      line = raw.decode().strip()
      if not line.startswith("data: "):
        continue
      payload = line[6:]
      if payload == "[DONE]":
        break
      chunk = json.loads(payload)
      if chunk.get("usage"):
        tokens = chunk["usage"]["completion_tokens"]
      if chunk["choices"] and chunk["choices"][0]["text"]:
        now = time.perf_counter()
        if ttft is None:
          ttft = now - start
        else:
          itl.append(now - last)
        last = now
  latency = time.perf_counter() - start
  return {"ok": True, "ttft": ttft or latency, "latency": latency, "itl": itl, "tokens": tokens,
          "tpot": (latency - (ttft or latency)) / (tokens - 1) if tokens > 1 else None}


async def run(args, requests, model):
  import aiohttp

  url = args.base_url.rstrip("/") + "/v1/completions"
  rng = np.random.default_rng(args.seed + 1)
  limit = asyncio.Semaphore(args.max_concurrency or len(requests))
  async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:

    async def limited(prompt, n_out):
      async with limit:
        return await one_request(session, url, model, prompt, n_out)

    tasks = []
    start = time.perf_counter()
    for prompt, _, n_out in requests:
      tasks.append(asyncio.create_task(limited(prompt, n_out)))
      if args.request_rate != float("inf"):
        await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--base_url", default="http://127.0.0.1:8000")
  ap.add_argument("--launch", action="store_true", help="start `jaxllm serve --model default` for the run")
  ap.add_argument("--serve_args", default="--max_model_len 1024 --max_num_seqs 16",
                  help="extra flags for the launched server")
  ap.add_argument("--model", default=None, help="model name to send (default: the server's first)")
  ap.add_argument("--dataset_name", choices=["random", "sharegpt"], default="random")
  ap.add_argument("--dataset_path", default=None)
  ap.add_argument("--num_prompts", type=int, default=64)
  ap.add_argument("--random_input_len", type=int, default=128)
  ap.add_argument("--random_output_len", type=int, default=64)
  ap.add_argument("--random_range_ratio", type=float, default=0.5)
  ap.add_argument("--max_model_len", type=int, default=1024, help="sharegpt: skip longer conversations")
  ap.add_argument("--request_rate", type=float, default=float("inf"))
  ap.add_argument("--max_concurrency", type=int, default=16)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--results", default=common.RESULTS)
  args = ap.parse_args()
  if args.dataset_name == "sharegpt" and not args.dataset_path:
    ap.error("--dataset_name sharegpt needs --dataset_path")

  import urllib.request

  proc = None
  if args.launch:
    port = free_port()
    args.base_url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "jaxllm.serving.server", "--model=default", f"--port={port}",
                             *args.serve_args.split()], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "ready on" not in line:
      sys.exit(f"the server did not start: {line!r}")
  try:
    def get(path, body=None):
      req = urllib.request.Request(args.base_url + path, data=None if body is None else json.dumps(body).encode(),
                                   headers={"Content-Type": "application/json"})
      with urllib.request.urlopen(req) as r:
        return json.loads(r.read())

    info = get("/v1/models")["data"][0]
    model = args.model or info["id"]
    rng = np.random.default_rng(args.seed)
    if args.dataset_name == "random":
      vocab = 32000  # any id below every supported vocabulary; a random prompt's content does not matter here
      requests = random_requests(args, rng, vocab)
    else:
      requests = sharegpt_requests(args, rng, lambda text: get("/tokenize", {"prompt": text})["tokens"])
    results, duration = asyncio.run(run(args, requests, model))
  finally:
    if proc is not None:
      proc.terminate()
      proc.wait(60)

  ok = [r for r in results if r["ok"]]
  failed = [r for r in results if not r["ok"]]
  out_tokens = sum(r["tokens"] for r in ok)
  in_tokens = sum(n for (_, n, _), r in zip(requests, results) if r["ok"])

  def stats(values):
    v = np.asarray([x for x in values if x is not None]) * 1e3
    return (v.mean(), np.median(v), np.percentile(v, 99)) if len(v) else (float("nan"),) * 3

  ttft, tpot = stats(r["ttft"] for r in ok), stats(r["tpot"] for r in ok)
  itl = stats(x for r in ok for x in r["itl"])
  rate = "inf" if args.request_rate == float("inf") else f"{args.request_rate:g}"
  lines = [
      f"### serve.py — {datetime.date.today()} — {common.device_name()}",
      "",
      f"`{model}` ({'launched with ' + args.serve_args if args.launch else args.base_url}); dataset "
      f"{args.dataset_name}, {len(requests)} requests, request rate {rate}/s, max concurrency "
      f"{args.max_concurrency}; streaming completions, EOS ignored.",
      "",
      "| metric | value |",
      "|---|---:|",
      f"| successful / failed requests | {len(ok)} / {len(failed)} |",
      f"| duration s | {duration:.1f} |",
      f"| input / generated tokens | {in_tokens} / {out_tokens} |",
      f"| request throughput req/s | {len(ok) / duration:.2f} |",
      f"| output token throughput tok/s | {out_tokens / duration:.1f} |",
      f"| TTFT ms mean / median / p99 | {ttft[0]:.0f} / {ttft[1]:.0f} / {ttft[2]:.0f} |",
      f"| TPOT ms mean / median / p99 | {tpot[0]:.1f} / {tpot[1]:.1f} / {tpot[2]:.1f} |",
      f"| ITL ms mean / median / p99 | {itl[0]:.1f} / {itl[1]:.1f} / {itl[2]:.1f} |",
      "",
  ]
  if failed:
    lines.insert(-1, f"First failure: {failed[0]['error']}")
  common.publish(lines, args.results)


if __name__ == "__main__":
  main()
