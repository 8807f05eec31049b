"""Continuous batching: requests join and leave the decode batch every step, over the engine and the page allocator.

    sched = Scheduler(engine, tokenizer, eos_ids=(2,))
    req = sched.add(prompt_ids, SamplingParams(max_tokens=64), on_update=callback)   # validated on the host
    while sched.has_work():
        sched.step()                # admit -> reserve pages (preempting if short) -> dispatch generate -> absorb
    req.output_ids, req.text, req.finish_reason

One `step()`:
  1. admit: waiting requests in arrival order take a free slot and pages for their tokens plus the steps ahead; up to
     `max_prefill_batch` of them (and no more than `max_prefill_tokens` padded tokens) are prefilled in one call
     and inserted into their slots. The further samples of an
     n > 1 request (`add_samples`) that fit a slot too are forked from their prompt's prefill instead: they share its
     full pages and copy only the last one (`Engine.fork`); one left waiting is later prefilled on its own.
  2. reserve: every running request gets pages for the positions the next generate call writes; when the pool is
     short, the latest-admitted running request is preempted (slot and pages freed; it waits at the front of the
     queue and is later prefilled again over prompt + output so far: recompute, as vLLM does).
  3. dispatch `generate` (asynchronous) over the page bucket the longest running request needs, then absorb the
     *previous* call's tokens: the device runs one call ahead of the host, so copying tokens back and detokenizing
     never leave it idle.
Absorbing applies EOS / stop ids / stop strings / max_tokens, streams deltas to `on_update`, and frees a finished
request's slot and pages. Tokens computed for a slot whose request already ended (or was preempted or cancelled)
are dropped: each in-flight result remembers which request held each slot when it was dispatched.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Callable

import jax
import numpy as np

from jaxllm.sampling import SamplingArrays, SamplingParams
from jaxllm.serving.detokenizer import Detokenizer
from jaxllm.serving.engine import Engine
from jaxllm.serving.page_allocator import PageAllocator
from jaxllm.sharding.distributed import host_value

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclasses.dataclass(eq=False)
class Request:
  request_id: str
  prompt_ids: list[int]
  params: SamplingParams
  seed: int
  detok: Detokenizer
  on_update: Callable[["Request", str], None] | None = None  # (request, new text) after each absorbed token batch
  status: str = WAITING
  output_ids: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  top_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None  # "stop" | "length" | "abort"
  slot: int | None = None
  num_preemptions: int = 0
  arrival: int = 0
  max_new: int = 0  # max_tokens capped by max_model_len - prompt length
  epoch: int = 0  # bumped at every admission: in-flight results of an earlier admission are not this one's
  parent: "Request | None" = None  # sample k > 0 of an n > 1 request: shares sample 0's prompt pages when admitted with it
  index: int = 0  # which sample of its prompt this is

  @property
  def text(self) -> str:
    return self.detok.text

  @property
  def stop_reason(self):
    return self.detok.stop_reason

  @property
  def finished(self) -> bool:
    return self.status == FINISHED

  @property
  def max_total(self) -> int:
    return len(self.prompt_ids) + self.params.max_tokens


class Scheduler:

  def __init__(self, engine: Engine, tokenizer=None, eos_ids: tuple[int, ...] = (), seed: int = 0):
    self.engine = engine
    self.config = engine.config
    self.tokenizer = tokenizer
    self.eos_ids = tuple(eos_ids)
    self.vocab_size = engine.model_config.vocab_size
    self.allocator = PageAllocator(engine.num_pages, self.config.page_size)
    self.state = engine.init_state()
    self.waiting: collections.deque[Request] = collections.deque()
    self.slots: list[Request | None] = [None] * self.config.num_slots
    self.requests: dict[str, Request] = {}
    self._inflight: collections.deque = collections.deque()  # (kind, device result, [(request, slot)...])
    self._rng = np.random.default_rng(seed)
    self._ids = itertools.count()
    self.num_steps = 0
    self.num_preemptions = 0
    self.num_forks = 0  # samples admitted on a prompt's shared pages (no prefill of their own)

  # ------------------------------------------------------------------ requests
  def validate(self, prompt_ids, params: SamplingParams) -> list[int]:
    """The checks every request passes before it is queued (a bad request never reaches the device)."""
    if not isinstance(params, SamplingParams):
      raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}.")
    ids = [int(i) for i in prompt_ids]
    if not ids:
      raise ValueError("the prompt is empty; it needs at least one token.")
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"the prompt has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}.")
    limit = self.config.max_model_len
    if len(ids) + 1 > limit:
      raise ValueError(f"the prompt has {len(ids)} tokens; max_model_len is {limit}, which must leave room for at "
                       "least one generated token.")
    if self.allocator.pages_for(len(ids) + 1) > self.allocator.capacity:
      raise ValueError(f"the prompt needs more KV pages than the cache has ({self.allocator.capacity}).")
    params.check_vocab(self.vocab_size)
    if params.logprobs and params.logprobs > self.config.num_top_logprobs:
      raise ValueError(f"logprobs={params.logprobs} exceeds the engine's num_top_logprobs="
                       f"{self.config.num_top_logprobs}.")
    return ids

  def add(self, prompt_ids, params: SamplingParams, *, request_id: str | None = None,
          on_update: Callable | None = None, seed: int | None = None) -> Request:
    """One sequence (params.n must be 1; see `add_samples`)."""
    if params.n != 1:
      raise ValueError(f"add() runs one sequence; use add_samples() for n={params.n} samples of a prompt.")
    return self._add(self.validate(prompt_ids, params), params, request_id, on_update, seed)

  def add_samples(self, prompt_ids, params: SamplingParams, *, request_id: str | None = None,
                  on_update: Callable | None = None, seeds: list[int] | None = None) -> list[Request]:
    """params.n samples of one prompt, ids `{request_id}/{k}`. When they are admitted together (slots and pages
    allowing), the prompt is prefilled once and samples 1.. share its full KV pages (each copies only the page the
    prompt ends in); otherwise a sample is prefilled on its own. `seeds[k]` (or fresh ones) seed sample k."""
    ids = self.validate(prompt_ids, params)
    if seeds is not None and len(seeds) != params.n:
      raise ValueError(f"seeds has {len(seeds)} entries for n={params.n} samples.")
    base = request_id if request_id is not None else f"req-{next(self._ids)}"
    if any(f"{base}/{k}" in self.requests for k in range(params.n)):
      raise ValueError(f"request_id {base!r} is already in use.")
    out = []
    for k in range(params.n):
      r = self._add(ids, params, f"{base}/{k}", on_update, None if seeds is None else seeds[k])
      r.parent, r.index = (out[0] if out else None), k
      out.append(r)
    return out

  def _add(self, ids, params, request_id, on_update, seed) -> Request:
    request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
    if request_id in self.requests:
      raise ValueError(f"request_id {request_id!r} is already in use.")
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_ids))
    if seed is None:
      seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**32))
    req = Request(request_id=request_id, prompt_ids=ids, params=params, seed=seed,
                  detok=Detokenizer(self.tokenizer, frozenset(stop_ids), params.stop, stream=on_update is not None),
                  on_update=on_update,
                  arrival=next(self._ids))
    req.max_new = min(params.max_tokens, self.config.max_model_len - len(ids))
    self.requests[request_id] = req
    self.waiting.append(req)
    return req

  def cancel(self, request_id: str) -> bool:
    """Ends a request wherever it is (queued, running, in flight); False if it is unknown or already finished."""
    req = self.requests.get(request_id)
    if req is None or req.finished:
      return False
    if req.status == WAITING:
      self.waiting.remove(req)
    self._finish(req, "abort")
    return True

  def has_work(self) -> bool:
    return bool(self.waiting) or any(s is not None for s in self.slots) or bool(self._inflight)

  # ------------------------------------------------------------------ the loop
  def step(self) -> None:
    self._admit()
    longest = self._reserve()
    keep = 0
    if any(s is not None for s in self.slots):
      occupied = 1 + max(i for i, r in enumerate(self.slots) if r is not None)
      self.state, result = self.engine.generate(self.state, longest, occupied)
      self._inflight.append(("generate", result, self._holders()))
      self.num_steps += 1
      keep = 1  # the call just dispatched stays in flight while the host reads everything older
    while len(self._inflight) > keep:
      self._absorb(*self._inflight.popleft())

  def run_until_done(self) -> None:
    while self.has_work():
      self.step()

  def _holders(self) -> list[tuple[Request, int, int]]:
    return [(r, i, r.epoch) for i, r in enumerate(self.slots) if r is not None]

  # ------------------------------------------------------------------ admission
  def _admit(self) -> None:
    lookahead, C, limit = self.config.decode_steps, self.config.page_size, self.config.max_model_len
    batch: list[Request] = []
    forks: list[Request] = []  # further samples of a prompt in `batch`: they share its pages instead of a prefill
    free_slots = [i for i, r in enumerate(self.slots) if r is None]
    while self.waiting and len(batch) + len(forks) < len(free_slots):
      req = self.waiting[0]
      parent = req.parent
      if parent is not None and parent in batch and not parent.output_ids and not req.output_ids:
        n = len(req.prompt_ids)
        if not self.allocator.fork(parent.request_id, req.request_id, (n - 1) // C, min(n + lookahead, limit)):
          break
        forks.append(self.waiting.popleft())
        continue
      if len(batch) == self.config.max_prefill_batch:
        break
      tokens = req.prompt_ids + req.output_ids
      if batch:  # would the padded batch outgrow the prefill token budget?
        R, T = self.engine.prefill_shape(len(batch) + 1, max(len(tokens), *(len(r.prompt_ids) + len(r.output_ids)
                                                                             for r in batch)))
        if R * T > self.config.max_prefill_tokens:
          break
      if not self.allocator.allocate(req.request_id, min(len(tokens) + lookahead, limit)):
        break  # first come, first served: nothing overtakes the head of the queue
      self.waiting.popleft()
      batch.append(req)
    if not batch:
      return
    prompts = [r.prompt_ids + r.output_ids for r in batch]
    sampling = SamplingArrays.from_params(
        [r.params for r in batch], [r.seed for r in batch], [tuple(r.detok.stop_ids) for r in batch],
        [len(r.prompt_ids) + r.params.min_tokens for r in batch])
    pages = [self.allocator.pages(r.request_id) for r in batch]
    self.state, prefix = self.engine.prefill(self.state, prompts, [len(r.prompt_ids) for r in batch], pages, sampling)
    slots = free_slots[:len(batch)]
    self.state = self.engine.insert(self.state, prefix, slots)
    for r, s in zip(batch, slots):
      self._seat(r, s)
    self._inflight.append(("prefill", prefix, [(r, i, r.epoch) for i, r in enumerate(batch)]))
    for r, s in zip(forks, free_slots[len(batch):]):
      n = len(r.prompt_ids)
      own, theirs = self.allocator.pages(r.request_id), self.allocator.pages(r.parent.request_id)
      sampling = SamplingArrays.from_params([r.params], [r.seed], [tuple(r.detok.stop_ids)],
                                            [n + r.params.min_tokens])
      self.state = self.engine.fork(self.state, prefix, batch.index(r.parent), s, own, theirs[(n - 1) // C],
                                    own[(n - 1) // C], r.prompt_ids[-1], sampling)
      self._seat(r, s)
    self.num_forks += len(forks)

  def _seat(self, req: Request, slot: int) -> None:
    req.status, req.slot = RUNNING, slot
    req.epoch += 1
    self.slots[slot] = req

  def _reserve(self) -> int:
    """Pages for every position the next generate call writes; preempts the latest admitted request when short.
    Returns the most tokens any running request will hold after that call (which page bucket it needs)."""
    ahead = self.config.decode_steps
    grown = {}
    longest = 1
    for req in sorted((r for r in self.slots if r is not None), key=lambda r: r.arrival):
      if req.status != RUNNING:
        continue
      # Positions written next: tokens known so far (+ in flight) ... bounded by max_model_len.
      need = min(self._position(req) + ahead, self.config.max_model_len)
      before = len(self.allocator.pages(req.request_id))
      while not self.allocator.ensure(req.request_id, need):
        victim = max((r for r in self.slots if r is not None), key=lambda r: r.arrival)
        self._preempt(victim)
        if victim is req:
          break
      if req.status == RUNNING:
        longest = max(longest, need)
        if len(self.allocator.pages(req.request_id)) != before:
          grown[req.slot] = self.allocator.pages(req.request_id)
    if grown:
      self.state = self.engine.set_pages(self.state, grown)
    return longest

  def _position(self, req: Request) -> int:
    """Tokens the device will have cached for `req` once everything dispatched so far has run."""
    calls = collections.Counter(kind for kind, _, holders in self._inflight
                                if any(r is req and e == req.epoch for r, _, e in holders))
    return (len(req.prompt_ids) + len(req.output_ids) + calls["prefill"]
            + calls["generate"] * self.config.decode_steps)

  def _preempt(self, req: Request) -> None:
    self._free_slot(req)
    req.status = WAITING
    req.num_preemptions += 1
    self.num_preemptions += 1
    self.waiting.appendleft(req)

  # ------------------------------------------------------------------ results
  def _absorb(self, kind: str, result, holders: list[tuple[Request, int, int]]) -> None:
    host = jax.tree.map(host_value, result)
    for req, row, epoch in holders:
      if req.status != RUNNING or req.epoch != epoch:
        continue  # ended, preempted or re-admitted since dispatch: these tokens are not its own
      if kind == "prefill":
        toks, lps = host.tokens[row:row + 1], host.logprobs[row:row + 1]
        tops = (host.top_ids[row:row + 1], host.top_logprobs[row:row + 1])
      else:
        toks, lps = host.tokens[row], host.logprobs[row]
        tops = (host.top_ids[row], host.top_logprobs[row])
      self._take(req, toks, lps, tops)

  def _take(self, req: Request, toks, lps, tops) -> None:
    delta = []
    n_top = req.params.logprobs or 0
    for i, (t, lp) in enumerate(zip(toks, lps)):
      req.output_ids.append(int(t))
      req.logprobs.append(float(lp))
      if req.params.logprobs is not None:
        req.top_logprobs.append({int(a): float(b) for a, b in zip(tops[0][i][:n_top], tops[1][i][:n_top])})
      delta.append(req.detok.add(int(t)))
      if req.detok.finished:
        break
      if len(req.output_ids) >= req.max_new:
        delta.append(req.detok.flush())
        break
    if req.detok.finished:
      reason = "stop" if req.detok.stop_reason is not None else "length"
      self._finish(req, reason, "".join(delta))
    elif req.on_update is not None:
      req.on_update(req, "".join(delta))

  def _finish(self, req: Request, reason: str, delta: str = "") -> None:
    if req.slot is not None:
      self._free_slot(req)
    elif self.allocator.owns(req.request_id):
      self.allocator.free(req.request_id)
    req.status, req.finish_reason = FINISHED, reason
    self.requests.pop(req.request_id, None)  # the caller holds the Request; the scheduler forgets it
    if reason == "abort":
      delta += req.detok.flush()
    if req.on_update is not None:
      req.on_update(req, delta)

  def _free_slot(self, req: Request) -> None:
    slot = req.slot
    self.slots[slot] = None
    req.slot = None
    self.allocator.free(req.request_id)
    self.state = self.engine.release(self.state, [slot])
