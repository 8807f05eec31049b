"""Online serving benchmark: a load generator for OpenAI-compatible servers, after `vllm bench serve`. One invocation
can launch several servers in turn and compare them on the same requests, a column per server.

Sends --num_prompts streaming completion requests (temperature 0, EOS ignored, so each generates exactly its output
length) at --request_rate requests/s (Poisson arrivals; inf: all at once), at most --max_concurrency in flight, and
reports request and output-token throughput and TTFT / TPOT / ITL mean, median and p99, as vLLM's benchmark does:
  TTFT  arrival of the request to its first generated text,
  TPOT  (latency - TTFT) / (output tokens - 1), per request,
  ITL   the gaps between successive streamed chunks that carry text.

Datasets (--dataset_name; every one but sharegpt sends token ids below 32000 as the prompt):
  random         prompt and output lengths uniform in [len * (1 - --random_range_ratio), len] for --random_input_len
                 and --random_output_len, random token ids;
  mixed          chat turns as `random`, except that each request is, with probability --long_fraction, a long
                 prompt of --long_input_len tokens with --long_output_len outputs;
  shared_prefix  every prompt starts with the same --prefix_len random tokens, then a distinct `random` suffix;
  sharegpt       a ShareGPT JSON file (--dataset_path): the first human turn is the prompt, the first reply's token
                 count the output length (tokenized by the first server's /tokenize).

Servers:
  --base_url URL  an already running server (the default);
  --launch        `python -m jaxllm.serving.server --model=default --port=FREE <--serve_args>` with this Python;
  --servers RUNS  runs `LABEL=PYTHON[:EXTRA_FLAGS]` separated by ';': each, in order, is launched as above with that
                  Python and <--serve_args> <EXTRA_FLAGS>, sent the same requests, and stopped. The table adds each
                  run's time from launch to ready, the programs its warmup compiled (its 'warmup: N programs in S s'
                  log line), the prefix-cache counters of its /metrics where it has them, and how many outputs are
                  identical to the first run's;
  --prewarm       starts and stops each launched server once before the measured launch, so that with
                  --compilation_cache_dir in its flags the measured one loads its programs from the persistent cache;
                  both ready times are reported, cold / warm (cold only if the cache directory started empty).
Servers run with PYTHONSAFEPATH=1, so a Python of another install does not import the jaxllm of the current directory.

    python benchmarks/serve.py --launch --num_prompts 64 --max_concurrency 16
    python benchmarks/serve.py --base_url http://127.0.0.1:8000 --dataset_name sharegpt --dataset_path sg.json
    # the previous engine against the current one, on chat turns and some long prompts
    python benchmarks/serve.py --dataset_name mixed --num_prompts 48 --max_concurrency 16 \\
      --serve_args "--max_model_len 2304 --max_num_seqs 16 --compilation_cache_dir /tmp/jaxllm-bench-cache" \\
      --prewarm --servers "before=/tmp/bvenv/bin/python;after=.venv/bin/python"
    # automatic prefix caching off and on
    python benchmarks/serve.py --dataset_name shared_prefix --num_prompts 32 \\
      --servers "cache_off=.venv/bin/python:--noenable_prefix_caching;cache_on=.venv/bin/python"
"""

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import typing
import urllib.request

import numpy as np

import common

VOCAB = 32000  # random prompts use ids below every supported vocabulary; their content does not matter here


class Request(typing.NamedTuple):
  prompt: list[int] | str
  input_len: int
  output_len: int


# ------------------------------------------------------------------------------------------------------- datasets
def _uniform_lengths(rng, length: int, ratio: float, n: int) -> np.ndarray:
  return rng.integers(max(1, int(length * (1 - ratio))), length + 1, n)


def random_requests(args, rng) -> list[Request]:
  ins = _uniform_lengths(rng, args.random_input_len, args.random_range_ratio, args.num_prompts)
  outs = _uniform_lengths(rng, args.random_output_len, args.random_range_ratio, args.num_prompts)
  return [Request(rng.integers(3, VOCAB, int(n)).tolist(), int(n), int(o)) for n, o in zip(ins, outs)]


def mixed_requests(args, rng) -> list[Request]:
  short = random_requests(args, rng)
  long = rng.random(args.num_prompts) < args.long_fraction
  return [Request(rng.integers(3, VOCAB, args.long_input_len).tolist(), args.long_input_len, args.long_output_len)
          if is_long else r for r, is_long in zip(short, long)]


