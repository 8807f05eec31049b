"""`jaxllm serve` / `python -m jaxllm.serving.server`: an OpenAI-compatible HTTP server over the engine.

    jaxllm serve --model default --port 8000 --max_num_seqs 32
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'

Data flow: aiohttp handlers (one event loop) parse and validate a request (`serving.protocol`), tokenize it (JSON
parsing, chat templates and tokenization run on a pool of text workers, so a huge body never stalls the loop), and
submit it to the `EngineLoop`, whose own thread runs the continuous-batching scheduler; the scheduler's text deltas
come back to the handler on the event loop, which answers with one JSON body or streams server-sent events ending in
`data: [DONE]`. A client that disconnects has its request cancelled (its pages are freed). `GET /health` is 503 until
the model is loaded and warmed up (the port is open from the start, so a load balancer sees "not ready", not
"refused"), and again while draining after SIGTERM, when in-flight requests finish before the process exits.

Errors are OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`: 400 for a malformed or invalid request
(including a prompt longer than max_model_len and a body nested too deeply), 401 for a wrong API key (with --api_key,
/v1/, /tokenize and /detokenize need it), 404 for an unknown model, 503 when the
waiting queue is full or the server is not ready.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import gc
import hmac
import json
import logging
import os
import re
import signal
import threading
import time
import types
import uuid
from http import HTTPStatus
from typing import Callable

import numpy as np
from aiohttp import web, web_protocol
from pydantic import ValidationError

from jaxllm import tool_calls
from jaxllm.sampling import SamplingParams
from jaxllm.tokenizer_process import TokenizerProcessDied
from jaxllm.serving import multihost, protocol
from jaxllm.serving.config import EngineConfig
from jaxllm.serving.engine_loop import EngineLoop, EngineStopped, RequestStream

log = logging.getLogger("jaxllm.serve")
SERVER = web.AppKey("server", object)
BULK_BODY = 1 << 20  # bodies of this many bytes and more are a bulk request: their text work runs on the bulk workers
_BULK = contextvars.ContextVar("jaxllm_bulk", default=False)  # set by `_body` for the handler's task
_request_key = getattr(web, "RequestKey", lambda name, _: name)  # typed keys from aiohttp 3.12 (plain str before)
OPEN_SSE = _request_key("jaxllm.sse", object)  # request key: its event stream, once the response has started
# request key: the RequestStreams a request submitted (cancelled if its client goes away)
STREAMS = _request_key("jaxllm.streams", list)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerConfig:
  model: str = "default"
  served_model_name: str | None = None
  tokenizer: str | None = None
  host: str = "127.0.0.1"
  port: int = 8000
  dtype: str = "auto"
  quantization: str | None = "auto"  # LLM's: "auto", None (float), "int8" / "q8_0" (weight-only int8)
  engine: EngineConfig = EngineConfig()
  max_waiting: int = 1024  # sequences (prompts x n) queued for a slot beyond which a request gets 503
  max_stop_strings: int = 64  # stop strings per request (each is searched for after every token, on the engine thread)
  max_stop_chars: int = 4096  # their total length
  # Connections: beyond max_connections a new one is answered 503 and closed (None: the open-file limit minus 256); a
  # connection with no request in progress (idle, or still sending its request line and headers) is closed after
  # timeout_keep_alive seconds; a request's body must arrive within body_timeout; SIGTERM waits drain_timeout for
  # in-flight requests, then cancels what is left.
  max_connections: int | None = None
  timeout_keep_alive: float = 5.0
  body_timeout: float = 30.0
  drain_timeout: float = 60.0
  api_key: str | None = None
  warmup: bool = True
  seed: int = 0

  def __post_init__(self):
    if self.max_connections is not None and self.max_connections < 1:
      raise ValueError(f"max_connections={self.max_connections} must be at least 1.")
    for name in ("timeout_keep_alive", "body_timeout", "drain_timeout"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name}={getattr(self, name)} must be a positive number of seconds.")


class APIError(Exception):

  def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param = status, message, type_, param

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}

  def response(self) -> web.Response:
    body = self.body()
    headers = {"Retry-After": "1"} if self.status == 503 else None  # overloaded or starting: clients back off, retry
    return web.json_response(body, status=self.status, headers=headers)


class Metrics:
  """Prometheus metrics of one server (own registry, so several servers in one process do not collide)."""

  def __init__(self, server: "Server"):
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    self.registry = r = CollectorRegistry()
    p = "jaxllm_"
    self.requests = Counter(p + "requests", "Requests answered, by endpoint and status.", ["endpoint", "status"],
                            registry=r)
    self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
    self.generation_tokens = Counter(p + "generation_tokens", "Generated tokens.", registry=r)
    self.ttft = Histogram(p + "time_to_first_token_seconds", "Arrival to first generated token.", registry=r,
                          buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
    self.tpot = Histogram(p + "time_per_output_token_seconds", "Mean time per generated token after the first.",
                          registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))
    self.step = Histogram(p + "engine_step_seconds", "Wall time of one engine step (the period at which every running "
                          "sequence gets a token).", registry=r,
                          buckets=(.005, .01, .025, .05, .075, .1, .125, .15, .2, .25, .3, .4, .5, .6, .8, 1, 1.5, 2,
                                   5, 10))
    g = lambda name, doc, fn: Gauge(p + name, doc, registry=r).set_function(fn)  # noqa: E731
    g("num_requests_waiting", "Sequences (prompts x n) queued for a slot, counted from their admission.",
      lambda: server.loop.queued if server.loop else 0)
    g("num_requests_running", "Requests holding a slot.", lambda: server.loop.num_running if server.loop else 0)
    g("open_connections", "Open HTTP connections (--max_connections bounds them).", lambda: len(server.connections()))
    g("num_preemptions", "Requests preempted so far (recomputed later).",
      lambda: server.loop.scheduler.num_preemptions if server.loop else 0)
    r.register(_SchedulerCounters(server, p))
    r.register(_PageGauges(server, p))

  def render(self) -> bytes:
    from prometheus_client import generate_latest

    return generate_latest(self.registry)


class _SchedulerCounters:
  """The scheduler's running totals as Prometheus counters (read at scrape time): vLLM's prefix_cache_queries /
  prefix_cache_hits (prompt tokens of admitted requests, and those the prefix cache supplied)."""

  COUNTERS = (("prefix_cache_queries", "Prompt tokens of admitted requests, looked up in the prefix cache."),
              ("prefix_cache_hits", "Prompt tokens the prefix cache supplied (not computed)."))

  def __init__(self, server: "Server", prefix: str):
    self.server, self.prefix = server, prefix

  def collect(self):
    from prometheus_client.core import CounterMetricFamily

    sched = self.server.loop.scheduler if self.server.loop is not None else None
    for name, doc in self.COUNTERS:
      yield CounterMetricFamily(self.prefix + name, doc, value=getattr(sched, name, 0))


class _PageGauges:
  """The KV pages of each data-parallel replica (label `replica`; one series without replicas), read at scrape time."""

  GAUGES = (("kv_pages_used", "KV-cache pages held by sequences.", lambda a: a.capacity - a.num_free),
            ("kv_pages_total", "KV-cache pages (scratch page excluded).", lambda a: a.capacity),
            ("kv_pages_cached", "KV-cache pages held by no request, kept for prefix-cache hits (evicted when needed).",
             lambda a: a.num_cached))

  def __init__(self, server: "Server", prefix: str):
    self.server, self.prefix = server, prefix

  def collect(self):
    from prometheus_client.core import GaugeMetricFamily

    replicas = self.server.loop.scheduler.replicas if self.server.loop is not None else []
    for name, doc, value in self.GAUGES:
      family = GaugeMetricFamily(self.prefix + name, doc, labels=["replica"])
      for rep in replicas:
        family.add_metric([str(rep.index)], value(rep.allocator))
      yield family


TOKENIZER_NICE = 10  # the tokenizer process's nice value: a tenth of a core's share beside a busy engine thread
LIST_MAX = 1 << 18  # token ids beyond which a prompt stays an int32 array (it is over any max_model_len served here,
# and building / freeing a list of millions of ints holds the GIL for ~100 ms): only its length is read, for the 400


def _as_ids(ids: np.ndarray):
  """`Tokenizer.encode_array`'s ids as the list the scheduler takes, unless there are too many to be a prompt."""
  return ids.tolist() if len(ids) <= LIST_MAX else ids


