"""The scheduler on a thread of its own, for callers on an asyncio event loop (the HTTP server).

    loop = EngineLoop(scheduler)
    loop.start()
    stream = loop.submit(prompt_ids, SamplingParams(n=2), request_id="cmpl-1")   # validated here; raises ValueError
    streams = loop.submit_all([(ids_a, params_a), (ids_b, params_b)], request_id="cmpl-2")  # all queued, or none
    async for update in stream:           # Update(index, delta, finished, request) per sample as text becomes final
        ...
    loop.cancel(stream)                   # e.g. the client went away: the samples end, their pages are freed
    loop.stop(drain=True)                 # finishes what was admitted or queued, then the thread ends

Only the engine thread touches the scheduler (it is not thread-safe): `submit` and `cancel` queue an operation that
the thread runs before its next step, and the scheduler's streaming callback hands each update to the caller's event
loop with `call_soon_threadsafe`. Requests are validated on the caller's thread first (the checks read only the
engine's fixed configuration), so a bad request is an exception at `submit` and never reaches the engine thread.

A multi-process server (`jaxllm.serving.multihost`) gives the loop a channel: each iteration's operations are also
recorded as data (an add's request id, prompt, params and the seeds its samples got; a cancel's request ids) and
published with whether the iteration steps, before the step is dispatched, so every process's scheduler replica
applies the same operations and enters the same step.

Admission counts samples (sequences: prompts x n), the unit that waits for a slot: a request is queued whole or not at
all, against `max_waiting` samples waiting in the scheduler or submitted and not yet added. A request that could never
fit (more samples than `max_waiting`) is a ValueError; one that does not fit now is an OverflowError.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
import types
from typing import Callable

import numpy as np

from jaxllm.sampling import SamplingParams
from jaxllm.serving import multihost
from jaxllm.serving.scheduler import FINISHED, Request, Scheduler


@dataclasses.dataclass
class Update:
  index: int  # which sample of the request
  delta: str  # newly final text
  finished: bool
  request: Request  # the scheduler's record: output_ids, logprobs, finish_reason, ... (read after `finished`)
  num_tokens: int = 0  # output tokens made when this update was (their ids and logprobs recorded): a stream's chunk
  # carries the logprobs of tokens up to here, not of those the engine thread made since


class EngineStopped(RuntimeError):
  """`submit` after the engine stopped taking requests (a drain, a stop, or its thread died)."""


def tokens_ready(req) -> int:
  """Output tokens of `req` whose ids and logprobs are all recorded (the engine thread appends them one list at a
  time)."""
  return min(len(req.output_ids), len(req.logprobs), len(req.top_logprobs))


class RequestStream:
  """The updates of one submitted request (all its samples), in the order the engine produced them."""

  def __init__(self, request_id: str, n: int, loop: asyncio.AbstractEventLoop):
    self.request_id = request_id
    self.n = n
    self.requests: list[Request] = []
    self.arrival = time.monotonic()
    self.first_token_time: float | None = None
    self._loop = loop
    self._queue: asyncio.Queue[Update] = asyncio.Queue()
    self._open = n

  def _push(self, update: Update) -> None:  # on the event loop
    self._queue.put_nowait(update)

  def __aiter__(self):
    return self

  async def __anext__(self) -> Update:
    if not self._open:
      raise StopAsyncIteration
    update = await self._queue.get()
    if update.finished:
      self._open -= 1
    return update

  @property
  def finished(self) -> bool:
    return bool(self.requests) and all(r.finished for r in self.requests)


class EngineLoop:

  def __init__(self, scheduler: Scheduler, max_waiting: int | None = None, channel: multihost.Channel | None = None):
    self.scheduler = scheduler
    # Multi-process serving: each iteration's operations and step go to the other processes' scheduler replicas
    # first (`jaxllm.serving.multihost`).
    self.channel = channel
    self.max_waiting = max_waiting  # samples queued for a slot beyond which `submit_all` refuses (None: no cap)
    self._ops: collections.deque = collections.deque()
    self._wake = threading.Condition()
    self._thread = threading.Thread(target=self._run, name="jaxllm-engine", daemon=True)
    self._stopping = False
    self._drain = True
    self.error: BaseException | None = None  # what killed the engine thread, if anything did
    self.num_waiting = 0  # samples waiting in the scheduler, as of the engine thread's last look
    self.num_running = 0
    # Called on the engine thread with the seconds of each scheduler step (dispatching a step and absorbing the
    # previous one: the period at which every running sequence gets a token); a server feeds its metrics with it.
    self.on_step: Callable[[float], None] | None = None
    self._pending = 0  # samples submitted whose add has not run on the engine thread yet (guarded by _wake)

  # ------------------------------------------------------------------ caller side (any thread)
  def start(self) -> None:
    self._thread.start()

  @property
  def alive(self) -> bool:
    return self._thread.is_alive() and self.error is None

  @property
  def queued(self) -> int:
    """Samples waiting for a slot: in the scheduler's queue, or submitted and about to be added to it."""
    return self.num_waiting + self._pending

  def submit(self, prompt_ids, params: SamplingParams, *, request_id: str, seeds: list[int] | None = None,
             loop: asyncio.AbstractEventLoop | None = None, grammar=None) -> RequestStream:
    """Queues params.n samples of a prompt (see `submit_all`)."""
    return self.submit_all([(prompt_ids, params)], request_id=request_id, loop=loop, grammar=grammar,
                           seeds=None if seeds is None else lambda n: seeds)[0]

  def submit_all(self, items, *, request_id: str, seeds=None, loop: asyncio.AbstractEventLoop | None = None,
                 grammar=None) -> list[RequestStream]:
    """Queues params.n samples of each (prompt_ids, params) item, all or none: raises ValueError for a bad item or a
    request of more samples than `max_waiting`, OverflowError when the queue cannot take them now, EngineStopped once
    it takes none; nothing is queued then. seeds(n) -> n per-sample seeds (called only once the request is admitted).
    A structured-output constraint is compiled here (on the caller's thread) unless `grammar` is the matcher
    `compile_grammar` made."""
    if not self.alive or self._stopping:
      raise EngineStopped("the engine is not accepting requests (shutting down or stopped).")
    samples = sum(params.n for _, params in items)
    if self.max_waiting is not None and samples > self.max_waiting:
      raise ValueError(f"the request asks for {samples} sequences (prompts x n); this server queues at most "
                       f"{self.max_waiting} (--max_waiting).")
    checked = [(self.scheduler.validate(ids, params), params) for ids, params in items]
    grammars = [grammar if grammar is not None or params.structured_outputs is None else self.compile_grammar(params)
                for _, params in checked]
    loop = loop or asyncio.get_running_loop()
    with self._wake:
      # The queue bound counts what will wait: a burst into an idle engine fills its free slots first.
      free = max(0, self.scheduler.num_slots - self.num_running)
      if self.max_waiting is not None and self.queued + samples > self.max_waiting + free:
        raise OverflowError(f"the server is at capacity ({self.queued} sequences waiting for a slot, at most "
                            f"{self.max_waiting} beyond the {free} free slots); retry later.")
      self._pending += samples
    streams = []
    adds = []
    for k, ((ids, params), g) in enumerate(zip(checked, grammars)):
      stream = RequestStream(request_id if len(items) == 1 else f"{request_id}-{k}", params.n, loop)
      streams.append(stream)
      adds.append((stream, ids, params, g, seeds(params.n) if seeds is not None else None))

    def add():  # on the engine thread
      for stream, ids, params, g, sample_seeds in adds:
        stream.requests = self.scheduler.add_samples(ids, params, request_id=stream.request_id,
                                                     on_update=self._updater(stream, loop), seeds=sample_seeds,
                                                     grammar=g)
      with self._wake:
        self._pending -= samples
        self.num_waiting = len(self.scheduler.waiting)
      if self.channel is not None:  # what the other processes replay
        return "add", [(stream.request_id, np.asarray(ids, np.int32), params, [r.seed for r in stream.requests])
                       for stream, ids, params, _, _ in adds]

    add.streams = [(stream, loop) for stream, *_ in adds]  # answered by `fail` if the engine dies before adding
    self._call(add)
    return streams

  @staticmethod
  def _updater(stream: RequestStream, loop: asyncio.AbstractEventLoop):
    def update(req: Request, delta: str) -> None:  # on the engine thread
      if stream.first_token_time is None and req.output_ids:
        stream.first_token_time = time.monotonic()
      loop.call_soon_threadsafe(stream._push, Update(req.index, delta, req.finished, req, tokens_ready(req)))

    return update

  def compile_grammar(self, params: SamplingParams):
    """The grammar matcher of params' structured-output constraint, or None (any thread; raises ValueError for a
    bad constraint). Compiling can take milliseconds to seconds: a server calls this off its event loop."""
    if params.structured_outputs is None:
      return None
    if self.channel is not None:  # the other processes compile it now too, not when they replay its add in a step
      self.channel.notify(("grammar", params.structured_outputs))
    return self.scheduler.grammars.compile(params.structured_outputs)

  def cancel(self, stream: RequestStream) -> None:
    """Ends every unfinished sample of the request (queued, running or in flight); its pages are freed."""

    def cancel():
      ids = [r.request_id for r in stream.requests]
      for request_id in ids:
        self.scheduler.cancel(request_id)
      return "cancel", ids

    self._call(cancel)

  def stop(self, drain: bool = True, timeout: float | None = None) -> None:
    """Refuses new requests; with drain, the thread finishes every request it has, else cancels them; then ends."""
    with self._wake:
      self._stopping, self._drain = True, drain
      self._wake.notify()
    self._thread.join(timeout)

  def _call(self, op) -> None:
    with self._wake:
      self._ops.append(op)
      self._wake.notify()

  # ------------------------------------------------------------------ engine thread
  def _count(self) -> None:
    self.num_waiting = len(self.scheduler.waiting)
    self.num_running = self.scheduler.num_running

  def _run(self) -> None:
    sched = self.scheduler
    try:
      while True:
        with self._wake:
          while not self._ops and not sched.has_work() and not self._stopping:
            self._wake.wait()
          ops = list(self._ops)
          self._ops.clear()
          stopping, drain = self._stopping, self._drain
        records = [r for r in (op() for op in ops) if r is not None]
        if stopping and not drain:
          ids = list(sched.requests)
          for request_id in ids:
            sched.cancel(request_id)
          records.append(("cancel", ids))
        self._count()  # cancels show at once, not a step later
        step = sched.has_work()
        with self._wake:
          done = stopping and not step and not self._ops
        if self.channel is not None and (records or step or done):  # first: the others enter the step too
          self.channel.publish({"ops": records, "step": step, "exit": done})
        if step:
          start = time.perf_counter()
          sched.step()
          if self.on_step is not None:
            self.on_step(time.perf_counter() - start)
        self._count()
        if done:
          return
    except BaseException as e:  # noqa: BLE001 - reported to every caller instead of dying silently
      if self.channel is not None:
        # A collective failing in a multi-process server is most often another process dying (gloo notices the
        # closed connection as soon as the channel does): a moment for the channel to say which, which `fail` keeps
        # as the first error, over the collective's.
        self.channel.lost.wait(2.0)
      self.fail(e)
      raise

  def fail(self, error: BaseException) -> None:
    """The engine is gone (its thread raised, or another process of a multi-process server died while this thread
    may be blocked in a collective): every unfinished request ends "abort" and no new one is taken."""
    if self.error is None:
      self.error = error
    with self._wake:
      ops = list(self._ops)
      self._ops.clear()
    for op in ops:  # requests submitted but not added yet: each sample ends the same way
      for stream, loop in getattr(op, "streams", ()):
        for k in range(stream.n):
          gone = types.SimpleNamespace(index=k, finish_reason="abort", finished=True, output_ids=[])
          loop.call_soon_threadsafe(stream._push, Update(k, "", True, gone))
    for req in list(self.scheduler.requests.values()):
      if req.on_update is not None and not req.finished:
        req.finish_reason = "abort"
        req.status = FINISHED
        req.on_update(req, "")