def shared_prefix_requests(args, rng) -> list[Request]:
  prefix = rng.integers(3, VOCAB, args.prefix_len).tolist()
  return [Request(prefix + r.prompt, args.prefix_len + r.input_len, r.output_len) for r in random_requests(args, rng)]


def sharegpt_requests(args, rng, tokenize) -> list[Request]:
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
    out.append(Request(prompt, n_in, n_out))
    if len(out) == args.num_prompts:
      break
  return out


def make_requests(args, base_url: str) -> list[Request]:
  rng = np.random.default_rng(args.seed)
  if args.dataset_name == "sharegpt":
    return sharegpt_requests(args, rng, lambda text: get_json(base_url, "/tokenize", {"prompt": text})["tokens"])
  return {"random": random_requests, "mixed": mixed_requests, "shared_prefix": shared_prefix_requests}[
      args.dataset_name](args, rng)


def describe_dataset(args, requests: list[Request]) -> str:
  def span(length):
    return f"{max(1, int(length * (1 - args.random_range_ratio)))}-{length}"

  chat = f"input {span(args.random_input_len)} / output {span(args.random_output_len)} tokens"
  if args.dataset_name == "random":
    return f"random ({chat})"
  if args.dataset_name == "mixed":
    n_long = sum(r.input_len == args.long_input_len and r.output_len == args.long_output_len for r in requests)
    return (f"mixed ({n_long} long requests of {args.long_input_len} input / {args.long_output_len} output tokens, "
            f"drawn with probability {args.long_fraction:g}; the rest chat turns of {chat})")
  if args.dataset_name == "shared_prefix":
    return f"shared_prefix (a {args.prefix_len}-token prefix common to all, then a distinct suffix: {chat})"
  return f"sharegpt ({args.dataset_path})"


# ------------------------------------------------------------------------------------------------------- requests
@dataclasses.dataclass(frozen=True, kw_only=True)
class Outcome:
  """One request, as the client saw it (seconds). `error` is set when it failed."""
  error: str | None = None
  ttft: float = 0.0
  latency: float = 0.0
  itl: tuple[float, ...] = ()  # gaps between successive chunks that carry text
  tokens: int = 0  # generated, as the server's usage counts them
  chunks: int = 0  # streamed chunks that carry text
  text: str = ""  # the streamed text, concatenated

  @property
  def ok(self) -> bool:
    return self.error is None

  @property
  def tpot(self) -> float | None:
    return (self.latency - self.ttft) / (self.tokens - 1) if self.tokens > 1 else None


async def one_request(session, url, model, prompt, max_tokens) -> Outcome:
  body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
          "stream": True, "stream_options": {"include_usage": True}}
  start = time.perf_counter()
  ttft, last, itl, tokens, texts = None, None, [], 0, []
  async with session.post(url, json=body) as r:
    if r.status != 200:
      return Outcome(error=f"{r.status}: {(await r.text())[:200]}")
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
        texts.append(chunk["choices"][0]["text"])
  latency = time.perf_counter() - start
  return Outcome(ttft=ttft or latency, latency=latency, itl=tuple(itl), tokens=tokens, chunks=len(texts),
                 text="".join(texts))


async def send_all(args, base_url: str, requests: list[Request], model: str) -> tuple[list[Outcome], float]:
  """-> each request's outcome, in order, and the wall time from the first send to the last answer."""
  import aiohttp

  url = base_url + "/v1/completions"
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


def get_json(base_url: str, path: str, body=None):
  req = urllib.request.Request(base_url + path, data=None if body is None else json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req) as r:
    return json.loads(r.read())


PREFIX_CACHE = ("jaxllm_prefix_cache_queries_total", "jaxllm_prefix_cache_hits_total")


def prefix_cache_counters(base_url: str) -> tuple[float, float] | None:
  """(queries, hits) in prompt tokens from the server's /metrics, or None for a server without them."""
  from prometheus_client.parser import text_string_to_metric_families

  with urllib.request.urlopen(base_url + "/metrics") as r:
    text = r.read().decode()
  values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
  return tuple(values[name] for name in PREFIX_CACHE) if all(name in values for name in PREFIX_CACHE) else None