def load_llm(c: ServerConfig, mesh=None, layout: str = "tp"):
  """The server's `LLM` (every process of a multi-process server loads the same one)."""
  from jaxllm import LLM

  llm = LLM(c.model, dtype=c.dtype, quantization=c.quantization, tokenizer=c.tokenizer, seed=c.seed, mesh=mesh,
            layout=layout, engine_config=c.engine)
  if llm.tokenizer is None:
    raise ValueError(f"{c.model} has no tokenizer; pass --tokenizer.")
  return llm


class Server:
  """The model, tokenizer and engine loop behind the HTTP handlers. `load()` runs off the event loop."""

  def __init__(self, config: ServerConfig, mesh=None, layout: str = "tp"):
    self.config = config
    self.mesh, self.layout = mesh, layout
    self.loop: EngineLoop | None = None
    self.tokenizer = None
    self.model_name = config.served_model_name or config.model
    self.state = "loading"  # -> "warming up" -> "ready" -> "draining"; "stopped" if signalled before ready
    self.load_thread: threading.Thread | None = None
    self.connections = lambda: []  # the open HTTP connections' handlers, once `serve` listens
    self.load_error: str | None = None
    self.channel = None  # a multi-process server's channel to the other processes (`multihost.Channel`)
    self._lost_error: BaseException | None = None
    self._abort_load: Callable[[], None] | None = None  # set by `serve`: ends its wait for `load`
    self.metrics = Metrics(self)
    self._rng = np.random.default_rng(config.seed)
    # Text work (JSON parsing, chat templates, tokenization) runs on the text workers, never on the event loop: a
    # 4 MB prompt must not stall every stream and /health while it is tokenized. Long texts are encoded by the
    # tokenizer's own process (`Tokenizer.run_in_process`), at a lower CPU priority: on a machine whose cores the
    # engine keeps busy, a huge prompt's tokenization takes the time the engine and the event loop leave, and its
    # millions of ids never become Python objects here (seen: a 60 ms GIL hold to build the list, 30 ms to free it).
    # The text workers keep the normal priority because they hold the GIL: a low-priority thread holding it would
    # make everyone wait on its small share of the CPU.
    # A request whose body is a megabyte or more (`BULK_BODY`) does its text work on the bulk workers instead, so a few
    # multi-megabyte bodies (seconds each) never take every text worker from the ordinary requests behind them.
    workers = os.cpu_count() or 2
    self.text_workers = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="jaxllm-text")
    self.bulk_workers = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="jaxllm-bulk")

  async def off_loop(self, fn, *args):
    """fn(*args) on the text workers (the bulk workers for a request with a bulk body); its exceptions propagate to
    the awaiting handler."""
    workers = self.bulk_workers if _BULK.get() else self.text_workers
    return await asyncio.get_running_loop().run_in_executor(workers, fn, *args)

  def load(self) -> None:
    c = self.config
    try:
      # Several processes: connected to the others before anything slow, so one that fails to load (or dies) is
      # noticed at once rather than at a collective's timeout; each iteration of the engine loop goes to them first.
      self.channel = multihost.Channel(on_lost=self._lost) if multihost.process_count() > 1 else None
      llm = load_llm(c, self.mesh, self.layout)
      self.llm, self.tokenizer, self.max_model_len = llm, llm.tokenizer, llm.max_model_len
      # Short texts are encoded on the text worker that asks (the library's own thread pool is off: no threads
      # beside those the server sizes); long ones in the tokenizer process.
      os.environ["TOKENIZERS_PARALLELISM"] = "false"
      llm.tokenizer.run_in_process(TOKENIZER_NICE)
      # The tool-call syntax of the template that renders requests with tools (a "tool_use" one if there is one).
      self.tool_format = tool_calls.tool_format(llm.tokenizer.chat_templates.get("tool_use",
                                                                                llm.tokenizer.chat_template))
      if c.warmup:
        self.state = "warming up"
        llm.warmup()
      if self.state == "stopped":  # SIGTERM arrived meanwhile: `serve` has returned
        return
      # Several processes: ready once every one is (they load and warm up the same programs).
      multihost.ready_barrier("jaxllm serve: every process loaded")
      if self.state == "failed":  # another process died meanwhile (`_lost`)
        return
      # Everything loaded so far (jax, the model, compiled programs: ~10^6 objects) lives as long as the server: move
      # it out of the collector's sight, or every full collection walks it all with the GIL held (100-220 ms seen,
      # a stall of every stream and /health).
      gc.collect()
      gc.freeze()
      self.loop = EngineLoop(llm.scheduler, max_waiting=c.max_waiting, channel=self.channel)
      self.loop.on_step = self.metrics.step.observe
      self.loop.start()
      if self._lost_error is not None:  # a process died before the loop existed
        self.loop.fail(self._lost_error)
      self.state = "ready"
      log.info("ready: %r", llm)
    except Exception as e:  # noqa: BLE001 - reported by /health and the log, the process stays up to say so
      self.state, self.load_error = "failed", f"{type(e).__name__}: {e}"
      log.error("loading %s failed: %s", c.model, self.load_error)

  def _lost(self, process_id: int) -> None:
    """A multi-process server's process `process_id` died: the engine cannot step any more (on a watcher thread).
    Before the engine loop exists (the others are still loading, or this one waits for them), the load has failed:
    `serve` stops waiting for it."""
    self._lost_error = RuntimeError(f"process {process_id} of this multi-process server is gone")
    if self.loop is not None:
      self.loop.fail(self._lost_error)
    elif self.state in ("loading", "warming up"):
      self.state, self.load_error = "failed", f"{self._lost_error} (while loading)"
      log.error("%s", self.load_error)
      if self._abort_load is not None:
        self._abort_load()

  def seeds(self, seed: int | None, n: int) -> list[int]:
    base = seed if seed is not None else int(self._rng.integers(0, 2**63 - 1))
    return [int(np.random.SeedSequence([base, k]).generate_state(1)[0]) for k in range(n)]


