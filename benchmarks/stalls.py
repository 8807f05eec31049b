"""Hostile bodies against a running server: how long /health and running streams wait while a multi-megabyte
/tokenize and a 1 MB chat prompt are in flight (issue #15's "no client can stall the others").

Launches `jaxllm serve` on the default model in its own process (the clients here do not share its GIL), then for
each repetition: 8 greedy 96-token streams alone, whose longest gap between two tokens is the engine step to beat;
the same 8 streams again with the big bodies sent once they all generate, polling /health every 20 ms meanwhile. The
table gives, per repetition, the unloaded step (longest and median gap), the longest wait between two /health
answers, the longest and median gap between two tokens of a stream while /tokenize runs, the engine's own steps over
that window (the server's `jaxllm_engine_step_seconds` histogram: their mean, and the bucket holding the longest: a
stream that never waits beyond one step has no gap longer than that bucket's bound), and how long /tokenize took.
Prints the table and appends it to benchmarks/RESULTS.md.

    python benchmarks/stalls.py --reps 4
"""

import argparse
import datetime
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import common


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Client:

  def __init__(self, base: str):
    self.base = base

  def get(self, path: str):
    return self.post(path)

  def post(self, path: str, body: bytes | None = None):
    req = urllib.request.Request(self.base + path, data=body, headers={"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(req, timeout=300) as r:
        return r.status, r.read()
    except urllib.error.HTTPError as e:
      return e.code, e.read()
    except OSError:
      return None, b""

  def streams(self, started: threading.Barrier | None = None):
    """Eight streams started; (threads, arrival times of each stream's chunks)."""
    arrivals = [[] for _ in range(8)]

    def one(i):
      body = json.dumps({"prompt": f"Story {i}:", "max_tokens": 96, "temperature": 0, "ignore_eos": True,
                         "stream": True}).encode()
      req = urllib.request.Request(self.base + "/v1/completions", data=body,
                                   headers={"Content-Type": "application/json"})
      with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
          if line.startswith(b"data: {"):
            if not arrivals[i] and started is not None:
              started.wait(120)
            arrivals[i].append(time.perf_counter())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
      t.start()
    return threads, arrivals


def step_histogram(client: Client) -> dict:
  """The server's `jaxllm_engine_step_seconds` histogram: {"le": {upper bound: cumulative count}, "sum", "count"}."""
  _, text = client.get("/metrics")
  out = {"le": {}}
  for line in text.decode().splitlines():
    if line.startswith("jaxllm_engine_step_seconds_bucket{"):
      le = line.split('le="')[1].split('"')[0]
      out["le"][float(le)] = float(line.split()[-1])
    elif line.startswith("jaxllm_engine_step_seconds_sum "):
      out["sum"] = float(line.split()[-1])
    elif line.startswith("jaxllm_engine_step_seconds_count "):
      out["count"] = float(line.split()[-1])
  return out


def steps_between(before: dict, after: dict) -> tuple[float, float, float]:
  """(mean, and the bucket (lower, upper] holding the longest) of the engine steps run between two scrapes."""
  n = after["count"] - before["count"]
  edges = sorted(after["le"])
  upper = next(le for le in edges if after["le"][le] - before["le"][le] == n)
  lower = max([le for le in edges if le < upper] or [0.0])
  return (after["sum"] - before["sum"]) / max(n, 1), lower, upper


def _gaps(arrivals, start=1, window=None):
  return [b - a for times in arrivals for a, b in zip(times[start:], times[start + 1:])
          if window is None or (b > window[0] and a < window[1])]


def measure(client: Client, bodies: dict) -> dict:
  threads, arrivals = client.streams()
  for t in threads:
    t.join()
  alone = _gaps(arrivals)
  started = threading.Barrier(9)
  threads, arrivals = client.streams(started)
  started.wait(120)
  done = {}

  def big(path):
    t0 = time.perf_counter()
    status, _ = client.post(path, bodies[path])
    done[path] = (status, t0, time.perf_counter())

  senders = [threading.Thread(target=big, args=(p,)) for p in bodies]
  steps_before = step_histogram(client)
  for t in senders:
    t.start()
  worst, last = 0.0, time.perf_counter()
  while any(t.is_alive() for t in senders):
    if client.post("/health")[0] != 200:
      raise RuntimeError("/health did not answer 200")
    now = time.perf_counter()
    worst, last = max(worst, now - last), now
    time.sleep(0.02)
  step_mean, step_lo, step_hi = steps_between(steps_before, step_histogram(client))
  for t in threads:
    t.join()
  status, t0, t1 = done["/tokenize"]
  loaded = _gaps(arrivals, 0, (t0, t1))
  return {"step_max": max(alone), "step_median": statistics.median(alone), "health_worst": worst,
          "stream_max": max(loaded), "stream_median": statistics.median(loaded), "tokenize_s": t1 - t0,
          "step_mean": step_mean, "step_longest": (step_lo, step_hi),
          "statuses": (status, done["/v1/chat/completions"][0])}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--reps", type=int, default=4)
  ap.add_argument("--words", type=int, default=500_000, help="words of the /tokenize prompt (~3.5 MB at 500k)")
  ap.add_argument("--serve_args", default="--max_model_len 512 --max_num_seqs 8")
  ap.add_argument("--results", default=common.RESULTS)
  args = ap.parse_args()

  port = _free_port()
  cmd = [sys.executable, "-m", "jaxllm.serving.server", "--model=default", f"--port={port}", *args.serve_args.split()]
  server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  client = Client(f"http://127.0.0.1:{port}")
  try:
    deadline = time.time() + 900
    while client.post("/health")[0] != 200:
      if server.poll() is not None or time.time() > deadline:
        raise SystemExit(f"the server did not come up: {server.stderr.read()[-2000:]}")
      time.sleep(1)
    rng = random.Random(0)
    text = " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
                    for _ in range(args.words))
    bodies = {"/tokenize": json.dumps({"prompt": text}).encode(),
              "/v1/chat/completions": json.dumps({"messages": [{"role": "user", "content": text[:1 << 20]}]}).encode()}
    runs = []
    for rep in range(args.reps):
      runs.append(measure(client, bodies))
      print(f"rep {rep}: {runs[-1]}", file=sys.stderr, flush=True)
  finally:
    server.terminate()
    server.wait(60)

  mb = len(bodies["/tokenize"]) / 1e6
  lines = [f"### stalls.py — {datetime.date.today()} — {common.device_name()}", "",
           f"`jaxllm serve --model default {args.serve_args}` in its own process; a {mb:.1f} MB /tokenize and a "
           "1 MB chat prompt sent while 8 greedy streams run, /health polled every 20 ms.", "",
           "| rep | step alone: longest / median (s) | /health longest wait (s) | stream gap under load: longest / "
           "median (s) | engine steps under load (server): mean, longest in (s) | /tokenize (s) | "
           "statuses (tokenize, chat) |", "|---|---|---|---|---|---|---|"]
  for i, r in enumerate(runs):
    lines.append(f"| {i} | {r['step_max']:.3f} / {r['step_median']:.3f} | {r['health_worst']:.3f} | "
                 f"{r['stream_max']:.3f} / {r['stream_median']:.3f} | {r['step_mean']:.3f}, "
                 f"({r['step_longest'][0]:g}, {r['step_longest'][1]:g}] | {r['tokenize_s']:.1f} | {r['statuses']} |")
  lines.append("")
  common.publish(lines, args.results)


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
