"""`jaxllm serve` over two processes x 4 CPU devices (`jax.distributed` on loopback), driven by the official `openai`
client against process 0 (`--mesh model=8`, and `data=2,model=4`: a data-parallel replica on each process): the same
greedy text as a one-process server, streamed and not; 64 concurrent streams, half of them hung up on, leave every KV
page free on both processes and every replica; SIGTERM to process 0 drains and both exit 0;
SIGKILL of the follower turns in-flight requests into 503s at once and process 0 exits non-zero; SIGKILL of
process 0 makes the follower exit non-zero.

A tiny random Llama (transformers' save_pretrained) with SmolLM2's tokenizer keeps it short; programs compile on
first use (--nowarmup), in both processes alike."""

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from jaxllm.serving.config import EngineConfig
from jaxllm.serving.server import ServerConfig
from tests.serving.conftest import serving
from tests.serving.test_score_job import _free_port

ENGINE = ["--max_model_len", "256", "--max_num_seqs", "8", "--max_num_batched_tokens", "64"]
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


class Cluster:
  """`jaxllm serve` as process 0 and process 1 of a two-process job, each with 4 CPU devices."""

  def __init__(self, model: str, mesh: str, tmp_path, follower_model: str | None = None):
    self.http, coordinator = _free_port(), _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    self.logs = [tmp_path / f"process{i}.log" for i in (0, 1)]
    self.procs = [subprocess.Popen(
        [sys.executable, "-m", "jaxllm.cli", "serve", "--model", follower_model if i and follower_model else model,
         "--served_model_name", "tiny", *ENGINE, "--nowarmup", "--port", str(self.http), "--mesh", mesh,
         "--coordinator_address", f"127.0.0.1:{coordinator}", "--num_processes", "2", "--process_id", str(i)],
        stdout=open(self.logs[i], "w"), stderr=subprocess.STDOUT, env=env) for i in (0, 1)]
    if follower_model is not None:
      return
    deadline = time.time() + 300
    while not self.ready():
      assert all(p.poll() is None for p in self.procs), self.log(0)[-3000:] + self.log(1)[-3000:]
      assert time.time() < deadline, "not ready in 300 s"
      time.sleep(0.5)

  def ready(self) -> bool:
    try:
      with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/health", timeout=5) as r:
        return r.status == 200
    except (OSError, urllib.error.URLError):
      return False

  def log(self, i: int) -> str:
    return self.logs[i].read_text()

  def client(self):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{self.http}/v1", api_key="unused", max_retries=0, timeout=300)

  def post(self, body: dict, timeout=300) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{self.http}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
      return e.code, e.read().decode()

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def answers(client) -> list[str]:
  """Greedy completions (non-streamed and streamed), a chat answer and a seeded sampled completion with logprobs (the
  sampler's program: every process places its all-ones bitmask)."""
  out = []
  for prompt in PROMPTS:
    out.append(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0).choices[0].text)
    chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True)
    out.append("".join(c.choices[0].text for c in chunks))
  chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0)
  sampled = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0.9, seed=7,
                                      logprobs=2).choices[0]
  assert len(sampled.logprobs.top_logprobs) == 12
  shaped = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0, response_format={
      "type": "json_schema", "json_schema": {"name": "city", "schema": {"type": "object", "properties": {
          "city": {"type": "string"}}, "required": ["city"]}}}).choices[0].message.content
  assert shaped.startswith('{"city":'), shaped
  return out + [chat.choices[0].message.content, sampled.text, shaped]


@pytest.fixture(scope="module")
def one_process_answers(tiny_model):
  from openai import OpenAI

  config = ServerConfig(model=tiny_model, port=0, warmup=False, served_model_name="tiny",
                        engine=EngineConfig(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64))
  for srv in serving(config):
    return answers(OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="unused", max_retries=0))