# -------------------------------------------------------------------------------------------------------- handlers
async def _body(request: web.Request, schema):
  """The request body parsed and validated against `schema` on the text workers (a multi-megabyte body is tens of
  milliseconds of GIL-holding work the event loop must not do); a bad body is a 400 naming what is wrong."""
  server = request.app[SERVER]
  try:
    raw_body = await asyncio.wait_for(request.read(), server.config.body_timeout)
  except asyncio.TimeoutError:
    raise APIError(408, f"the request body did not arrive within {server.config.body_timeout:g} s "
                        "(--body_timeout).") from None
  _BULK.set(len(raw_body) >= BULK_BODY)  # for this handler's task only
  return await server.off_loop(_parse_body, raw_body, schema)


def _parse_body(raw_body: bytes, schema):
  try:
    data = json.loads(raw_body)
  except RecursionError:
    raise APIError(400, "the request body is nested too deeply.") from None
  except ValueError as e:  # not JSON, not UTF-8, or an integer past Python's 4,300-digit conversion limit
    raise APIError(400, f"the request body is not valid JSON: {e}") from None
  if not isinstance(data, dict):
    raise APIError(400, "the request body must be a JSON object.")
  if _SURROGATE_ESCAPE.search(raw_body):
    bad = _lone_surrogate_path(data)
    if bad is not None:
      raise APIError(400, f"{bad or 'the body'}: a string holds a lone UTF-16 surrogate (\\ud800-\\udfff escape "
                     "not part of a pair), which is not text.", param=bad or None)
  try:
    return schema.model_validate(data)
  except ValidationError as e:
    first = e.errors()[0]
    where = ".".join(str(x) for x in first["loc"]) or None
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, ValueError):  # our validators' own messages, without pydantic's "Value error, " prefix
      field = getattr(cause, "field", None)
      where = ".".join(x for x in (where, field) if x) or None
      msg = str(cause) if field or not where else f"{where}: {cause}"
      raise APIError(400, msg, param=where) from None
    raise APIError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where) from None


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # JSON carries surrogates only as \uXXXX escapes


def _lone_surrogate_path(data) -> str | None:
  """The dotted path of the first string (key or value) in parsed JSON that is not encodable text, else None."""
  stack = [("", data)]
  while stack:
    path, value = stack.pop()
    if isinstance(value, str):
      try:
        value.encode("utf-8")
      except UnicodeEncodeError:
        return path
    elif isinstance(value, dict):
      stack.extend((f"{path}.{k}".lstrip(".") if isinstance(k, str) else path, v) for k, v in value.items())
      stack.extend((path, k) for k in value)
    elif isinstance(value, list):
      stack.extend((f"{path}.{i}".lstrip("."), v) for i, v in enumerate(value))
  return None


async def _tokens_response(server: "Server", ids, **fields) -> web.Response:
  """`{"tokens": ids, **fields}` encoded on the text workers in slices: one json.dumps of a million ids holds the GIL
  for ~100 ms in a single call, which every stream and /health would wait out."""
  def encode() -> bytes:
    step = 1 << 15
    parts = [json.dumps(np.asarray(ids[i:i + step]).tolist())[1:-1] for i in range(0, len(ids), step)]
    rest = json.dumps(fields)[1:-1]
    return f'{{"tokens": [{", ".join(parts)}]{", " if rest else ""}{rest}}}'.encode()

  return web.Response(body=await server.off_loop(encode), content_type="application/json")


def _chat_prompt_ids(tok, messages, add_generation_prompt: bool, tools=None, tool_format=None, specs=()) -> list[int]:
  """The chat template's prompt, tokenized (on the text workers); a message or template error is a 400. With tools,
  the template gets them (`tools=`) and the messages as the tool format writes them."""
  try:
    msgs = [m.template_message() for m in messages]
    if tool_format is not None:
      msgs = tool_format.prompt_messages(msgs, specs)
    text = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tools=tools)
  except ValueError as e:
    raise APIError(400, str(e), param="messages") from None
  except Exception as e:  # noqa: BLE001 - a template that raises (e.g. roles out of order) is the request's fault
    raise APIError(400, f"the chat template could not render these messages: {e}", param="messages") from None
  return _as_ids(tok.encode_array(text, add_bos=False))


def _server(request: web.Request) -> Server:
  server = request.app[SERVER]
  if server.state != "ready":
    raise APIError(503, f"the server is {server.state}; retry when GET /health answers 200.", "service_unavailable")
  if not server.loop.alive:
    raise APIError(503, f"the engine stopped: {server.loop.error!r}", "service_unavailable")
  return server


def _check_model(server: Server, name: str | None) -> None:
  if name is not None and name not in (server.model_name, server.config.model):
    raise APIError(404, f"the model {name!r} does not exist; this server serves {server.model_name!r}.",
                   "not_found_error", "model")


def _constraint_field(req) -> str:
  """The request field a chat / completions request's output constraint came from (for its 400s)."""
  if req.structured_outputs is not None:
    return "structured_outputs"
  return "response_format" if req.response_format not in (None, {"type": "text"}) else "tools"


async def _grammar(server: Server, params: SamplingParams, field: str):
  """The structured-output matcher of params' constraint (None without one), compiled on a text worker: milliseconds
  for a typical schema, up to seconds for a huge one. A constraint llguidance cannot compile is a 400 naming the
  request field it came from."""
  if params.structured_outputs is None:
    return None
  try:
    return await server.off_loop(server.loop.compile_grammar, params)
  except ValueError as e:
    raise APIError(400, str(e), param=field) from None


