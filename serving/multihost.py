"""Serving over several processes (hosts): process 0 decides, every process runs the same engine steps.

A model sharded over a mesh that spans processes runs each jitted engine step on every process at once (JAX's
multi-controller runtime: each process launches the same program on its own devices, and the collectives inside it
join them). So every process must enter the same steps, with the same inputs, in the same order. The scheduler is
deterministic given the requests it is handed and the order they come in, so every process runs its own replica:

    process 0 (HTTP server, `EngineLoop`)           processes 1..P-1 (`follow`)
      applies the queued adds / cancels               receive the message
      publishes {ops, step, exit}  ---TCP--->         apply the same ops to their scheduler replica
      scheduler.step()           <--collectives-->    scheduler.step() (the same rows, pages and sampling arrays)

Only process 0 hears clients, validates requests and answers them; the others hold no HTTP port and keep the same
page accounting, prefix cache and request states as process 0 (each step's tokens are read on every process).

**The channel** is one TCP connection from each follower to process 0 (on the coordinator's port + 1), carrying
length-prefixed pickled messages one way. Not a collective (`multihost_utils.broadcast_one_to_all`): on an
accelerator a broadcast is a device program queued behind the step in flight, so process 0 would wait for each step
to finish before it could publish the next one, and lose the one step the host keeps ahead of the device; nor would a
collective tell a slow peer from a dead one (a killed follower was seen to leave process 0 inside gloo until the
coordination service's heartbeat timeout aborted it, a minute later). The connection's end is the liveness signal:
the kernel closes it when a process dies, however it dies. Only the connection's setup goes through a collective: a
random token and the port, broadcast from process 0, so a connection that cannot show the token is refused (the
messages hold clients' prompts). Besides the steps' messages, process 0 sends notices from any thread (`notify`): a
structured-output constraint to compile, sent as its request arrives, which a follower starts compiling at once (on
a background thread), so that replaying the request's add in a step finds it compiled instead of compiling it
there while every process waits.

**Failures.** Every process opens the channel before it loads the model, so a follower that fails to load (or dies
at any later point) closes its connection, and process 0 calls `on_lost(process id)`: while loading, the server
gives up at once (instead of waiting in the ready barrier for the coordination service's timeout); once serving, it
fails its requests with 503s; either way `jaxllm serve` exits non-zero, even while its engine thread is blocked in a
collective with the dead process. A follower whose connection to process 0 closes exits non-zero at once. A follower
ignores SIGTERM / SIGINT once connected (a pod's shutdown signals every process at once): it stops when process 0
says so, after process 0 has drained its requests.
"""

from __future__ import annotations

import hmac
import logging
import os
import pickle
import queue
import secrets
import select
import socket
import threading
from typing import Callable

import numpy as np

log = logging.getLogger("jaxllm.multihost")

_HELLO = 64  # bytes of the set-up broadcast: token (16), port (4), process 0's host name (44 at most)