@pytest.mark.parametrize("mesh", ["model=8", "data=2,model=4"])
def test_two_processes_serve_the_one_process_answers_and_drain_on_sigterm(tmp_path, tiny_model, one_process_answers,
                                                                          mesh):
  """model=8: one replica over both processes; data=2,model=4: a replica on each process's 4 devices, each running
  its own sequences."""
  cluster = Cluster(tiny_model, mesh, tmp_path)
  try:
    client = cluster.client()
    assert answers(client) == one_process_answers
    assert len(set(one_process_answers)) > 1  # the prompts do not all give one text

    # 64 concurrent streams; every other one hung up on after its first chunk.
    def stream(k):
      chunks = client.completions.create(model="tiny", prompt=f"{k} little pigs", max_tokens=16, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True})
      got = []
      for c in chunks:
        got.append(c.choices[0].text)
        if k % 2:
          chunks.close()
          return None
      return "".join(got)

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
      done = list(pool.map(stream, range(64)))
    assert all(isinstance(t, str) and t for t in done[::2])
    deadline = time.time() + 60
    while (held := _metric(cluster, "jaxllm_kv_pages_used")) != 0 and time.time() < deadline:
      time.sleep(0.2)
    assert held == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.http}/metrics", timeout=10) as r:
      metrics = r.read().decode()

    cluster.procs[0].send_signal(signal.SIGTERM)
    assert [p.wait(timeout=120) for p in cluster.procs] == [0, 0], cluster.log(0)[-3000:] + cluster.log(1)[-3000:]
    # The follower's replica of the scheduler ends where process 0's did: nothing running, no page held, on every
    # data-parallel replica; each of them served some of the streams (their full pages stay cached).
    done = re.search(r"process 1: process 0 is done; 0 requests unfinished, KV pages per replica \(held by requests, "
                     r"cached, free\): (\[.*\])", cluster.log(1))
    assert done, cluster.log(1)[-3000:]
    pages = json.loads(done.group(1).replace("(", "[").replace(")", "]"))
    assert len(pages) == (2 if mesh.startswith("data=2") else 1)
    assert all(held == 0 and cached > 0 for held, cached, _ in pages), pages
    # The follower compiled the structured-output request's constraint when process 0 announced it, not in a step.
    assert re.search(r"process 1: structured-output constraints compiled ahead of their requests: [1-9]\d*, on the "
                     r"step path: 0\b", cluster.log(1)), cluster.log(1)[-3000:]
    assert re.search(r'jaxllm_kv_pages_total\{replica="%d"\}' % (len(pages) - 1), metrics), metrics
  finally:
    cluster.kill()


def test_a_killed_follower_turns_in_flight_requests_into_503s_and_process_0_exits_non_zero(
    tmp_path, tiny_model, one_process_answers):
  cluster = Cluster(tiny_model, "data=2,model=4", tmp_path)
  try:
    client = cluster.client()
    text = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
    assert text == one_process_answers[0]
    long = {"model": "tiny", "prompt": "hello there", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      calls = [pool.submit(cluster.post, long), pool.submit(cluster.post, {**long, "stream": True})]
      time.sleep(3)  # both running
      assert not any(c.done() for c in calls)
      cluster.procs[1].kill()
      killed = time.time()
      (status, body), (stream_status, events) = [c.result(timeout=30) for c in calls]
      answered = time.time() - killed
    assert status == 503 and "process 1 of this multi-process server is gone" in body, body
    # The stream had started (200): it ends with the error as its last event.
    assert stream_status == 200 and '"code": 503' in events.split("data: ")[-2], events[-500:]
    assert answered < 5
    assert cluster.procs[0].wait(timeout=60) != 0
    assert "the engine stopped" in cluster.log(0)
  finally:
    cluster.kill()


def test_a_lost_process_0_makes_the_follower_exit(tmp_path, tiny_model):
  cluster = Cluster(tiny_model, "model=8", tmp_path)
  try:
    cluster.procs[0].kill()
    killed = time.time()
    assert cluster.procs[1].wait(timeout=60) != 0
    assert time.time() - killed < 30
    assert "process 0 is gone" in cluster.log(1), cluster.log(1)[-3000:]
  finally:
    cluster.kill()


def test_a_follower_that_cannot_load_stops_process_0_at_once(tmp_path, tiny_model):
  """Process 1 fails to load (its checkpoint path is wrong on its host): its channel to process 0, opened before
  loading, closes, and process 0 exits non-zero without waiting for the ready barrier's timeout (~100 s)."""
  cluster = Cluster(tiny_model, "model=8", tmp_path, follower_model=str(tmp_path / "missing"))
  try:
    assert cluster.procs[1].wait(timeout=120) != 0
    failed = time.time()
    assert cluster.procs[0].wait(timeout=60) != 0
    assert time.time() - failed < 20, cluster.log(0)[-3000:]
    assert "process 1 of this multi-process server is gone (while loading)" in cluster.log(0), cluster.log(0)[-3000:]
  finally:
    cluster.kill()


def _metric(cluster, name: str) -> float:
  with urllib.request.urlopen(f"http://127.0.0.1:{cluster.http}/metrics", timeout=10) as r:
    text = r.read().decode()
  return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))  # over the replicas