def _submit(request: web.Request, items, seed, grammar=None) -> list[RequestStream]:
  """Queues the samples of every (prompt ids, params) item of a request, all or none: 503 when the queue cannot take
  them now, 400 for a bad item or more samples than --max_waiting (nothing runs for a refused request). The streams
  live as long as the handler: however it ends (the client gone at any point, even before a stream's headers are
  written, or an error), `errors_and_auth` cancels those not finished."""
  server = request.app[SERVER]
  try:
    streams = server.loop.submit_all(items, request_id=uuid.uuid4().hex, seeds=lambda n: server.seeds(seed, n),
                                     grammar=grammar)
    request[STREAMS] = request.get(STREAMS, []) + streams
    return streams
  except (OverflowError, EngineStopped) as e:  # the queue is full now; the engine takes no more (a drain)
    raise APIError(503, str(e), "service_unavailable") from None
  except ValueError as e:
    raise APIError(400, str(e)) from None


def _max_tokens(server: Server, prompt_len: int, asked: int | None) -> int:
  room = server.max_model_len - prompt_len
  if room < 1:
    raise APIError(400, f"the prompt has {prompt_len} tokens; this model's max_model_len is {server.max_model_len}, "
                   "which must leave room for at least one generated token.", param="prompt")
  if asked is None:
    return room
  if asked < 1:
    raise APIError(400, f"max_tokens={asked} must be at least 1.", param="max_tokens")
  if asked > room:
    raise APIError(400, f"max_tokens={asked} plus the prompt's {prompt_len} tokens exceed max_model_len="
                   f"{server.max_model_len}; ask for at most {room}.", param="max_tokens")
  return asked


def _sampling(server, req, prompt_len, max_tokens, logprobs):
  try:
    params = req.sampling_params(_max_tokens(server, prompt_len, max_tokens), logprobs)
  except ValueError as e:
    raise APIError(400, str(e), param=getattr(e, "field", None)) from None
  if params.prompt_logprobs is not None and req.stream:
    raise APIError(400, "prompt_logprobs is not supported with stream: true.", param="prompt_logprobs")
  stops = [params.stop] if isinstance(params.stop, str) else list(params.stop or ())
  c = server.config
  if len(stops) > c.max_stop_strings or sum(map(len, stops)) > c.max_stop_chars:
    raise APIError(400, f"stop: {len(stops)} strings of {sum(map(len, stops))} characters; this server takes at most "
                   f"{c.max_stop_strings} strings of {c.max_stop_chars} characters in all (--max_stop_strings, "
                   "--max_stop_chars).", param="stop")
  return params


def _prompt_logprobs(tok, ids: list[int], r, num_top: int) -> list:
  """vLLM's `prompt_logprobs` of a finished sample: None for the first prompt token, then {token id: {"logprob",
  "rank", "decoded_token"}} holding the prompt token itself and the num_top likeliest tokens there."""
  out = [None]
  for p in range(1, len(ids)):
    entry = {str(ids[p]): {"logprob": r.prompt_logprobs[p], "rank": r.prompt_ranks[p],
                           "decoded_token": tok.decode([ids[p]])}}
    for rank, (t, lp) in enumerate(list(r.prompt_top_logprobs[p].items())[:num_top], 1):
      entry.setdefault(str(t), {"logprob": lp, "rank": rank, "decoded_token": tok.decode([t])})
    out.append(entry)
  return out


def _usage(prompt_tokens: int, completion_tokens: int, streams=()) -> dict:
  """OpenAI's usage object. A prompt counts once however many samples (n) read it, as OpenAI and vLLM count it;
  its cached_tokens are those the prefix cache supplied (not computed) when the request was first admitted, the
  fewest over its samples (the later samples of a prompt read the first one's pages)."""
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens,
          "prompt_tokens_details": {"cached_tokens": _cached_tokens(streams)}}


def _cached_tokens(streams) -> int:
  return sum(min((r.num_cached_prompt_tokens or 0 for r in s.requests), default=0) for s in streams)


def _record(server: Server, stream: RequestStream) -> None:
  m = server.metrics
  m.prompt_tokens.inc(len(stream.requests[0].prompt_ids) if stream.requests else 0)
  n_out = sum(len(r.output_ids) for r in stream.requests)
  m.generation_tokens.inc(n_out)
  if stream.first_token_time is not None:
    m.ttft.observe(stream.first_token_time - stream.arrival)
    longest = max(len(r.output_ids) for r in stream.requests)
    if longest > 1:
      m.tpot.observe((time.monotonic() - stream.first_token_time) / (longest - 1))


def _finish_reason(req) -> str:
  return "stop" if req.finish_reason == "abort" else req.finish_reason


class _SSE:
  """A server-sent-events response; a write to a client that left raises ConnectionResetError."""

  def __init__(self, request: web.Request):
    self.request = request
    self.response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})

  async def open(self):
    self.request[OPEN_SSE] = self
    await self.response.prepare(self.request)

  async def send(self, payload) -> None:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    await self.response.write(f"data: {data}\n\n".encode())

  async def close(self):
    await self.send("[DONE]")
    await self.response.write_eof()
    return self.response

  async def error(self, body: dict) -> web.StreamResponse:
    """An `APIError`'s body as the stream's last event, then [DONE]."""
    await self.send(body)
    return await self.close()


async def _run(server: Server, streams: list[RequestStream], on_update) -> None:
  """Feeds every update of `streams` to `on_update(stream_index, update)`. If this task is cancelled (client gone) or
  on_update raises (a write to a closed connection), `errors_and_auth` cancels the request's unfinished streams; it
  also counts every stream's tokens in the metrics, once the handler has ended."""
  queue: asyncio.Queue = asyncio.Queue()

  async def pump(i, s):
    async for u in s:
      await queue.put((i, u))

  tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
  open_samples = sum(s.n for s in streams)
  try:
    while open_samples:
      i, u = await queue.get()
      if u.finished and u.request.finish_reason == "abort" and server.loop.error is not None:
        # The engine stopped under the request (e.g. another process of a multi-process server died): no answer.
        raise APIError(503, f"the engine stopped: {server.loop.error!r}", "service_unavailable")
      open_samples -= u.finished
      await on_update(i, u)
  finally:
    for t in tasks:
      t.cancel()