# -------------------------------------------------------------------------------------------------------- servers
@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerSpec:
  """A server to launch: `python -m jaxllm.serving.server --model=default --port=P *flags`."""
  label: str
  python: str
  flags: tuple[str, ...]

  def command(self, port: int | None = None) -> list[str]:
    port_flag = [f"--port={port}"] if port is not None else []
    return [self.python, "-m", "jaxllm.serving.server", "--model=default", *port_flag, *self.flags]


def parse_servers(text: str, serve_args: str) -> list[ServerSpec]:
  """`LABEL=PYTHON[:EXTRA_FLAGS];...` -> specs whose flags are the shared serve args, then the run's own."""
  specs = []
  for item in filter(None, (part.strip() for part in text.split(";"))):
    label, eq, rest = item.partition("=")
    python, _, extra = rest.partition(":")
    if not eq or not label.strip() or not python.strip():
      raise ValueError(f"--servers entry {item!r} is not LABEL=PYTHON[:EXTRA_FLAGS] "
                       "(e.g. 'after=.venv/bin/python:--max_num_batched_tokens 256').")
    specs.append(ServerSpec(label=label.strip(), python=python.strip(),
                            flags=tuple(shlex.split(serve_args) + shlex.split(extra))))
  labels = [s.label for s in specs]
  if not specs or len(set(labels)) != len(labels):
    raise ValueError(f"--servers needs at least one run and distinct labels, got {labels}.")
  return specs


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _tail(path: str, n: int = 25) -> str:
  with open(path, errors="replace") as f:
    return "".join(f.readlines()[-n:])


class LaunchedServer:
  """A server process on a free port, from launch until its "ready on" line (`ready_s` apart) to its stop on exit.
  Its stdout and stderr go to files under `logdir`: a pipe nobody reads could fill and stall it."""

  def __init__(self, spec: ServerSpec, logdir: str, timeout_s: float):
    port = free_port()
    self.url = f"http://127.0.0.1:{port}"
    stem = os.path.join(logdir, f"server-{port}")
    self.stdout_path, self.stderr_path = stem + ".out", stem + ".err"
    start = time.perf_counter()
    with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
      self.proc = subprocess.Popen(spec.command(port), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                   env={**os.environ, "PYTHONSAFEPATH": "1"})
    while True:
      with open(self.stdout_path, errors="replace") as f:
        if "ready on" in f.read():
          break
      if self.proc.poll() is not None or time.perf_counter() - start > timeout_s:
        why = (f"exited with status {self.proc.returncode}" if self.proc.poll() is not None else
               f"was not ready after {timeout_s:g} s")
        self.stop()
        sys.exit(f"the server {spec.label!r} ({shlex.join(spec.command(port))}) {why}; its stderr ends:\n"
                 f"{_tail(self.stderr_path)}")
      time.sleep(0.05)
    self.ready_s = time.perf_counter() - start

  def warmup_log(self) -> tuple[int, float] | None:
    """(programs, seconds) from the server's 'warmup: N programs in S s' log line, if it logged one."""
    with open(self.stderr_path, errors="replace") as f:
      m = re.search(r"warmup: (\d+) programs in ([\d.]+) s", f.read())
    return (int(m[1]), float(m[2])) if m else None

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(60)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()

  def __enter__(self) -> "LaunchedServer":
    return self

  def __exit__(self, *exc) -> None:
    self.stop()


# --------------------------------------------------------------------------------------------------------- a run
@dataclasses.dataclass(kw_only=True)
class Run:
  """One server's measurement of the request list."""
  label: str
  where: str  # the launch command, or the URL of a running server
  model: str
  outcomes: list[Outcome]
  duration: float
  prefix_cache: tuple[float, float] | None  # (queries, hits) in prompt tokens during the run
  ready_s: tuple[float, ...] = ()  # launch to ready: (cold, warm) with --prewarm, else (one,)
  warmup: tuple[tuple[int, float], ...] = ()  # (programs, seconds) its warmup logged, per launch as ready_s


def measure(args, label: str, where: str, base_url: str, requests: list[Request]) -> Run:
  model = args.model or get_json(base_url, "/v1/models")["data"][0]["id"]
  before = prefix_cache_counters(base_url)
  outcomes, duration = asyncio.run(send_all(args, base_url, requests, model))
  after = prefix_cache_counters(base_url)
  counters = tuple(a - b for a, b in zip(after, before)) if before and after else None
  return Run(label=label, where=where, model=model, outcomes=outcomes, duration=duration, prefix_cache=counters)


