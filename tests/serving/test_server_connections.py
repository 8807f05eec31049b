"""Connections a careless or hostile client holds open (#19 findings 5 and 11): idle and slow-header connections are
closed by --timeout_keep_alive while other clients are served, connections past --max_connections get a 503 before
their request is read, a body that does not arrive gets a 408, a malformed request (an over-long header) gets the
OpenAI error shape, and SIGTERM's drain ends after --drain_timeout. A server of its own (short timeouts); nothing here
generates tokens in it."""

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from jaxllm.serving.config import EngineConfig
from jaxllm.serving.server import ServerConfig
from tests.serving.conftest import raw, serving

KEEP_ALIVE = 1.0
BODY_TIMEOUT = 2.0
# Idle connections to hold open: 500, or fewer where the open-file limit (this process holds both ends) is lower.
IDLE = min(500, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 300) // 2 - 40)
LIMIT = IDLE + 30


@pytest.fixture(scope="module")
def server():
  yield from serving(ServerConfig(model="default", quantization=None, port=0, warmup=False, max_connections=LIMIT,
                                  timeout_keep_alive=KEEP_ALIVE, body_timeout=BODY_TIMEOUT,
                                  engine=EngineConfig(max_model_len=256, max_num_seqs=2)))


def _connect(server) -> socket.socket:
  s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
  s.settimeout(10)
  return s


def _closed_by_server(s: socket.socket, wait: float) -> bool:
  """Whether the server closed `s` within `wait` seconds (reads EOF or a reset; any answer bytes are skipped)."""
  s.settimeout(wait)
  try:
    while True:
      if not s.recv(65536):
        return True
  except (ConnectionResetError, BrokenPipeError):
    return True
  except socket.timeout:
    return False


def _response(s: socket.socket) -> tuple[int, dict, bytes]:
  """(status, headers, body) of the HTTP/1.1 response on `s` (read until the server closes or Content-Length)."""
  data = b""
  while b"\r\n\r\n" not in data:
    chunk = s.recv(65536)
    assert chunk, data
    data += chunk
  head, body = data.split(b"\r\n\r\n", 1)
  lines = head.decode().split("\r\n")
  headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
  while len(body) < int(headers.get("content-length", 0)):
    body += s.recv(65536)
  return int(lines[0].split()[1]), headers, body


def test_idle_and_slow_header_connections_are_closed_while_clients_are_served(server):
  idle = [_connect(server) for _ in range(IDLE)]
  slow = [_connect(server) for _ in range(20)]
  for s in slow:  # slowloris: a request line and a header, then a byte at a time, never the blank line
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
  stop, served = threading.Event(), []

  def trickle():
    while not stop.is_set():
      for s in slow:
        try:
          s.sendall(b"X")
        except OSError:
          pass
      time.sleep(0.2)

  def serve_a_client():
    while not stop.is_set():
      status, body = raw(server, "/tokenize", {"prompt": "hello there"})
      served.append(status == 200 and body["count"] >= 2)
      time.sleep(0.05)

  threads = [threading.Thread(target=trickle), threading.Thread(target=serve_a_client)]
  for t in threads:
    t.start()
  try:
    time.sleep(KEEP_ALIVE + 1.5)
    assert all(_closed_by_server(s, 2.0) for s in slow), "a slow-header connection outlived --timeout_keep_alive"
    assert all(_closed_by_server(s, 2.0) for s in idle), "an idle connection outlived --timeout_keep_alive"
  finally:
    stop.set()
    for t in threads:
      t.join(30)
    for s in idle + slow:
      s.close()
  assert len(served) >= 5 and all(served), served  # the well-behaved client was answered all along
  assert server.loop.num_running == 0 and server.loop.queued == 0


def test_connections_past_the_limit_get_503_before_their_request_is_read(server):
  held = []
  try:
    deadline = time.time() + 10
    while len(server.connections()) < LIMIT and time.time() < deadline:
      held.append(_connect(server))  # each mid-body: held open for --body_timeout
      held[-1].sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    assert len(server.connections()) >= LIMIT
    extra = _connect(server)
    status, headers, body = _response(extra)
    assert status == 503 and headers["retry-after"] == "1", (status, headers)
    error = json.loads(body)["error"]
    assert error["code"] == 503 and f"--max_connections {LIMIT}" in error["message"], error
    assert _closed_by_server(extra, 3.0)
    extra.close()
  finally:
    for s in held:
      s.close()
  deadline = time.time() + 10  # the held ones gone, connections are accepted again
  while len(server.connections()) >= LIMIT and time.time() < deadline:
    time.sleep(0.1)
  assert raw(server, "/health")[0] == 200
  assert server.metrics.requests.labels("connection", "503")._value.get() >= 1


def test_a_body_that_does_not_arrive_is_a_408(server):
  s = _connect(server)
  s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"prompt\": ")
  t0 = time.time()
  status, _, body = _response(s)
  s.close()
  assert status == 408 and BODY_TIMEOUT - 0.5 < time.time() - t0 < BODY_TIMEOUT + 5
  error = json.loads(body)["error"]
  assert "--body_timeout" in error["message"] and error["code"] == 408, error


def test_an_over_long_header_gets_the_openai_error_shape(server):
  s = _connect(server)
  s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
  status, headers, body = _response(s)
  s.close()
  assert status == 400 and headers["content-type"].startswith("application/json"), (status, headers, body[:200])
  error = json.loads(body)["error"]
  assert error["code"] == 400 and error["type"] == "invalid_request_error" and "Bad Request" in error["message"]
  assert raw(server, "/health")[0] == 200


def test_sigterm_drain_ends_after_drain_timeout(tmp_path):
  """A real `jaxllm serve` with --drain_timeout 1: a request that would run far longer is cancelled once the drain
  time is up, and the process exits 0 soon after SIGTERM."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  proc = subprocess.Popen([sys.executable, "-m", "jaxllm.serving.server", "--model=default", f"--port={port}",
                           "--max_model_len=256", "--max_num_seqs=4", "--nowarmup", "--drain_timeout=1"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert "ready on" in proc.stdout.readline(), proc.stderr.read()
    body = json.dumps({"prompt": "Tell me a long story.", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
                       "stream": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    chunks = []
    with urllib.request.urlopen(req, timeout=300) as r:
      for line in r:
        if line.startswith(b"data: {"):
          chunks.append(json.loads(line[6:]))
          if len(chunks) == 3:  # generating: now the signal
            t0 = time.time()
            os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == 0
    assert time.time() - t0 < 20
    _, err = proc.communicate(timeout=10)
  finally:
    proc.kill()
  assert 3 <= len(chunks) < 200  # cut short: 200 tokens take far longer than the drain timeout here
  assert "drain timeout: cancelling 1 unfinished requests" in err, err[-2000:]