async def completions(request: web.Request) -> web.StreamResponse:
  server = _server(request)
  req = await _body(request, protocol.CompletionRequest)
  _check_model(server, req.model)
  if req.best_of not in (None, req.n):
    raise APIError(400, "best_of other than n is not supported.", param="best_of")
  tok = server.tokenizer
  p = req.prompt
  if isinstance(p, str):
    prompts = [p]
  elif p and all(isinstance(x, int) for x in p):
    prompts = [list(p)]
  else:
    prompts = list(p)
  if not prompts:
    raise APIError(400, "prompt must not be empty.", param="prompt")
  ids = await server.off_loop(lambda: [_as_ids(tok.encode_array(x)) if isinstance(x, str) else list(x)
                                       for x in prompts])
  score_only = req.max_tokens == 0  # the legacy API's prompt scoring: echo the prompt (and its logprobs), no tokens
  if score_only and not req.echo:
    raise APIError(400, "max_tokens=0 generates nothing; it is only useful with echo=true (prompt scoring).",
                   param="max_tokens")
  # Echo with logprobs scores the prompt in the engine's own steps (the prefill chunks' logprobs): scheduled, bounded
  # and cancelled like any request. Prompt scoring alone (max_tokens 0) runs as one token whose output is dropped.
  scores_prompt = req.echo and req.logprobs is not None
  params = [_sampling(server, req, len(i), 1 if score_only else req.max_tokens, req.logprobs) for i in ids]
  if scores_prompt:
    params = [dataclasses.replace(p, prompt_logprobs=max(req.logprobs, req.prompt_logprobs or 0)) for p in params]
  grammar = await _grammar(server, params[0], _constraint_field(req))  # one constraint for every prompt
  runs = scores_prompt or req.prompt_logprobs is not None or not score_only
  streams = _submit(request, list(zip(ids, params)), req.seed, grammar) if runs else []
  rid, created, n = f"cmpl-{uuid.uuid4().hex}", int(time.time()), req.n
  prompt_tokens = sum(len(row) for row in ids)
  texts = {}
  num_out = lambda r: 0 if score_only else len(r.output_ids)  # noqa: E731

  def echo_text(i):
    return prompts[i] if isinstance(prompts[i], str) else tok.decode(ids[i])

  def echo_logprobs(i, r):
    """The legacy logprobs object of prompt i's tokens: the first has no logprob (nothing precedes it), the others
    their top-n dicts, as vLLM and the legacy API return them (lm-eval-harness reads them to decide is_greedy)."""
    ptoks = [tok.decode([t]) for t in ids[i]]
    return {"tokens": ptoks, "token_logprobs": [None] + r.prompt_logprobs[1:],
            "top_logprobs": [None] + [{tok.decode([k]): v for k, v in list(d.items())[:req.logprobs]}
                                      for d in r.prompt_top_logprobs[1:]],
            "text_offset": [int(o) for o in np.cumsum([0] + [len(t) for t in ptoks[:-1]])]}

  def logprobs_of(r, start_offset=0, start=0, end=None):
    """The legacy logprobs object of output tokens [start, end) of sample r (None unless asked)."""
    if req.logprobs is None:
      return None
    toks = [tok.decode([t]) for t in r.output_ids[start:end]]
    offsets = list(np.cumsum([start_offset] + [len(t) for t in toks[:-1]])) if toks else []
    return {"tokens": toks, "token_logprobs": r.logprobs[start:end],
            "top_logprobs": [{tok.decode([k]): v for k, v in d.items()} for d in r.top_logprobs[start:end]],
            "text_offset": [int(o) for o in offsets]}

  if req.stream:
    sse = _SSE(request)
    await sse.open()
    continuous = req.stream_options is not None and req.stream_options.continuous_usage_stats

    async def echo(i, k, r=None):
      chunk = {"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
               "choices": [{"index": i * n + k, "text": echo_text(i),
                            "logprobs": echo_logprobs(i, r) if scores_prompt else None,
                            "finish_reason": "length" if score_only else None}]}
      if continuous:
        chunk["usage"] = _usage(prompt_tokens, 0, streams)
      await sse.send(chunk)

    if req.echo and not scores_prompt:  # nothing to wait for; with prompt logprobs, a sample's first update sends it
      for i in range(len(prompts)):
        for k in range(n):
          await echo(i, k)

    sent = {}  # (prompt, sample) -> output tokens whose logprobs went out
    # (prompt, sample) -> text_offset of its next token: cumulative over the stream, after the echoed prompt, as the
    # whole response's offsets are (and vLLM's streamed ones)
    offset = {}

    async def on_update(i, u):
      if scores_prompt and (i, u.index) not in sent:  # the prompt is scored by the sample's first token
        sent[(i, u.index)] = 0
        await echo(i, u.index, u.request)
      if score_only:
        return
      if u.delta or u.finished:
        key = (i, u.index)
        r, start, end = u.request, sent.get(key, 0), u.num_tokens
        sent[key] = end
        lp = logprobs_of(r, offset.get(key, len(echo_text(i)) if req.echo else 0), start, end)
        if lp is not None and lp["tokens"]:
          offset[key] = lp["text_offset"][-1] + len(lp["tokens"][-1])
        chunk = {"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                 "choices": [{"index": i * n + u.index, "text": u.delta, "logprobs": lp,
                              "finish_reason": _finish_reason(r) if u.finished else None}]}
        if continuous:
          made = sum(len(x.output_ids) for s in streams for x in s.requests)
          chunk["usage"] = _usage(prompt_tokens, made, streams)
        await sse.send(chunk)

    await _run(server, streams, on_update)
    if req.stream_options and req.stream_options.include_usage:
      await sse.send({"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                      "choices": [],
                      "usage": _usage(prompt_tokens, sum(num_out(r) for s in streams for r in s.requests), streams)})
    server.metrics.requests.labels("completions", "200").inc()
    return await sse.close()

  async def collect(i, u):
    texts[(i, u.index)] = texts.get((i, u.index), "") + u.delta

  await _run(server, streams, collect)
  choices = []
  samples = ([s.requests for s in streams] if runs else
             [[types.SimpleNamespace(index=k, output_ids=[], finish_reason="length") for k in range(n)] for _ in ids])
  for i, requests in enumerate(samples):
    prefix = echo_text(i) if req.echo else ""
    for r in requests:
      lp = logprobs_of(r, len(prefix), 0, num_out(r))
      if scores_prompt:
        lp = {key: values + lp[key] for key, values in echo_logprobs(i, r).items()}
      choices.append({"index": i * n + r.index, "text": prefix + ("" if score_only else texts.get((i, r.index), "")),
                      "logprobs": lp, "finish_reason": "length" if score_only else _finish_reason(r)})
      if req.prompt_logprobs is not None:
        choices[-1]["prompt_logprobs"] = _prompt_logprobs(tok, ids[i], r, req.prompt_logprobs)
  server.metrics.requests.labels("completions", "200").inc()
  return web.json_response({
      "id": rid, "object": "text_completion", "created": created, "model": server.model_name, "choices": choices,
      "usage": _usage(prompt_tokens, sum(num_out(r) for s in streams for r in s.requests), streams)})


