"""The scheduler on a thread of its own, for callers on an asyncio event loop (the HTTP server).

    loop = EngineLoop(scheduler)
    loop.start()
    stream = loop.submit(prompt_ids, SamplingParams(n=2), request_id="cmpl-1")   # validated here; raises ValueError
    async for update in stream:           # Update(index, delta, finished, request) per sample as text becomes final
        ...
    loop.cancel(stream)                   # e.g. the client went away: the samples end, their pages are freed
    loop.stop(drain=True)                 # finishes what was admitted or queued, then the thread ends

Only the engine thread touches the scheduler (it is not thread-safe): `submit` and `cancel` queue an operation that
the thread runs before its next step, and the scheduler's streaming callback hands each update to the caller's event
loop with `call_soon_threadsafe`. Requests are validated on the caller's thread first (the checks read only the
engine's fixed configuration), so a bad request is an exception at `submit` and never reaches the engine thread.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time

from jaxllm.sampling import SamplingParams
from jaxllm.serving.scheduler import FINISHED, Request, Scheduler


@dataclasses.dataclass
class Update:
  index: int  # which sample of the request
  delta: str  # newly final text
  finished: bool
  request: Request  # the scheduler's record: output_ids, logprobs, finish_reason, ... (read after `finished`)


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

  def __init__(self, scheduler: Scheduler, max_waiting: int | None = None):
    self.scheduler = scheduler
    self.max_waiting = max_waiting  # requests queued but not yet running beyond which `submit` refuses (None: no cap)
    self._ops: collections.deque = collections.deque()
    self._wake = threading.Condition()
    self._thread = threading.Thread(target=self._run, name="jaxllm-engine", daemon=True)
    self._stopping = False
    self._drain = True
    self.error: BaseException | None = None  # what killed the engine thread, if anything did
    self.num_waiting = 0  # queued or waiting, as of the last step (read by the server's metrics)
    self.num_running = 0

  # ------------------------------------------------------------------ caller side (any thread)
  def start(self) -> None:
    self._thread.start()

  @property
  def alive(self) -> bool:
    return self._thread.is_alive() and self.error is None

  def submit(self, prompt_ids, params: SamplingParams, *, request_id: str, seeds: list[int] | None = None,
             loop: asyncio.AbstractEventLoop | None = None, grammar=None) -> RequestStream:
    """Queues params.n samples of a prompt; raises ValueError for a bad request and OverflowError when the queue
    is full. A structured-output constraint is compiled here (on the caller's thread) unless `grammar` is the
    matcher `compile_grammar` made for it."""
    if not self.alive or self._stopping:
      raise RuntimeError("the engine is not accepting requests (shutting down or stopped).")
    ids = self.scheduler.validate(prompt_ids, params)
    if params.structured_outputs is not None and grammar is None:
      grammar = self.compile_grammar(params)
    if self.max_waiting is not None and self.num_waiting + len(self._ops) >= self.max_waiting:
      raise OverflowError(f"the server is at capacity ({self.max_waiting} requests waiting); retry later.")
    loop = loop or asyncio.get_running_loop()
    stream = RequestStream(request_id, params.n, loop)

    def update(req: Request, delta: str) -> None:  # on the engine thread
      if stream.first_token_time is None and req.output_ids:
        stream.first_token_time = time.monotonic()
      loop.call_soon_threadsafe(stream._push, Update(req.index, delta, req.finished, req))

    def add():
      stream.requests = self.scheduler.add_samples(ids, params, request_id=request_id, on_update=update, seeds=seeds,
                                                   grammar=grammar)

    self._call(add)
    return stream

  def compile_grammar(self, params: SamplingParams):
    """The grammar matcher of params' structured-output constraint, or None (any thread; raises ValueError for a
    bad constraint). Compiling can take milliseconds to seconds: a server calls this off its event loop."""
    if params.structured_outputs is None:
      return None
    return self.scheduler.grammars.compile(params.structured_outputs)

  def cancel(self, stream: RequestStream) -> None:
    """Ends every unfinished sample of the request (queued, running or in flight); its pages are freed."""

    def cancel():
      for r in stream.requests:
        self.scheduler.cancel(r.request_id)

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
        for op in ops:
          op()
        if stopping and not drain:
          for req in list(sched.requests.values()):
            sched.cancel(req.request_id)
        if sched.has_work():
          sched.step()
        self.num_waiting = len(sched.waiting)
        self.num_running = sum(r is not None for r in sched.slots)
        if stopping and not sched.has_work() and not self._ops:
          return
    except BaseException as e:  # noqa: BLE001 - reported to every caller instead of dying silently
      self.error = e
      for req in list(sched.requests.values()):
        if req.on_update is not None and not req.finished:
          req.finish_reason = "abort"
          req.status = FINISHED
          req.on_update(req, "")
      raise