def _channel(is_source: bool, count: int = 2):
  from jaxllm.serving import multihost

  c = multihost.Channel.__new__(multihost.Channel)
  c.me, c.count, c.is_source, c.on_lost, c.closing = (0 if is_source else 1), count, is_source, None, False
  c._peers, c._inbox, c.lost = {}, __import__("queue").Queue(), __import__("threading").Event()
  c._send, c.on_notice = __import__("threading").Lock(), None
  return c


def test_messages_cross_in_order_whatever_their_size():
  """The channel's framing over a socket pair: process 0's messages, small and of several megabytes (many reads),
  arrive whole and in order; the last one ("exit") makes both sides expect the connection to close. Notices sent
  from other threads meanwhile go whole to the follower's `on_notice`, not into the steps' messages; one that fails
  there stops nothing."""
  import socket
  import threading

  import numpy as np

  a, b = socket.socketpair()
  source, follower = _channel(True), _channel(False)
  source._peers[1] = a
  notices = []

  def on_notice(notice):
    if notice == sent[1]:
      raise RuntimeError("a failing notice handler")  # logged; the reader goes on
    notices.append(notice)

  follower.on_notice = on_notice
  reader = threading.Thread(target=follower._read_leader, args=(b,), daemon=True)
  reader.start()
  messages = [{"ops": [("add", [("r", np.arange(n, dtype=np.int32), None, [7])])], "step": True, "exit": False}
              for n in (0, 1, 100, 3_000_000)] + [{"ops": [], "step": False, "exit": True}]
  sent = [("grammar", "x" * n) for n in range(0, 2_000_000, 50_000)]
  notifier = threading.Thread(target=lambda: [source.notify(n) for n in sent], daemon=True)
  notifier.start()
  sender = threading.Thread(target=lambda: [source.publish(m) for m in messages], daemon=True)
  sender.start()
  got = [follower._inbox.get(timeout=60) for _ in messages]  # (frames mixed up would leave it waiting)
  notifier.join(60)
  sender.join(60)
  assert source.closing and follower.closing
  a.close()
  reader.join(5)  # the connection's end after "exit" is expected: no exit of this process
  assert not reader.is_alive()
  assert notices == sent[:1] + sent[2:]
  for m, g in zip(messages, got):
    assert g["exit"] == m["exit"] and len(g["ops"]) == len(m["ops"])
    if m["ops"]:
      np.testing.assert_array_equal(g["ops"][0][1][0][1], m["ops"][0][1][0][1])


def test_process_0_takes_only_connections_that_show_the_token():
  import socket
  import threading

  source = _channel(True, count=2)
  listener = socket.create_server(("127.0.0.1", 0))
  port = listener.getsockname()[1]
  token = b"t" * 16
  accept = threading.Thread(target=source._accept, args=(listener, token, 30))
  accept.start()
  intruder = socket.create_connection(("127.0.0.1", port))
  intruder.sendall(b"x" * 16 + (1).to_bytes(4, "little"))
  assert intruder.recv(1) == b""  # refused: closed
  bad_id = socket.create_connection(("127.0.0.1", port))
  bad_id.sendall(token + (5).to_bytes(4, "little"))  # not a process of a 2-process job
  assert bad_id.recv(1) == b""
  follower = socket.create_connection(("127.0.0.1", port))
  follower.sendall(token + (1).to_bytes(4, "little"))
  accept.join(30)
  assert list(source._peers) == [1]
  source.close()
  follower.close()