async def chat_completions(request: web.Request) -> web.StreamResponse:
  server = _server(request)
  req = await _body(request, protocol.ChatCompletionRequest)
  _check_model(server, req.model)
  tok = server.tokenizer
  try:
    specs, choice = tool_calls.check_tools(req.tools, req.tool_choice)
    constraint = tool_calls.constraint(server.tool_format, specs, choice, req.parallel_tool_calls is not False)
  except ValueError as e:
    raise APIError(400, str(e), param="tool_choice" if req.tools else "tools") from None
  fmt = server.tool_format if choice != "none" else None
  ids = await server.off_loop(_chat_prompt_ids, tok, req.messages, req.add_generation_prompt,
                              req.tools if fmt else None, fmt, specs)
  top = req.top_logprobs if req.logprobs else None
  if req.top_logprobs is not None and not req.logprobs:
    raise APIError(400, "top_logprobs needs logprobs: true.", param="top_logprobs")
  params = _sampling(server, req, len(ids), req.max_completion_tokens or req.max_tokens,
                     (top or 0) if req.logprobs else None)
  if constraint is not None:
    if params.structured_outputs is not None:
      raise APIError(400, f"tool_choice {choice!r} constrains the output itself; drop response_format / "
                     "structured_outputs.", param="tool_choice")
    params = dataclasses.replace(params, structured_outputs=constraint)
  (stream,) = _submit(request, [(ids, params)], req.seed, await _grammar(server, params, _constraint_field(req)))
  calls = _ToolCalls(fmt, specs, choice, req.n)
  rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

  def entry(t, lp):
    s = tok.decode([t])
    return {"token": s, "logprob": lp, "bytes": list(s.encode())}

  def logprobs_of(r, start=0, end=None):
    """OpenAI's chat logprobs of output tokens [start, end) of sample r (None unless asked)."""
    if not req.logprobs:
      return None
    rows = zip(r.output_ids[start:end], r.logprobs[start:end], r.top_logprobs[start:end])
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(k, v) for k, v in d.items()]} for t, lp, d in rows]}

  if req.stream:
    sse = _SSE(request)
    await sse.open()
    continuous = req.stream_options is not None and req.stream_options.continuous_usage_stats
    for k in range(req.n):
      chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_name,
               "choices": [{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}]}
      if continuous:
        chunk["usage"] = _usage(len(ids), 0, [stream])
      await sse.send(chunk)

    sent = [0] * req.n  # output tokens whose logprobs went out, per sample

    async def on_update(_, u):
      delta = calls.stream(u.index, u.delta, u.finished)
      if delta or u.finished:
        r = u.request
        end = u.num_tokens
        chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_name,
                 "choices": [{"index": u.index, "delta": delta, "logprobs": logprobs_of(r, sent[u.index], end),
                              "finish_reason": calls.finish_reason(u.index, r) if u.finished else None}]}
        sent[u.index] = end
        if continuous:
          chunk["usage"] = _usage(len(ids), sum(len(x.output_ids) for x in stream.requests), [stream])
        await sse.send(chunk)

    await _run(server, [stream], on_update)
    if req.stream_options and req.stream_options.include_usage:
      await sse.send({"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_name,
                      "choices": [], "usage": _usage(len(ids), sum(len(r.output_ids) for r in stream.requests),
                                                     [stream])})
    server.metrics.requests.labels("chat", "200").inc()
    return await sse.close()

  texts: dict[int, str] = {}

  async def collect(_, u):
    texts[u.index] = texts.get(u.index, "") + u.delta

  await _run(server, [stream], collect)
  server.metrics.requests.labels("chat", "200").inc()
  body = {
      "id": rid, "object": "chat.completion", "created": created, "model": server.model_name,
      "choices": [{"index": r.index, "message": calls.message(r.index, texts.get(r.index, "")),
                   "logprobs": logprobs_of(r), "finish_reason": calls.finish_reason(r.index, r)}
                  for r in stream.requests],
      "usage": _usage(len(ids), sum(len(r.output_ids) for r in stream.requests), [stream])}
  if req.prompt_logprobs is not None:  # vLLM puts the prompt's logprobs beside the choices
    body["prompt_logprobs"] = _prompt_logprobs(tok, ids, stream.requests[0], req.prompt_logprobs)
  return web.json_response(body)


class _ToolCalls:
  """A chat request's samples read for tool calls (`jaxllm.tool_calls`): whole messages, or stream deltas.

  Streamed, a sample's text goes out as content up to what its format says is surely not a call (`safe_prefix`); the
  rest is held back and, when the sample ends, sent as its calls (`delta.tool_calls`, one entry per call with its
  whole arguments) or as the content it turned out to be. A named function's arguments (the whole output) stream as
  they come."""

  def __init__(self, fmt, specs, choice, n: int):
    self.fmt, self.specs, self.choice = fmt, specs, choice
    self.named = choice not in ("none", "auto", "required")
    self.text, self.sent = [""] * n, [0] * n
    self.parsed: list[tuple[list, str] | None] = [None] * n
    self.ids = [tool_calls.ToolCall("", "").id for _ in range(n)]  # a named call's id, the same streamed or not

  def parse(self, k: int, text: str) -> tuple[list, str]:
    """(calls, content outside them) of sample k's whole text, read once."""
    if self.parsed[k] is None:
      if self.fmt is None:
        self.parsed[k] = [], text
      elif self.named:
        self.parsed[k] = tool_calls.parse_named(text, self.choice), ""
        self.parsed[k][0][0].id = self.ids[k]
      else:
        self.parsed[k] = self.fmt.parse(text, self.specs)
    return self.parsed[k]

  def message(self, k: int, text: str) -> dict:
    found, content = self.parse(k, text)
    if not found:
      return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": content.rstrip() or None, "tool_calls": [c.to_openai() for c in found]}

  def finish_reason(self, k: int, r) -> str:
    """"tool_calls" when the model chose to call (auto / required); a named function's call ends with "stop", as
    OpenAI's does."""
    reason = _finish_reason(r)
    called = self.parsed[k] is not None and self.parsed[k][0]
    return "tool_calls" if reason == "stop" and called and not self.named else reason

  def stream(self, k: int, delta: str, finished: bool) -> dict:
    """The chunk delta for sample k's new text (and, once it finished, for what was held back)."""
    if self.fmt is None:
      return {"content": delta} if delta else {}
    self.text[k] += delta
    text = self.text[k]
    if self.named:  # the output is the function's arguments
      if finished:
        self.parse(k, text)
      if not delta and self.sent[k]:
        return {}
      call = {"index": 0, "function": {"arguments": delta}}
      if not self.sent[k]:
        call.update(id=self.ids[k], type="function", function={"name": self.choice, "arguments": delta})
      self.sent[k] = max(len(text), 1)
      return {"tool_calls": [call]}
    if not finished:
      safe = self.fmt.safe_prefix(text) if self.choice == "auto" else 0
      # Trailing whitespace waits for the next word: if calls follow instead, the message's content ends before it
      # (`message` drops it), and the stream's content must add up to the same.
      safe = len(text[:safe].rstrip())
      if safe <= self.sent[k]:
        return {}
      out, self.sent[k] = {"content": text[self.sent[k]:safe]}, safe
      return out
    found, content = self.parse(k, text)
    rest = (content.rstrip() if found else text)[self.sent[k]:]
    out = {"content": rest} if rest else {}
    if found:
      out["tool_calls"] = [{"index": i, **c.to_openai()} for i, c in enumerate(found)]
    return out