# -------------------------------------------------------------------------------------------------------- report
def _stats(values) -> tuple[float, float, float]:
  """(mean, median, p99) in ms."""
  v = np.asarray([x for x in values if x is not None]) * 1e3
  return (v.mean(), np.median(v), np.percentile(v, 99)) if len(v) else (float("nan"),) * 3


def column(run: Run, requests: list[Request], reference: Run | None) -> dict[str, str | None]:
  """A run's cell per metric row; None where the run has no such value."""
  ok = [o for o in run.outcomes if o.ok]
  out_tokens = sum(o.tokens for o in ok)
  in_tokens = sum(r.input_len for r, o in zip(requests, run.outcomes) if o.ok)
  chunks = sum(o.chunks for o in ok)
  ttft, tpot = _stats(o.ttft for o in ok), _stats(o.tpot for o in ok)
  itl = _stats(x for o in ok for x in o.itl)
  warmup = f"{run.warmup[-1][0]} ({' / '.join(f'{s:.1f}' for _, s in run.warmup)})" if run.warmup else None
  cells = {
      "successful / failed requests": f"{len(ok)} / {len(run.outcomes) - len(ok)}",
      "duration s": f"{run.duration:.1f}",
      "input / generated tokens": f"{in_tokens} / {out_tokens}",
      "request throughput req/s": f"{len(ok) / run.duration:.2f}",
      "output token throughput tok/s": f"{out_tokens / run.duration:.1f}",
      "TTFT ms mean / median / p99": f"{ttft[0]:.0f} / {ttft[1]:.0f} / {ttft[2]:.0f}",
      "TPOT ms mean / median / p99": f"{tpot[0]:.1f} / {tpot[1]:.1f} / {tpot[2]:.1f}",
      "ITL ms mean / median / p99": f"{itl[0]:.1f} / {itl[1]:.1f} / {itl[2]:.1f}",
      "generated tokens per streamed chunk": f"{out_tokens / chunks:.2f}" if chunks else None,
      "ready s (cold / warm)": " / ".join(f"{s:.1f}" for s in run.ready_s) if len(run.ready_s) == 2 else None,
      "ready s": f"{run.ready_s[0]:.1f}" if len(run.ready_s) == 1 else None,
      "warmup programs (s cold / warm)": warmup if len(run.warmup) == 2 else None,
      "warmup programs (s)": warmup if len(run.warmup) == 1 else None,
      "prefix cache queries / hits tokens": None,
      "identical outputs to the first run": None,
  }
  if run.prefix_cache is not None:
    queries, hits = run.prefix_cache
    cells["prefix cache queries / hits tokens"] = (f"{queries:.0f} / {hits:.0f}"
                                                   + (f" ({hits / queries:.0%})" if queries else ""))
  if reference is not None:
    same = sum(a.ok and b.ok and a.text == b.text for a, b in zip(run.outcomes, reference.outcomes))
    cells["identical outputs to the first run"] = (f"{same}/{len(requests)}" if reference is not run else
                                                   "(reference)")
  return cells