class Channel:
  """Process 0's messages to every other process of the JAX job, in order, and each side's watch on the other's
  liveness (see the module's docstring). Built by every process at the same point (its set-up is a collective)."""

  def __init__(self, on_lost: Callable[[int], None] | None = None, timeout: float = 120.0):
    import jax

    self.me, self.count = jax.process_index(), jax.process_count()
    self.is_source = self.me == 0
    self.on_lost = on_lost  # process 0: called (on a watcher thread) with the id of a follower that is gone
    self.closing = False  # set once process 0 has said it is done: connections closing then are expected
    self.lost = threading.Event()  # process 0: set once a follower's loss has been reported to `on_lost`
    self._peers: dict[int, socket.socket] = {}
    self._inbox: queue.Queue = queue.Queue()
    self._send = threading.Lock()  # one frame at a time: the engine thread publishes, request workers notify
    # Processes 1..P-1: called on the channel's reader thread with each notice process 0 sends (`notify`).
    self.on_notice: Callable[[object], None] | None = None
    if self.count > 1:
      self._connect(timeout)

  # ------------------------------------------------------------------ set-up
  def _connect(self, timeout: float) -> None:
    from jax.experimental import multihost_utils

    coordinator = getattr(_distributed_state(), "coordinator_address", None)  # process 0's host and port
    hello = np.zeros(_HELLO, np.uint8)
    if self.is_source:
      listener = _listen(int(coordinator.rpartition(":")[2]) + 1 if coordinator else 0)
      token = secrets.token_bytes(16)
      host = socket.gethostname().encode()[:_HELLO - 20]
      hello[:20 + len(host)] = np.frombuffer(token + listener.getsockname()[1].to_bytes(4, "little") + host, np.uint8)
    hello = np.asarray(multihost_utils.broadcast_one_to_all(hello, is_source=self.is_source)).tobytes()
    token, port = hello[:16], int.from_bytes(hello[16:20], "little")
    if self.is_source:
      self._accept(listener, token, timeout)
      threading.Thread(target=self._watch_followers, name="jaxllm-liveness", daemon=True).start()
      return
    host = coordinator.rpartition(":")[0] if coordinator else hello[20:].rstrip(b"\0").decode()
    conn = socket.create_connection((host, port), timeout=timeout)
    conn.sendall(token + self.me.to_bytes(4, "little"))
    conn.settimeout(None)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # a lost host, not only a lost process
    self._peers[0] = conn
    threading.Thread(target=self._read_leader, args=(conn,), name="jaxllm-channel", daemon=True).start()

  def _accept(self, listener: socket.socket, token: bytes, timeout: float) -> None:
    listener.settimeout(timeout)
    try:
      while len(self._peers) < self.count - 1:
        conn, addr = listener.accept()
        conn.settimeout(timeout)
        try:
          hello = _read_exactly(conn, 20)
        except (OSError, EOFError):
          conn.close()
          continue
        pid = int.from_bytes(hello[16:], "little")
        if not hmac.compare_digest(hello[:16], token) or not 0 < pid < self.count or pid in self._peers:
          log.warning("refused a connection from %s to process 0's channel port (not a process of this job)", addr)
          conn.close()
          continue
        conn.settimeout(None)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._peers[pid] = conn
    except OSError as e:
      missing = sorted(set(range(1, self.count)) - set(self._peers))
      raise RuntimeError(f"processes {missing} did not connect to process 0's channel port "
                         f"{listener.getsockname()[1]} within {timeout:g} s: {e}") from None
    finally:
      listener.close()

  # ------------------------------------------------------------------ liveness
  def _watch_followers(self) -> None:
    socks = {conn: pid for pid, conn in self._peers.items()}
    while True:
      readable, _, _ = select.select(list(socks), [], [])
      for conn in readable:
        try:
          alive = conn.recv(1) != b""
        except OSError:
          alive = False
        if not alive:
          if not self.closing:
            log.error("process %d is gone (its connection to process 0 closed)", socks[conn])
            if self.on_lost is not None:
              self.on_lost(socks[conn])
            self.lost.set()
          return

  def _read_leader(self, conn: socket.socket) -> None:
    """Follower: each message into the inbox; when the connection ends before process 0 said so, exit at once (the
    main thread may be blocked in a collective that will never complete)."""
    try:
      while True:
        size = int.from_bytes(_read_exactly(conn, 8), "little")
        message = pickle.loads(_read_exactly(conn, size))
        if isinstance(message, dict) and "notice" in message:
          if self.on_notice is not None:
            try:
              self.on_notice(message["notice"])
            except Exception:  # noqa: BLE001 - a notice is advice: this thread must go on reading the steps
              log.exception("process %d: a notice from process 0 failed", self.me)
          continue
        if isinstance(message, dict) and message.get("exit"):
          self.closing = True
        self._inbox.put(message)
    except (OSError, EOFError):
      pass
    except Exception:  # noqa: BLE001 - a message that does not unpickle: this process cannot follow any more
      log.exception("process %d: unreadable message from process 0", self.me)
      self.closing = False
    if not self.closing:
      log.error("process %d: process 0 is gone (the channel closed); exiting", self.me)
      logging.shutdown()
      os._exit(1)

  # ------------------------------------------------------------------ messages
  def publish(self, message) -> None:
    """Process 0: sends `message` (picklable) to every other process. Raises ConnectionError if one is gone."""
    if isinstance(message, dict) and message.get("exit"):
      self.closing = True
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    frame = len(data).to_bytes(8, "little") + data
    with self._send:
      for pid, conn in self._peers.items():
        try:
          conn.sendall(frame)
        except OSError as e:
          raise ConnectionError(f"process {pid} of this multi-process server is gone ({e})") from None

  def notify(self, notice) -> None:
    """Process 0, any thread: `notice` (picklable) to every other process's `on_notice`, at once, outside the order
    of the steps' messages (e.g. a constraint to compile before its request is added). Best effort: a process that
    is gone is the liveness watch's to report."""
    try:
      self.publish({"notice": notice})
    except ConnectionError:
      pass

  def receive(self):
    """Processes 1..P-1: the next message process 0 publishes (blocks until it comes)."""
    return self._inbox.get()

  def close(self) -> None:
    for conn in self._peers.values():
      conn.close()