def _model_card(server: Server) -> dict:
  return {"id": server.model_name, "object": "model", "created": 0, "owned_by": "jaxllm",
          "max_model_len": getattr(server, "max_model_len", None)}


async def models(request: web.Request) -> web.Response:
  return web.json_response({"object": "list", "data": [_model_card(request.app[SERVER])]})


async def model(request: web.Request) -> web.Response:
  server = request.app[SERVER]
  _check_model(server, request.match_info["model_id"])
  return web.json_response(_model_card(server))


async def health(request: web.Request) -> web.Response:
  server = request.app[SERVER]
  ok = server.state == "ready" and server.loop is not None and server.loop.alive
  body = {"status": server.state if ok or server.state != "ready" else "engine stopped"}
  if server.load_error:
    body["error"] = server.load_error
  return web.json_response(body, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
  return web.Response(body=request.app[SERVER].metrics.render(), content_type="text/plain")


async def tokenize(request: web.Request) -> web.Response:
  server = _server(request)
  req = await _body(request, protocol.TokenizeRequest)
  _check_model(server, req.model)
  if (req.prompt is None) == (req.messages is None):
    raise APIError(400, "pass exactly one of prompt or messages.")
  tok = server.tokenizer
  if req.messages is not None:
    ids = await server.off_loop(_chat_prompt_ids, tok, req.messages, True)
  else:
    ids = await server.off_loop(tok.encode_array, req.prompt, None if req.add_special_tokens else False)
  return await _tokens_response(server, ids, count=len(ids), max_model_len=server.max_model_len)


async def detokenize(request: web.Request) -> web.Response:
  server = _server(request)
  req = await _body(request, protocol.DetokenizeRequest)
  _check_model(server, req.model)
  bad = [t for t in req.tokens if not 0 <= t < server.llm.config.vocab_size]
  if bad:
    raise APIError(400, f"tokens outside the vocabulary [0, {server.llm.config.vocab_size}): {bad[:5]}.",
                   param="tokens")
  return web.json_response({"prompt": await server.off_loop(server.tokenizer.decode, req.tokens)})


def _authorized(header: str, key: str) -> bool:
  """`Authorization: Bearer <key>`, the scheme in any case (RFC 7235), the key compared in constant time."""
  scheme, _, given = header.partition(" ")
  return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


def _endpoint(request: web.Request) -> str:
  """The metrics label of a request: its route's name ("unknown" for a path no route matches), never the raw path,
  which a client could vary without bound to grow /metrics."""
  return getattr(getattr(request.match_info, "route", None), "name", None) or "unknown"


@web.middleware
async def errors_and_auth(request: web.Request, handler):
  server: Server = request.app[SERVER]
  try:
    key = server.config.api_key
    guarded = request.path.startswith("/v1/") or request.path in ("/tokenize", "/detokenize")
    if key and guarded and not _authorized(request.headers.get("Authorization", ""), key):
      raise APIError(401, "invalid API key: send 'Authorization: Bearer <key>'.", "authentication_error")
    return await handler(request)
  except APIError as e:
    server.metrics.requests.labels(_endpoint(request), str(e.status)).inc()
    sse = request.get(OPEN_SSE)
    if sse is None:
      return e.response()
    # A stream whose 200 is sent already: the error as its last event (vLLM's way), then the end of the stream.
    return await sse.error(e.body())
  except web.HTTPException as e:  # aiohttp's own 404 / 405 / 413, in OpenAI's error shape
    if e.status < 400:
      raise
    server.metrics.requests.labels(_endpoint(request), str(e.status)).inc()
    return APIError(e.status, f"{e.reason}: {request.method} {request.path}", "invalid_request_error").response()
  except (ConnectionResetError, asyncio.CancelledError):
    raise
  except TokenizerProcessDied as e:  # the next request starts a new one: this one may be sent again
    log.warning("%s on %s", e, request.path)
    server.metrics.requests.labels(_endpoint(request), "503").inc()
    return APIError(503, f"{e}; it is restarted with the next request: retry this one.",
                    "service_unavailable").response()
  except Exception as e:  # noqa: BLE001 - never let one request take the server down
    log.exception("internal error on %s", request.path)
    server.metrics.requests.labels(_endpoint(request), "500").inc()
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "internal_error").response()
  finally:  # nothing a request submitted runs on once its handler has ended (the client gone, or an error)
    for stream in request.get(STREAMS, ()):
      if not stream.finished:
        server.loop.cancel(stream)
      _record(server, stream)  # cancelled ones too: their prompts were read and their tokens made


def create_app(server: Server, max_body_bytes: int = 4 << 20) -> web.Application:
  app = web.Application(middlewares=[errors_and_auth], client_max_size=max_body_bytes)
  app[SERVER] = server
  app.add_routes([
      web.post("/v1/completions", completions, name="completions"),
      web.post("/v1/chat/completions", chat_completions, name="chat"),
      web.get("/v1/models", models, name="models"), web.get("/v1/models/{model_id:.+}", model, name="model"),
      web.get("/health", health, name="health"), web.get("/metrics", metrics, name="metrics"),
      web.post("/tokenize", tokenize, name="tokenize"), web.post("/detokenize", detokenize, name="detokenize")])
  from jaxllm.serving import responses  # it builds on this module's handlers

  responses.setup(app)
  return app


class _Handler(web_protocol.RequestHandler):
  """aiohttp's connection handler, with its own errors (a malformed request line, an over-long header: answered
  before any handler runs) in the OpenAI error shape instead of plain text."""

  __slots__ = ()

  def handle_error(self, request, status=500, exc=None, message=None):
    super().handle_error(request, status, exc, message)  # logs; raises if a response was already started
    reason = HTTPStatus(status).phrase
    detail = f"{reason}: {message}" if message and status < 500 else reason
    response = APIError(status, detail, "invalid_request_error" if status < 500 else "internal_error").response()
    response.force_close()
    return response


