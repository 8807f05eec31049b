"""Soak: well-behaved clients beside abusive ones for minutes (issue #19's "what must be shown").

Launches `jaxllm serve` on the default model in its own process, then:
  quiet  --quiet_s seconds of --clients well-behaved clients alone, each in a loop: a greedy completion of a short
         prompt (--max_tokens tokens), timed end to end;
  soak   --soak_s seconds of the same clients beside abusive ones, each a thread in a paced loop (--interval):
           - streams that hang up after their first chunk, or right after sending (before any answer);
           - bad bodies: invalid JSON, a lone surrogate, a 5,000-digit integer, a wrong type;
           - n past --max_waiting, 10,000 stop strings, prompt lists with a bad last prompt;
           - unknown paths (made up at random);
           - idle connections (--idle of them, replaced as the server closes them) and slow-header ones.
Every 5 s it samples the server's RSS and open file descriptors. The table: the well-behaved clients' latency
p50 / p99 quiet and under abuse, RSS and fds (first sample, last, max), what each abuser got, and whether the server
was idle afterwards (nothing running or waiting, no KV page held by a request). Prints it and appends it to
benchmarks/RESULTS.md.

    python benchmarks/soak.py --soak_s 600
"""

import argparse
import collections
import datetime
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np

import common


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def post(base: str, path: str, body: bytes, timeout: float = 300) -> int | None:
  req = urllib.request.Request(base + path, data=body, headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      r.read()
      return r.status
  except urllib.error.HTTPError as e:
    e.read()
    return e.code
  except OSError:
    return None


def metrics(base: str) -> dict[str, float]:
  with urllib.request.urlopen(base + "/metrics", timeout=60) as r:
    text = r.read().decode()
  out = {}
  for line in text.splitlines():
    if line and not line.startswith("#") and "{" not in line:
      name, value = line.rsplit(" ", 1)
      out[name] = float(value)
  return out


def proc_stats(pid: int) -> tuple[float, int]:
  """(RSS in MB, open file descriptors) of process `pid`."""
  with open(f"/proc/{pid}/status") as f:
    rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
  return rss / 1024, len(os.listdir(f"/proc/{pid}/fd"))


class Run:
  """Threads in loops until `stop` is set; results per kind."""

  def __init__(self, base: str, port: int, args):
    self.base, self.port, self.args = base, port, args
    self.stop = threading.Event()
    self.latencies: list[float] = []
    self.outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    self.threads: list[threading.Thread] = []
    self.lock = threading.Lock()

  def spawn(self, fn, interval=0.0, *a):
    t = threading.Thread(target=self._loop, args=(fn, interval, *a), daemon=True)
    t.start()
    self.threads.append(t)

  def _loop(self, fn, interval, *a):
    rng = random.Random(len(self.threads))
    while not self.stop.is_set():
      t0 = time.perf_counter()
      fn(rng, *a)
      self.stop.wait(max(0.0, interval - (time.perf_counter() - t0)))

  def record(self, kind: str, outcome) -> None:
    with self.lock:
      self.outcomes[kind][str(outcome)] += 1

  def join(self):
    self.stop.set()
    for t in self.threads:
      t.join(120)
    self.threads.clear()
    self.stop = threading.Event()

  # -- the well-behaved client
  def good(self, rng):
    body = json.dumps({"prompt": f"Question {rng.randrange(1000)}: what is {rng.randrange(100)} + "
                                 f"{rng.randrange(100)}?", "max_tokens": self.args.max_tokens, "temperature": 0,
                       "ignore_eos": True}).encode()
    t0 = time.perf_counter()
    status = post(self.base, "/v1/completions", body)
    if status == 200:
      with self.lock:
        self.latencies.append(time.perf_counter() - t0)
    self.record("well-behaved completion", status)

  # -- abusers
  def hang_up(self, rng):
    """A stream that goes away after its first chunk, or right after sending its request."""
    early = rng.random() < 0.5
    s = socket.create_connection(("127.0.0.1", self.port), timeout=60)
    body = json.dumps({"prompt": "Tell me a long story.", "max_tokens": 200, "stream": True, "ignore_eos": True})
    s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    if not early:
      data = b""
      while b"data: {" not in data:
        chunk = s.recv(65536)
        if not chunk:
          break
        data += chunk
    s.close()
    self.record("stream hung up " + ("before any answer" if early else "after its first chunk"), "closed")

  def bad_body(self, rng):
    body = rng.choice([b'{"prompt": "hi", "max_tokens": ', b'{"prompt": "\\ud800", "max_tokens": 4}',
                       b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", b'{"prompt": 5.5, "max_tokens": 4}'])
    self.record("bad body", post(self.base, "/v1/completions", body))

  def huge(self, rng):
    kind = rng.randrange(3)
    if kind == 0:
      body, label = {"prompt": "hi", "max_tokens": 4, "n": 100000}, "n=100000"
    elif kind == 1:
      body, label = {"prompt": "hi", "max_tokens": 4, "stop": [f"s{i}" for i in range(10000)]}, "10,000 stop strings"
    else:
      body, label = {"prompt": ["ok"] * 20 + [[10**9]], "max_tokens": 4}, "prompt list, bad last prompt"
    self.record(label, post(self.base, "/v1/completions", json.dumps(body).encode()))

  def unknown_path(self, rng):
    self.record("unknown path", post(self.base, f"/v1/{rng.getrandbits(64):x}", b"{}"))

  def idle(self, rng):
    """Holds --idle connections open (a fresh one replaces each the server closes); every fifth sends half a
    header line and trickles bytes."""
    socks = []
    while not self.stop.is_set():
      socks = [s for s in socks if not _closed(s)]
      while len(socks) < self.args.idle:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        s.setblocking(False)
        if len(socks) % 5 == 0:
          s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
        self.record("idle / slow-header connection", "opened")
      for s in socks[::5]:
        try:
          s.send(b"a")
        except OSError:
          pass
      time.sleep(0.5)
    for s in socks:
      s.close()


def _closed(s: socket.socket) -> bool:
  try:
    return s.recv(1) == b""
  except BlockingIOError:
    return False
  except OSError:
    return True


def percentiles(xs):
  return (float(np.percentile(xs, 50)), float(np.percentile(xs, 99))) if xs else (float("nan"), float("nan"))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quiet_s", type=float, default=120)
  ap.add_argument("--soak_s", type=float, default=600)
  ap.add_argument("--clients", type=int, default=4)
  ap.add_argument("--max_tokens", type=int, default=16)
  ap.add_argument("--idle", type=int, default=100)
  ap.add_argument("--interval", type=float, default=0.05, help="seconds between two requests of one abuser thread "
                  "(bad bodies, huge requests, unknown paths: two threads each)")
  ap.add_argument("--stream_interval", type=float, default=0.5, help="seconds between two hung-up streams of one of "
                  "the two hang-up threads (each costs a prefill and maybe a token before it goes)")
  ap.add_argument("--serve_args", default="--max_model_len 512 --max_num_seqs 8")
  ap.add_argument("--results", default=common.RESULTS)
  args = ap.parse_args()

  port = free_port()
  base = f"http://127.0.0.1:{port}"
  logdir = tempfile.mkdtemp(prefix="jaxllm-soak-")
  cmd = [sys.executable, "-m", "jaxllm.serving.server", "--model=default", f"--port={port}",
         f"--compilation_cache_dir={os.path.join(logdir, 'jit')}", *args.serve_args.split()]
  with open(os.path.join(logdir, "stderr"), "w") as err:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
  try:
    line = proc.stdout.readline()
    if "ready on" not in line:
      raise SystemExit(f"the server did not start: {line!r}; see {logdir}/stderr")
    run = Run(base, port, args)
    for _ in range(args.clients):  # warm every program the clients touch before anything is timed
      run.good(random.Random(0))
    run.latencies.clear()
    samples = []

    def sample_for(seconds):
      end = time.time() + seconds
      while time.time() < end:
        samples.append(proc_stats(proc.pid))
        time.sleep(min(5.0, max(0.0, end - time.time())))

    for _ in range(args.clients):
      run.spawn(run.good)
    sample_for(args.quiet_s)
    run.join()
    quiet = percentiles(run.latencies)
    quiet_n = len(run.latencies)
    run.latencies.clear()
    first = len(samples)

    for _ in range(args.clients):
      run.spawn(run.good)
    abusers = ((run.hang_up, 2, args.stream_interval), (run.bad_body, 2, args.interval),
               (run.huge, 2, args.interval), (run.unknown_path, 2, args.interval), (run.idle, 1, 0.0))
    for fn, copies, interval in abusers:
      for _ in range(copies):
        run.spawn(fn, interval)
    sample_for(args.soak_s)
    run.join()
    soak = percentiles(run.latencies)
    soak_n = len(run.latencies)
    time.sleep(2.0)
    m = metrics(base)
    idle_after = (m.get("jaxllm_num_requests_running"), m.get("jaxllm_num_requests_waiting"),
                  m.get("jaxllm_kv_pages_used"))
  finally:
    proc.terminate()
    proc.wait(120)

  rss = [r for r, _ in samples[first:]]
  fds = [f for _, f in samples[first:]]
  lines = [f"### soak.py — {datetime.date.today()} — {common.device_name()}", "",
           f"`jaxllm serve --model default {args.serve_args}`; {args.clients} well-behaved clients (greedy "
           f"completions of {args.max_tokens} tokens) alone for {args.quiet_s:.0f} s, then beside the abusers "
           f"for {args.soak_s:.0f} s: two threads each of bad bodies, huge requests and unknown paths (a request "
           f"every {args.interval:g} s each), two of streams that hang up (one every {args.stream_interval:g} s "
           f"each) and {args.idle} idle / slow-header connections held open. The clients run on the same machine.", "",
           "| well-behaved latency | requests | p50 s | p99 s |", "|---|---:|---:|---:|",
           f"| quiet | {quiet_n} | {quiet[0]:.2f} | {quiet[1]:.2f} |",
           f"| under abuse | {soak_n} | {soak[0]:.2f} | {soak[1]:.2f} |",
           f"| ratio | | {soak[0] / quiet[0]:.2f}x | {soak[1] / quiet[1]:.2f}x |", "",
           f"Server process under abuse (a sample every 5 s): RSS {rss[0]:.0f} MB first, {rss[-1]:.0f} MB last, "
           f"{max(rss):.0f} MB max; open fds {fds[0]} first, {fds[-1]} last, {max(fds)} max. Two seconds after the "
           f"abusers stopped: running {idle_after[0]:.0f}, waiting {idle_after[1]:.0f}, KV pages held by requests "
           f"{idle_after[2]:.0f}.", "", "| client | outcomes (HTTP status: count) |", "|---|---|"]
  lines += [f"| {kind} | {', '.join(f'{k}: {v}' for k, v in sorted(c.items()))} |"
            for kind, c in sorted(run.outcomes.items())]
  common.publish(lines + [""], args.results)


if __name__ == "__main__":
  main()