def report(args, runs: list[Run], requests: list[Request]) -> list[str]:
  cols = [column(run, requests, runs[0] if len(runs) > 1 else None) for run in runs]
  rate = "inf" if args.request_rate == float("inf") else f"{args.request_rate:g}"
  models = sorted({run.model for run in runs})
  lines = [
      f"### serve.py — {datetime.date.today()} — {common.device_name()}",
      "",
      f"`{'`, `'.join(models)}`; dataset {describe_dataset(args, requests)}; {len(requests)} requests (seed "
      f"{args.seed}), request rate {rate}/s, max concurrency {args.max_concurrency}; streaming completions, "
      "temperature 0, EOS ignored.",
      "",
      *(f"- `{run.label}`: `{run.where}`" for run in runs),
      "",
      "| metric | " + " | ".join(run.label for run in runs) + " |",
      "|---|" + "---:|" * len(runs),
  ]
  for row in cols[0]:
    cells = [c[row] for c in cols]
    if any(cell is not None for cell in cells):
      lines.append(f"| {row} | " + " | ".join(cell or "n/a" for cell in cells) + " |")
  lines += [
      "",
      "ITL is the gap between streamed chunks that carry text, as vllm bench serve counts it: a server that streams "
      "several tokens per chunk (the engine before the ragged-step redesign sent one chunk per engine call, up to "
      "--decode_steps tokens) shows fewer, longer gaps, and its tokens per streamed chunk above 1. TPOT spreads each "
      "request's time after its first text over its tokens: compare TPOT for per-token speed.",
  ]
  for run in runs:
    failed = next((o for o in run.outcomes if not o.ok), None)
    if failed is not None:
      lines.append(f"First failure of `{run.label}`: {failed.error}")
  lines.append("")
  return lines


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--base_url", default="http://127.0.0.1:8000", help="a running server (without --launch/--servers)")
  ap.add_argument("--launch", action="store_true", help="launch one server with this Python (see --serve_args)")
  ap.add_argument("--servers", default=None, help="runs LABEL=PYTHON[:EXTRA_FLAGS] separated by ';', each launched")
  ap.add_argument("--serve_args", default="--max_model_len 1024 --max_num_seqs 16",
                  help="flags for every launched server")
  ap.add_argument("--prewarm", action="store_true", help="start and stop each server once before the measured launch")
  ap.add_argument("--ready_timeout", type=float, default=1800, help="seconds a launched server has to be ready")
  ap.add_argument("--model", default=None, help="model name to send (default: the server's first)")
  ap.add_argument("--dataset_name", choices=["random", "mixed", "shared_prefix", "sharegpt"], default="random")
  ap.add_argument("--dataset_path", default=None)
  ap.add_argument("--num_prompts", type=int, default=64)
  ap.add_argument("--random_input_len", type=int, default=128)
  ap.add_argument("--random_output_len", type=int, default=64)
  ap.add_argument("--random_range_ratio", type=float, default=0.5)
  ap.add_argument("--long_fraction", type=float, default=0.125, help="mixed: probability of a long request")
  ap.add_argument("--long_input_len", type=int, default=2048, help="mixed: a long request's prompt tokens")
  ap.add_argument("--long_output_len", type=int, default=32, help="mixed: a long request's output tokens")
  ap.add_argument("--prefix_len", type=int, default=512, help="shared_prefix: tokens every prompt starts with")
  ap.add_argument("--max_model_len", type=int, default=1024, help="sharegpt: skip longer conversations")
  ap.add_argument("--request_rate", type=float, default=float("inf"))
  ap.add_argument("--max_concurrency", type=int, default=16)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--results", default=common.RESULTS)
  args = ap.parse_args()
  if args.dataset_name == "sharegpt" and not args.dataset_path:
    ap.error("--dataset_name sharegpt needs --dataset_path")
  if args.launch and args.servers:
    ap.error("--launch and --servers exclude each other (--launch is --servers 'launched=THIS_PYTHON')")
  if not 0 <= args.long_fraction <= 1:
    ap.error(f"--long_fraction must be in [0, 1], got {args.long_fraction}")
  try:
    specs = (parse_servers(args.servers, args.serve_args) if args.servers else
             [ServerSpec(label="launched", python=sys.executable, flags=tuple(shlex.split(args.serve_args)))]
             if args.launch else [])
  except ValueError as e:
    ap.error(str(e))
  if args.prewarm and not all(any(f.startswith("--compilation_cache_dir") for f in s.flags) for s in specs):
    print("serve.py: --prewarm without --compilation_cache_dir: the measured launch compiles everything again",
          file=sys.stderr)

  args.base_url = args.base_url.rstrip("/")
  runs, requests = [], None
  if not specs:
    requests = make_requests(args, args.base_url)
    runs.append(measure(args, "server", args.base_url, args.base_url, requests))
  with tempfile.TemporaryDirectory(prefix="serve-bench-") as logdir:
    for spec in specs:
      cold, cold_warmup = (), ()
      if args.prewarm:
        with LaunchedServer(spec, logdir, args.ready_timeout) as server:
          cold, cold_warmup = (server.ready_s,), (server.warmup_log(),)
      with LaunchedServer(spec, logdir, args.ready_timeout) as server:
        requests = requests or make_requests(args, server.url)
        run = measure(args, spec.label, shlex.join(spec.command()), server.url, requests)
        run.ready_s, warmup = cold + (server.ready_s,), cold_warmup + (server.warmup_log(),)
        run.warmup = warmup if all(warmup) else ()
      runs.append(run)
      print(f"serve.py: {spec.label} done in {run.duration:.1f} s", file=sys.stderr)
  common.publish(report(args, runs, requests), args.results)


if __name__ == "__main__":
  main()