class _Refused(asyncio.Protocol):
  """A connection past --max_connections: answered 503 before its request is read, then closed (after reading what the
  client sends for up to a second, so the answer is not lost to a reset)."""

  def __init__(self, answer: bytes):
    self.answer = answer

  def connection_made(self, transport):
    transport.write(self.answer)
    asyncio.get_running_loop().call_later(1.0, transport.close)
    self.transport = transport

  def data_received(self, data):
    pass

  def eof_received(self):
    self.transport.close()


def _refusal(limit: int) -> bytes:
  body = json.dumps({"error": {"message": f"too many open connections (--max_connections {limit}); retry shortly.",
                               "type": "server_error", "param": None, "code": 503}}).encode()
  head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
          f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n")
  return head.encode() + body


def max_connections(config: ServerConfig) -> int:
  """--max_connections, or the process's open-file limit minus 256 (the model's files, the compilation cache and
  the runtime keep theirs), at least 16: past the fd limit the accept loop could not even refuse."""
  if config.max_connections is not None:
    return config.max_connections
  import resource

  soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
  return max(16, (soft if soft != resource.RLIM_INFINITY else 65536) - 256)


async def serve(server: Server, *, ready_line: bool = True, stop: asyncio.Event | None = None,
                exit_on_load_failure: bool = True) -> None:
  """Opens the port, loads the model on a thread (health says 503 meanwhile), serves until `stop` is set or SIGTERM /
  SIGINT, then drains: new requests get 503 while in-flight ones finish (for up to --drain_timeout seconds)."""
  c = server.config
  handler_args = dict(access_log=None, keepalive_timeout=c.timeout_keep_alive)
  runner = web.AppRunner(create_app(server), handler_cancellation=True, **handler_args)
  await runner.setup()
  loop = asyncio.get_running_loop()
  limit, refusal = max_connections(c), _refusal(max_connections(c))

  def connection():
    if len(runner.server.connections) >= limit:
      server.metrics.requests.labels("connection", "503").inc()
      return _Refused(refusal)
    return _Handler(runner.server, loop=loop, **handler_args)

  listener = await loop.create_server(connection, c.host, c.port, backlog=1024, reuse_address=True)
  server.connections = lambda: runner.server.connections
  stop = stop or asyncio.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    try:
      loop.add_signal_handler(sig, stop.set)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests): `stop` is the way out
      pass
  port = listener.sockets[0].getsockname()[1] if listener.sockets else c.port
  server.port = port
  log.info("listening on http://%s:%d (loading %s)", c.host, port, c.model)
  # The load runs on a daemon thread, so SIGTERM / SIGINT while loading or warming up (minutes on a first start)
  # stops the server at once: nothing was admitted, nothing needs draining, and compilation cannot be interrupted.
  loaded = loop.create_future()
  server._abort_load = lambda: loop.call_soon_threadsafe(lambda: loaded.done() or loaded.set_result(None))

  def load():
    try:
      server.load()
    finally:
      loop.call_soon_threadsafe(lambda: loaded.done() or loaded.set_result(None))

  server.load_thread = threading.Thread(target=load, name="jaxllm-load", daemon=True)
  server.load_thread.start()
  stopped = asyncio.ensure_future(stop.wait())
  await asyncio.wait([loaded, stopped], return_when=asyncio.FIRST_COMPLETED)
  if not loaded.done():
    log.info("stopped while %s; exiting without waiting for it", server.state)
    server.state = "stopped"
    await _close(listener, runner, server)
    return
  stopped.cancel()
  if server.state == "failed" and exit_on_load_failure:
    await _close(listener, runner, server)
    return
  if ready_line and server.state == "ready":
    print(f"jaxllm serve: ready on http://{c.host}:{port} — try:\n  curl http://{c.host}:{port}/v1/chat/completions "
          "-H 'Content-Type: application/json' -d '{\"messages\": [{\"role\": \"user\", \"content\": "
          "\"What is the capital of France?\"}], \"max_tokens\": 32, \"temperature\": 0}'", flush=True)
  watch = asyncio.ensure_future(_stop_when_engine_dies(server, stop)) if server.channel is not None else None
  await stop.wait()
  if watch is not None:
    watch.cancel()
  if server.loop is not None and server.loop.error is not None and server.channel is not None:
    server.state, server.load_error = "failed", f"the engine stopped: {server.loop.error!r}"
    log.error("%s; exiting", server.load_error)
    await _close(listener, runner, server)
    return
  server.state = "draining"
  log.info("draining: finishing in-flight requests (at most %g s)", c.drain_timeout)
  if server.loop is not None:
    await asyncio.to_thread(server.loop.stop, True, c.drain_timeout)
    if server.loop.alive:
      log.warning("drain timeout: cancelling %d unfinished requests", server.loop.num_running + server.loop.queued)
      await asyncio.to_thread(server.loop.stop, False)
    if server.loop.error is not None and server.channel is not None:  # another process died while draining
      server.state, server.load_error = "failed", f"the engine stopped: {server.loop.error!r}"
  await _close(listener, runner, server)


async def _stop_when_engine_dies(server: Server, stop: asyncio.Event, poll: float = 0.2, grace: float = 1.0) -> None:
  """A multi-process server cannot go on without its engine (another process died, say): once the engine thread
  has stopped, give the handlers it woke `grace` seconds to send their 503s, then stop the server."""
  while server.loop.alive:
    await asyncio.sleep(poll)
  await asyncio.sleep(grace)
  stop.set()


async def _close(listener, runner, server: Server | None = None) -> None:
  listener.close()
  await runner.cleanup()
  if server is not None and server.tokenizer is not None:
    server.tokenizer.stop_process()


# ------------------------------------------------------------------------------------------------------------ main
def run_in_thread(config: ServerConfig) -> tuple[Server, threading.Thread, asyncio.AbstractEventLoop, asyncio.Event]:
  """A server on its own thread and event loop (tests, notebooks); set the event via loop.call_soon_threadsafe to
  stop it."""
  server = Server(config)
  started = threading.Event()
  box = {}

  def main():
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    box["loop"], box["stop"] = loop, asyncio.Event()
    started.set()
    loop.run_until_complete(serve(server, ready_line=False, stop=box["stop"]))

  t = threading.Thread(target=main, daemon=True)
  t.start()
  started.wait()
  return server, t, box["loop"], box["stop"]


if __name__ == "__main__":  # python -m jaxllm.serving.server --flags: the same as `jaxllm serve --flags`
  import sys

  from jaxllm.cli import run

  sys.argv.insert(1, "serve")
  run()

