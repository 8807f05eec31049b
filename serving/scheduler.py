"""Continuous batching with chunked prefill and automatic prefix caching, over the engine's one mixed step.

    sched = Scheduler(engine, tokenizer, eos_ids=(2,))
    req = sched.add(prompt_ids, SamplingParams(max_tokens=64), on_update=callback)   # validated on the host
    while sched.has_work():
        sched.step()                # schedule -> dispatch one step -> absorb the previous step's tokens
    req.output_ids, req.text, req.finish_reason

One `step()` (vLLM v1's scheduler, token-budgeted):
  1. decodes: every running sequence whose tokens are all computed gets one row (its last sampled token, still on
     the device) and a page for it; when the pool is short, the latest-admitted running request is preempted (its
     pages go back to the prefix cache; it waits at the front of the queue and is later recomputed from prompt +
     output so far, mostly from cached pages).
  2. running prefills: the next chunk of each partly prefilled prompt, within what is left of
     `max_num_batched_tokens`.
  3. admission: waiting requests in arrival order take a slot, the longest cached prefix of their tokens
     (`PageAllocator.match`) and pages for the first chunk of the rest, while slots, budget and pages last; nothing
     overtakes the head of the queue.
  The rows go to the engine as one step (asynchronous); the full pages they complete are registered in the prefix
  cache at once, so a request admitted later in the same step (another sample of the same prompt, say) reuses them.
  Then the *previous* step's tokens are absorbed: the device runs one step ahead of the host, so copying tokens back
  and detokenizing never leave it idle, and a new request is admitted at every step.
Absorbing applies EOS / stop ids / stop strings / max_tokens, streams each token's text to `on_update`, and frees a
finished request's slot and pages. Tokens computed for a request that has since ended, been preempted or cancelled
are dropped: each in-flight result remembers which admission (epoch) of each request it belongs to.

Data-parallel replicas (an engine on a mesh with a `data` axis of size D): each replica has its own slots, page pool
and prefix cache (`Replica`), and steps 1-3 run for each replica within its own token budget; the replicas' rows go
to the engine as one step. The queue is shared: its head goes to the replica already holding the longest cached
prefix of it (SGLang's cache-aware routing), unless that replica runs more than half a replica's slots beyond the
least loaded one, and otherwise to the least loaded replica (fewest running sequences, then most free pages); a
preempted request may come back on another replica. Followers of a multi-host server replay the same decisions.

n > 1 samples of a prompt are separate requests: the first one's prompt pages are in the prefix cache by the time the
others are admitted (in the same step or later), so each of them computes only the prompt's last partial page.
Requests with repetition / presence / frequency penalties do not take cached prefixes: their token history is built
from the tokens they compute themselves.

Structured outputs: a sample with a constraint carries a grammar matcher, fed each of its tokens as they are absorbed
(its constraint complete, it finishes with "stop" at once). Its next token's mask depends on the token just sampled,
so a step with such a sample splits: the model (`engine.forward`) is dispatched, then the host absorbs the previous
step and computes the masks (llguidance, in parallel, the GIL released) while the device runs the model, then the
sampler (`engine.pick`) gets them; the step then stays in flight like any other. Steps without one pass no mask.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import time
from typing import Any, Callable

import jax
import numpy as np

from jaxllm.sampling import SamplingArrays, SamplingParams
from jaxllm.serving.detokenizer import Detokenizer
from jaxllm.serving.engine import Engine, Row
from jaxllm.serving.page_allocator import PageAllocator, PrefixKeys
from jaxllm.sharding.distributed import host_value
from jaxllm.structured_outputs import GrammarCompiler

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"
log = logging.getLogger("jaxllm.scheduler")


@dataclasses.dataclass(eq=False)
class Request:
  request_id: str
  prompt_ids: list[int]
  params: SamplingParams
  seed: int
  detok: Detokenizer
  sampling: SamplingArrays  # [1] the request's sampling row
  on_update: Callable[["Request", str], None] | None = None  # (request, new text) after each absorbed token
  matcher: Any = None  # structured outputs: the sample's grammar matcher (llguidance), fed every absorbed token
  status: str = WAITING
  output_ids: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  top_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
  # With params.prompt_logprobs: each prompt token's logprob given those before it, its rank (1: the likeliest) and
  # the top-n there (position 0, and positions whose chunk has not been absorbed yet, None); `prompt_scored` counts
  # the positions filled.
  prompt_logprobs: list[float | None] | None = None
  prompt_ranks: list[int | None] | None = None
  prompt_top_logprobs: list[dict[int, float] | None] | None = None
  prompt_scored: int = 0
  finish_reason: str | None = None  # "stop" | "length" | "abort"
  slot: int | None = None
  replica: int | None = None  # the data-parallel replica whose slot and pages it holds while running
  num_preemptions: int = 0
  arrival: int = 0
  max_new: int = 0  # max_tokens capped by max_model_len - prompt length
  epoch: int = 0  # bumped at every admission: in-flight results of an earlier admission are not this one's
  index: int = 0  # which sample of its prompt this is
  # Per admission:
  num_computed: int = 0  # positions whose K/V are written (or will be, by steps already dispatched)
  pending: int = 0  # tokens sampled by dispatched steps, not yet absorbed
  replay_end: int = 0  # prompt + output length at admission: outputs below it are recomputed, not sampled
  num_cached_tokens: int = 0  # positions the prefix cache supplied at the last admission
  # Prompt tokens the prefix cache supplied at the first admission (what an API's usage reports as cached_tokens).
  num_cached_prompt_tokens: int | None = None
  fresh: bool = False  # no step of this admission has run yet
  pages_committed: int = 0  # full pages offered to the prefix cache

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
  def scores_prompt(self) -> bool:
    """Whether prompt positions are still to be scored (such a request computes its prompt from position 0)."""
    return self.prompt_logprobs is not None and self.prompt_scored < len(self.prompt_ids) - 1

  @property
  def num_tokens(self) -> int:
    """Prompt + output tokens, those still in flight included."""
    return len(self.prompt_ids) + len(self.output_ids) + self.pending

  def known(self, start: int, stop: int) -> list[int]:
    """Token ids at positions [start, stop) that the host has (prompt, then absorbed output)."""
    n = len(self.prompt_ids)
    head = self.prompt_ids[start:min(stop, n)]
    return head + self.output_ids[max(start - n, 0):max(stop - n, 0)]


@dataclasses.dataclass(eq=False)
class Replica:
  """One data-parallel replica's share of the engine: its slots, the sequences running in them (in admission order)
  and its pages with their prefix cache."""

  index: int
  allocator: PageAllocator
  slots: list[Request | None]
  running: list[Request] = dataclasses.field(default_factory=list)

  def load(self) -> tuple[int, int]:
    """Least loaded first: fewer running sequences, then more free pages."""
    return len(self.running), -self.allocator.num_free


class Scheduler:

  def __init__(self, engine: Engine, tokenizer=None, eos_ids: tuple[int, ...] = (), seed: int = 0):
    self.engine = engine
    self.config = engine.config
    self.tokenizer = tokenizer
    self.eos_ids = tuple(eos_ids)
    self.vocab_size = engine.model_config.vocab_size
    self.replicas = [Replica(index=k, slots=[None] * self.config.max_num_seqs,
                             allocator=PageAllocator(engine.num_pages, self.config.page_size,
                                                     enable_prefix_caching=self.config.enable_prefix_caching))
                     for k in range(engine.num_replicas)]
    self.state = engine.init_state()
    self.waiting: collections.deque[Request] = collections.deque()
    self.requests: dict[str, Request] = {}
    self._inflight: collections.deque = collections.deque()  # (device result, [(request, row, epoch, sampled)])
    self._registered: list[tuple[PageAllocator, list[int]]] = []  # pages this step offered to the prefix cache
    self._rng = np.random.default_rng(seed)
    self._ids = itertools.count()
    self.num_steps = 0
    self.num_preemptions = 0
    self.num_prompt_tokens_computed = 0  # prompt (and recomputed) tokens run through the model
    # vLLM's prefix_cache_queries / prefix_cache_hits: tokens of newly admitted requests (re-admissions after a
    # preemption are not counted), and those the cache supplied.
    self.prefix_cache_queries = 0
    self.prefix_cache_hits = 0
    self.grammars = GrammarCompiler(tokenizer, self.vocab_size, self.eos_ids)
    self.num_guided_steps = 0  # steps that sampled a structured-output row (model and sampler dispatched apart)
    self.mask_seconds = 0.0  # host time spent computing their masks

  @property
  def running(self) -> list[Request]:
    """Every replica's running sequences."""
    return [r for rep in self.replicas for r in rep.running]

  @property
  def num_running(self) -> int:
    return sum(len(rep.running) for rep in self.replicas)

  @property
  def num_slots(self) -> int:
    """Sequences that can run at once: max_num_seqs per replica."""
    return self.config.max_num_seqs * len(self.replicas)

  def num_pages_held(self) -> int:
    """KV pages held by sequences, over every replica (cached pages held by nobody are not)."""
    return sum(rep.allocator.capacity - rep.allocator.num_free for rep in self.replicas)

  def check_pages(self) -> None:
    """Asserts every replica's page accounting (`PageAllocator.check`)."""
    for rep in self.replicas:
      rep.allocator.check()

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
    alloc = self.replicas[0].allocator
    if alloc.pages_for(len(ids) + 1) > alloc.capacity:
      raise ValueError(f"the prompt needs more KV pages than the cache has ({alloc.capacity}).")
    params.check_vocab(self.vocab_size)
    for name in ("logprobs", "prompt_logprobs"):
      if (getattr(params, name) or 0) > self.config.num_top_logprobs:
        raise ValueError(f"{name}={getattr(params, name)} exceeds the engine's num_top_logprobs="
                         f"{self.config.num_top_logprobs}.")
    return ids

  def add(self, prompt_ids, params: SamplingParams, *, request_id: str | None = None,
          on_update: Callable | None = None, seed: int | None = None) -> Request:
    """One sequence (params.n must be 1; see `add_samples`)."""
    if params.n != 1:
      raise ValueError(f"add() runs one sequence; use add_samples() for n={params.n} samples of a prompt.")
    ids = self.validate(prompt_ids, params)
    matcher = None if params.structured_outputs is None else self.grammars.compile(params.structured_outputs)
    req = self._add(ids, params, request_id, on_update, seed)
    req.matcher = matcher
    return req

  def add_samples(self, prompt_ids, params: SamplingParams, *, request_id: str | None = None,
                  on_update: Callable | None = None, seeds: list[int] | None = None,
                  grammar=None) -> list[Request]:
    """params.n samples of one prompt, ids `{request_id}/{k}`; `seeds[k]` (or fresh ones) seed sample k. With prefix
    caching on, the prompt's full pages are computed once and shared. `grammar`: the matcher
    `self.grammars.compile(params.structured_outputs)` made (compiled here when not given)."""
    ids = self.validate(prompt_ids, params)
    if params.structured_outputs is not None and grammar is None:
      grammar = self.grammars.compile(params.structured_outputs)
    if seeds is not None and len(seeds) != params.n:
      raise ValueError(f"seeds has {len(seeds)} entries for n={params.n} samples.")
    base = request_id if request_id is not None else f"req-{next(self._ids)}"
    if any(f"{base}/{k}" in self.requests for k in range(params.n)):
      raise ValueError(f"request_id {base!r} is already in use.")
    out = []
    for k in range(params.n):
      r = self._add(ids, params, f"{base}/{k}", on_update, None if seeds is None else seeds[k])
      r.index = k
      r.matcher = None if grammar is None else grammar.deep_copy()
      out.append(r)
    return out

  def _add(self, ids, params, request_id, on_update, seed) -> Request:
    request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
    if request_id in self.requests:
      raise ValueError(f"request_id {request_id!r} is already in use.")
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_ids))
    if seed is None:
      seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**32))
    sampling = SamplingArrays.from_params([params], [seed], [tuple(stop_ids)], [len(ids) + params.min_tokens])
    req = Request(request_id=request_id, prompt_ids=ids, params=params, seed=seed, sampling=sampling,
                  detok=Detokenizer(self.tokenizer, frozenset(stop_ids), params.stop, stream=on_update is not None,
                                    min_tokens=params.min_tokens),
                  on_update=on_update, arrival=next(self._ids))
    req.max_new = min(params.max_tokens, self.config.max_model_len - len(ids))
    if params.prompt_logprobs is not None:
      req.prompt_logprobs, req.prompt_ranks, req.prompt_top_logprobs = [None] * len(ids), [None] * len(ids), \
          [None] * len(ids)
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
    return bool(self.waiting) or self.num_running > 0 or bool(self._inflight)

  # ------------------------------------------------------------------ the loop
  def step(self) -> None:
    scheduled: dict[Request, Row] = {}
    self._registered = []
    try:
      keep = self._dispatch(self._schedule(scheduled))
    except BaseException:
      self._roll_back(scheduled)
      raise
    while len(self._inflight) > keep:
      self._absorb(*self._inflight.popleft())

  def _dispatch(self, rows: list[tuple[Request, Row]]) -> int:
    """Builds and dispatches the step of `rows` (the model, then the sampler); the number of steps to leave in flight
    (1 when one was dispatched: it runs while the host reads everything older)."""
    keep = 0
    if rows:
      layout = self.engine.row_places([row for _, row in rows])
      batch, places = self.engine.build([row for _, row in rows], layout), layout[2]
      guided = [(r, i) for (r, row), (i, _) in zip(rows, places) if r.matcher is not None and row.sample]
      self.state, h_SD, h_TD = self.engine.forward(self.state, batch)
      targets, scored = self._prompt_targets(rows, places, h_TD.shape[0])
      scores = (self.engine.prompt_logprobs(h_TD, targets), scored) if scored else None
      del h_TD
      mask = None
      if guided:
        # A structured-output row's mask needs the token the previous step sampled for it: the model runs while
        # the host absorbs that step and computes the masks, then the sampler gets them.
        while self._inflight:
          self._absorb(*self._inflight.popleft())
        mask = self._masks(guided, h_SD.shape[0])
      self.state, result = self.engine.pick(self.state, h_SD, batch.seqs, mask)
      self._inflight.append((result, [(r, i, r.epoch, row.sample) for (r, row), (i, _) in zip(rows, places)], scores))
      self.num_steps += 1
      keep = 1
    return keep

  def _roll_back(self, scheduled: dict[Request, Row]) -> None:
    """Undoes a step that raised before it was dispatched (an error or a Ctrl-C while a new bucket compiles): its
    requests' bookkeeping already counts positions the model never wrote, and the full pages it offered to the prefix
    cache hold nothing yet. Each of its requests is preempted (its pages freed; re-admission recomputes what the cache
    does not hold), then those pages are unregistered, so no later request reads them as cached."""
    for req in reversed(list(scheduled)):  # preemption puts each back at the queue's head: the step's order is kept
      if req.status == RUNNING:
        self._preempt(req)
    for alloc, pages in self._registered:
      alloc.forget(pages)
    self._registered = []

  @staticmethod
  def _prompt_targets(rows: list[tuple[Request, Row]], places, num_rows: int):
    """For the step's rows of requests scoring their prompt: the token each row predicts (the prompt token after
    the row's position; -1 elsewhere) and [(request, first step row, first position, count)]."""
    targets, scored = None, []
    for (req, row), (_, t) in zip(rows, places):
      lo, hi = row.start, min(row.start + len(row.tokens), len(req.prompt_ids) - 1)
      if req.scores_prompt and hi > lo:
        if targets is None:
          targets = np.full((num_rows,), -1, np.int32)
        targets[t:t + hi - lo] = req.prompt_ids[lo + 1:hi + 1]
        scored.append((req, t, lo, hi - lo))
    return targets, scored

  def _masks(self, guided: list[tuple[Request, int]], num_rows: int) -> np.ndarray:
    """The step's structured-output bitmask (rows of requests that ended meanwhile allow everything). Should the
    grammar engine fail, the constrained requests end ("abort") and the step goes on: one bad constraint must not
    stop the engine for everyone."""
    start = time.perf_counter()
    live = [(r, i) for r, i in guided if r.status == RUNNING]
    try:
      mask = self.grammars.fill_masks([(r.matcher, i) for r, i in live], num_rows)
    except Exception:  # noqa: BLE001 - reported, and confined to the requests that asked for constraints
      log.exception("computing structured-output masks failed; ending the %d constrained requests", len(live))
      for r, _ in live:
        self._finish(r, "abort")
      mask = self.engine.full_bitmask(num_rows)
    self.mask_seconds += time.perf_counter() - start
    self.num_guided_steps += 1
    return mask

  def run_until_done(self) -> None:
    while self.has_work():
      self.step()

  # ------------------------------------------------------------------ scheduling
  def _schedule(self, scheduled: dict) -> list[tuple[Request, Row]]:
    # `scheduled`: request -> its row, built (and its full pages offered to the prefix cache) as soon as it is
    # scheduled, so a request admitted after it in this step can reuse those pages (insertion order: decodes first);
    # the caller's dict, so a step that fails half-way can be rolled back.
    budgets = [self._schedule_running(rep, scheduled) for rep in self.replicas]
    # 3. admissions, in arrival order, to the replicas with a slot and budget left (none to one that had to preempt
    # in this step: its pool is short); nothing overtakes the head of the queue.
    C = self.config.page_size
    while self.waiting:
      open_ = [rep for rep, budget in zip(self.replicas, budgets)
               if budget > 0 and len(rep.running) < self.config.max_num_seqs]
      if not open_:
        break
      req = self.waiting[0]
      tokens = req.prompt_ids + req.output_ids
      cacheable = not (req.params.uses_penalties or req.scores_prompt)
      keys = PrefixKeys(tokens, C)  # hashed once, as far as the replicas' caches read
      hits = {rep: rep.allocator.match(keys) if cacheable else [] for rep in open_}
      for rep in self._placements(open_, hits):
        hit, budget = hits[rep], budgets[rep.index]
        n = min(len(tokens) - len(hit) * C, budget)
        if rep.allocator.allocate(req.request_id, len(hit) * C + n, hit):
          break
      else:
        break
      self.waiting.popleft()
      first = req.num_cached_prompt_tokens is None  # a re-admission after preemption is not a new query (as vLLM)
      self._seat(req, rep, len(hit) * C, len(tokens))
      if rep.allocator.enable_prefix_caching and first:
        self.prefix_cache_queries += len(tokens)
        self.prefix_cache_hits += len(hit) * C
      scheduled[req] = self._row(req, n)
      budgets[rep.index] -= n
    return list(scheduled.items())

  def _placements(self, open_: list[Replica], hits: dict[Replica, list[int]]) -> list[Replica]:
    """The replicas to try for the head of the queue, best first: the one with the longest cached prefix of it unless
    it runs more than half a replica's slots beyond the least loaded, then the least loaded."""
    by_load = sorted(open_, key=lambda rep: (rep.load(), rep.index))
    best = max(by_load, key=lambda rep: len(hits[rep]))  # the least loaded among the longest hits
    if hits[best] and len(best.running) - len(by_load[0].running) <= self.config.max_num_seqs // 2:
      by_load.remove(best)
      by_load.insert(0, best)
    return by_load

  def _schedule_running(self, rep: Replica, scheduled: dict[Request, Row]) -> int:
    """Steps 1 and 2 for one replica: its decodes, then its running prefills, preempting its latest-admitted running
    request while its pool is short. Returns the token budget left for admissions (0 after a preemption)."""
    budget = self.config.max_num_batched_tokens
    preempted = False
    for decoding in (True, False):  # a decode never waits behind a prompt chunk
      for req in list(rep.running):
        if req.status != RUNNING or req in scheduled:
          continue
        remaining = req.num_tokens - req.num_computed
        if (remaining == 1) != decoding or remaining == 0 or len(req.output_ids) + req.pending >= req.max_new:
          continue
        n = min(remaining, budget)
        if n == 0:
          break
        while not rep.allocator.ensure(req.request_id, req.num_computed + n):
          victim = rep.running[-1]  # never one whose prefill chunk is already scheduled: those are older
          dropped = scheduled.pop(victim, None)
          budget += len(dropped.tokens) if dropped else 0
          self._preempt(victim)
          preempted = True
          if victim is req:
            break
        if req.status == RUNNING:
          scheduled[req] = self._row(req, n)
          budget -= n
    return 0 if preempted else budget

  def _row(self, req: Request, n: int) -> Row:
    """req's next n positions as a step row; advances its bookkeeping as if the step had run (it will have, before
    any later step reads its pages)."""
    start, stop = req.num_computed, req.num_computed + n
    tokens = req.known(start, stop)
    assert n - len(tokens) <= 1, "only the latest sampled token can be unknown to the host"
    tokens += [None] * (n - len(tokens))  # the last sampled token, still on the device
    sample = stop == req.num_tokens
    alloc = self.replicas[req.replica].allocator
    row = Row(slot=req.slot, start=start, tokens=tokens, pages=alloc.pages(req.request_id), sampling=req.sampling,
              sample=sample, prompt_len=len(req.prompt_ids), replay_end=req.replay_end, reset=req.fresh,
              replica=req.replica)
    req.fresh = False
    req.num_computed = stop
    req.pending += sample
    if start < req.replay_end:
      self.num_prompt_tokens_computed += min(stop, req.replay_end) - start
    full = min(len(req.prompt_ids) + len(req.output_ids), stop) // self.config.page_size
    if full > req.pages_committed:  # full pages whose tokens the host knows: into the prefix cache
      self._registered.append((alloc, alloc.commit(req.request_id, req.known(0, full * self.config.page_size), stop)))
      req.pages_committed = full
    return row

  def _seat(self, req: Request, rep: Replica, num_cached: int, num_tokens: int) -> None:
    slot = rep.slots.index(None)
    req.status, req.slot, req.replica = RUNNING, slot, rep.index
    req.epoch += 1
    req.num_computed, req.pending, req.replay_end = num_cached, 0, num_tokens
    req.num_cached_tokens, req.fresh = num_cached, True
    if req.num_cached_prompt_tokens is None:
      req.num_cached_prompt_tokens = min(num_cached, len(req.prompt_ids))
    req.pages_committed = num_cached // self.config.page_size
    rep.slots[slot] = req
    rep.running.append(req)

  def _preempt(self, req: Request) -> None:
    self._free_slot(req)
    req.status = WAITING
    req.num_preemptions += 1
    self.num_preemptions += 1
    self.waiting.appendleft(req)

  # ------------------------------------------------------------------ results
  def _absorb(self, result, holders: list[tuple[Request, int, int, bool]], scores=None) -> None:
    if scores is not None:  # before the tokens: a request's last token finds its prompt's logprobs complete
      self._take_prompt_scores(*scores)
    if not any(sampled for *_, sampled in holders):
      return
    host = jax.tree.map(host_value, result)
    for req, row, epoch, sampled in holders:
      if not sampled or req.status != RUNNING or req.epoch != epoch:
        continue  # a chunk that samples nothing, or ended / preempted / re-admitted since dispatch
      req.pending -= 1
      self._take(req, int(host.tokens[row]), float(host.logprobs[row]),
                 (host.top_ids[row], host.top_logprobs[row]))

  @staticmethod
  def _take_prompt_scores(result, scored) -> None:
    chosen, ranks, top_ids, top_lp = (host_value(x) for x in result)
    for req, t, start, count in scored:
      if req.finished:
        continue
      n_top = req.params.prompt_logprobs
      for k in range(count):  # position start + k predicts the prompt token at start + k + 1
        p = start + k + 1
        req.prompt_scored += req.prompt_logprobs[p] is None  # a recomputed chunk (after preemption) refills it
        req.prompt_logprobs[p], req.prompt_ranks[p] = float(chosen[t + k]), int(ranks[t + k])
        req.prompt_top_logprobs[p] = {int(a): float(b) for a, b in zip(top_ids[t + k, :n_top], top_lp[t + k, :n_top])}

  def _take(self, req: Request, tok: int, lp: float, tops) -> None:
    req.output_ids.append(tok)
    req.logprobs.append(lp)
    if req.params.logprobs is not None:
      n_top = req.params.logprobs
      # Under a structured-output mask, tokens it refused have logprob -inf: they are no alternatives (and -inf is
      # not JSON), so fewer than n may be listed.
      req.top_logprobs.append({int(a): float(b) for a, b in zip(tops[0][:n_top], tops[1][:n_top]) if b > -np.inf})
    delta = req.detok.add(tok)
    grammar_done = False
    if req.matcher is not None:
      if not req.matcher.consume_token(tok):  # the grammar ran out of its limits (or refused what it allowed)
        log.warning("request %s: its structured-output constraint failed at token %d: %s", req.request_id, tok,
                    req.matcher.get_error()[:500])
        self._finish(req, "abort", delta)
        return
      grammar_done = req.matcher.is_stopped()  # the constraint is complete: nothing but EOS could follow
    if not req.detok.finished and (grammar_done or len(req.output_ids) >= req.max_new):
      delta += req.detok.flush()
    if req.detok.finished or grammar_done:
      reason = "stop" if req.detok.stop_reason is not None or grammar_done else "length"
      self._finish(req, reason, delta)
    elif req.on_update is not None:
      req.on_update(req, delta)

  def _finish(self, req: Request, reason: str, delta: str = "") -> None:
    if req.slot is not None:
      self._free_slot(req)
    req.status, req.finish_reason = FINISHED, reason
    self.requests.pop(req.request_id, None)  # the caller holds the Request; the scheduler forgets it
    if reason == "abort":
      delta += req.detok.flush()
    if req.on_update is not None:
      req.on_update(req, delta)

  def _free_slot(self, req: Request) -> None:
    rep = self.replicas[req.replica]
    rep.slots[req.slot] = None
    rep.running.remove(req)
    req.slot = req.replica = None
    req.pending = 0
    rep.allocator.free(req.request_id)