def _listen(port: int) -> socket.socket:
  """A listening socket on `port` (the coordinator's port + 1, one a network policy can name), else on any port."""
  try:
    return socket.create_server(("", port))
  except OSError:
    return socket.create_server(("", 0))


def _read_exactly(conn: socket.socket, n: int) -> bytes:
  data = bytearray()
  while len(data) < n:
    chunk = conn.recv(min(n - len(data), 1 << 20))
    if not chunk:
      raise EOFError("connection closed")
    data += chunk
  return bytes(data)


def _distributed_state():
  from jax._src import distributed  # the coordinator's address as `jax.distributed.initialize` was given it

  return distributed.global_state


class Grammars:
  """A follower's structured-output constraints: compiled when process 0 announces them (`EngineLoop` does as its
  request arrives, while process 0 compiles its own copy), so replaying the request's add, on the step's path, finds
  them compiled or being compiled instead of compiling them there while every process waits in the step."""

  def __init__(self, compiler):
    self.compiler = compiler
    self.ahead = 0  # adds whose constraint was compiled (or being compiled) from process 0's notice
    self.on_step_path = 0  # adds that had to compile theirs

  def on_notice(self, notice) -> None:  # the channel's reader thread
    kind, params = notice
    if kind == "grammar":
      self.compiler.prefetch(params)

  def compile(self, params):
    if self.compiler.known(params):
      self.ahead += 1
    else:
      self.on_step_path += 1
    return self.compiler.compile(params)


def apply(scheduler, op, grammars: Grammars) -> None:
  """One scheduler operation as process 0 recorded it (`EngineLoop`): ("add", [(request_id, ids, params, seeds)]),
  ("cancel", [request ids])."""
  kind, items = op
  if kind == "add":
    for request_id, ids, params, seeds in items:
      grammar = None if params.structured_outputs is None else grammars.compile(params.structured_outputs)
      scheduler.add_samples(ids, params, request_id=request_id, seeds=seeds, grammar=grammar)
  elif kind == "cancel":
    for request_id in items:
      scheduler.cancel(request_id)
  else:
    raise ValueError(f"unknown scheduler operation {kind!r} from process 0")


def follow(scheduler, channel: Channel, grammars: Grammars | None = None) -> None:
  """Runs process 0's scheduler operations and steps on this process's scheduler replica until process 0 says it
  is done (returns) or the channel fails (raises)."""
  grammars = grammars or Grammars(scheduler.grammars)
  while True:
    message = channel.receive()
    for op in message["ops"]:
      apply(scheduler, op, grammars)
    if message["step"]:
      if not scheduler.has_work():
        raise RuntimeError("this process's scheduler has no work where process 0's stepped: the replicas diverged")
      scheduler.step()
    if message["exit"]:
      return


def process_count() -> int:
  import jax

  return jax.process_count()


def ready_barrier(name: str) -> None:
  """Waits until every process of the job reaches the barrier `name` (e.g. loaded and warmed up)."""
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def serve_follower(config, mesh, layout: str) -> int:
  """`jaxllm serve` on a process other than 0: loads the same model, warms up the same programs, then follows
  process 0's engine loop until it says it is done. -> the exit status: 0 when process 0 ended the run, 1 when
  anything failed (process 0 or another process is gone, or this one could not load)."""
  import signal

  import jax

  from jaxllm.serving.server import load_llm

  me = jax.process_index()
  try:
    channel = Channel()  # first: a failure to load here closes it, and process 0 stops at once
    llm = load_llm(config, mesh, layout)
    if config.warmup:
      llm.warmup()
    ready_barrier("jaxllm serve: every process loaded")
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, lambda signum, _: log.info("process %d: signal %d ignored; process 0 decides when to "
                                                    "stop (after draining its requests)", me, signum))
    grammars = Grammars(llm.scheduler.grammars)
    channel.on_notice = grammars.on_notice
    log.info("process %d: loaded %r; following process 0", me, llm)
    follow(llm.scheduler, channel, grammars)
  except Exception as e:  # noqa: BLE001 - the way every failure of a follower ends: logged, non-zero exit
    log.error("process %d: stopping: %s: %s", me, type(e).__name__, e)
    return 1
  sched = llm.scheduler
  sched.check_pages()
  log.info("process %d: process 0 is done; %d requests unfinished, KV pages per replica (held by requests, cached, "
           "free): %s", me, sum(not r.finished for r in sched.requests.values()),
           [(a.capacity - a.num_free, a.num_cached, a.num_free - a.num_cached)
            for a in (rep.allocator for rep in sched.replicas)])
  log.info("process %d: structured-output constraints compiled ahead of their requests: %d, on the step path: %d",
           me, grammars.ahead, grammars.on_step_path)
  channel.close()
  return 0
