"""The HTTP server on a free loopback port, driven by the official `openai` client and by raw HTTP: completions,
chat, streaming, logprobs, n; greedy text over HTTP equals `LLM.generate`; malformed input gets 4xx and the server
keeps serving; concurrent streaming clients, some disconnecting mid-stream, all get complete answers and every KV
page comes back."""

import asyncio
import functools
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from jaxllm import SamplingParams
from jaxllm.serving.engine_loop import EngineStopped
from tests.serving.conftest import pages_all_free, raw

PARIS = [{"role": "user", "content": "What is the capital of France?"}]


def test_health_models_tokenize_detokenize(server, client):
  assert raw(server, "/health") == (200, {"status": "ready"})
  assert [m.id for m in client.models.list().data] == ["smollm2"]
  status, body = raw(server, "/tokenize", {"prompt": "Hello world"})
  assert status == 200 and body["tokens"] == server.tokenizer.encode("Hello world")
  assert raw(server, "/detokenize", {"tokens": body["tokens"]}) == (200, {"prompt": "Hello world"})


def test_greedy_completion_over_http_equals_llm_generate(server, client, default_llm):
  prompt = "The capital of France is"
  got = client.completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0)
  want = default_llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0))[0]
  assert got.choices[0].text == want.text
  assert got.choices[0].finish_reason == want.finish_reason
  assert got.usage.prompt_tokens == len(want.prompt_token_ids)
  assert got.usage.completion_tokens == len(want.token_ids)


def test_chat_streamed_and_not(server, client):
  full = client.chat.completions.create(model="smollm2", messages=PARIS, max_tokens=32, temperature=0)
  assert full.choices[0].message.content == "The capital of France is Paris."
  assert full.choices[0].finish_reason == "stop"
  chunks = list(client.chat.completions.create(model="smollm2", messages=PARIS, max_tokens=32, temperature=0,
                                               stream=True, stream_options={"include_usage": True}))
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == full.choices[0].message.content
  assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
  assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_logprobs_n_seed_and_stop(server, client):
  out = client.completions.create(model="smollm2", prompt="1, 2, 3,", max_tokens=6, temperature=0, logprobs=2)
  lp = out.choices[0].logprobs
  assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
  assert "".join(lp.tokens) == out.choices[0].text
  assert all(max(t.values()) >= v - 1e-5 for t, v in zip(lp.top_logprobs, lp.token_logprobs))
  a = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=8, n=2, seed=3,
                                temperature=1.0)
  b = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=8, n=2, seed=3,
                                temperature=1.0)
  assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 2
  chat = client.chat.completions.create(model="smollm2", messages=PARIS, max_tokens=32, temperature=0,
                                        stop=["Paris"], logprobs=True, top_logprobs=1)
  assert chat.choices[0].message.content == "The capital of France is "
  assert chat.choices[0].logprobs.content[0].top_logprobs[0].token == chat.choices[0].logprobs.content[0].token


def test_multi_turn_sends_back_the_clients_own_message_objects(server, client):
  """The openai client's `choices[0].message` (refusal, annotations, audio, tool_calls ... all null) appended to the
  history, 5 turns, and the same loop streamed; OpenAI fields clients send by habit are accepted."""
  habits = dict(store=False, metadata={"run": "test"}, service_tier="auto", user="u1", parallel_tool_calls=None,
                response_format={"type": "text"}, tool_choice="none")
  messages = [{"role": "developer", "content": "Answer in a few words."}]
  for turn in ("Hi!", "What is the capital of France?", "And of Italy?", "Thanks.", "Bye."):
    messages.append({"role": "user", "content": turn})
    out = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=6, temperature=0, **habits)
    messages.append(out.choices[0].message)
  assert all(m.content for m in messages[2::2])
  replay = [messages[0]]
  for i, turn in enumerate(messages[1::2]):
    replay.append(turn)
    chunks = client.chat.completions.create(model="smollm2", messages=replay, max_tokens=6, temperature=0,
                                            stream=True, **habits)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == messages[2 + 2 * i].content  # greedy: the streamed history reproduces the non-streamed one
    replay.append({"role": "assistant", "content": text})


def test_logprobs_and_usage_in_streamed_chunks(server, client):
  kw = dict(model="smollm2", messages=PARIS, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
  full = client.chat.completions.create(**kw)
  chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={
      "include_usage": True, "continuous_usage_stats": True}))
  streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
  assert [t.token for t in streamed] == [t.token for t in full.choices[0].logprobs.content]
  # Equal to float32 rounding: the second request may find the prompt's pages cached and prefill a shorter chunk.
  assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in full.choices[0].logprobs.content],
                                                        abs=1e-4)
  assert all(len(t.top_logprobs) == 2 for t in streamed)
  used = [c.usage.completion_tokens for c in chunks if c.choices]
  assert used == sorted(used) and used[-1] == full.usage.completion_tokens  # running totals, every chunk
  legacy = dict(model="smollm2", prompt="1, 2, 3,", max_tokens=6, temperature=0, logprobs=2)
  want = client.completions.create(**legacy).choices[0].logprobs
  parts = [c.choices[0].logprobs for c in client.completions.create(**legacy, stream=True) if c.choices[0].logprobs]
  assert [t for p in parts for t in p.tokens] == want.tokens
  assert [v for p in parts for v in p.token_logprobs] == want.token_logprobs
  assert [o for p in parts for o in p.text_offset] == want.text_offset  # cumulative over the stream, not per chunk
  echoed = dict(legacy, echo=True, logprobs=None, prompt="Count: 1, 2,")
  want = client.completions.create(**echoed | {"logprobs": 1})
  parts = [c.choices[0].logprobs for c in client.completions.create(**echoed | {"logprobs": 1}, stream=True)
           if c.choices[0].logprobs]
  assert [o for p in parts for o in p.text_offset] == want.choices[0].logprobs.text_offset  # past the echoed prompt


def test_null_means_the_default(server):
  """OpenAI's API takes null for an optional field as "not given" (its SDKs and many proxies send every field):
  temperature, top_p, n, stream, penalties and echo set to null answer as if absent."""
  nulls = {k: None for k in ("temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty", "seed",
                             "stop", "logprobs", "stream_options", "max_tokens")}
  status, got = raw(server, "/v1/chat/completions", {"messages": PARIS, **nulls, "max_tokens": 4})
  assert status == 200 and len(got["choices"]) == 1, got
  status, got = raw(server, "/v1/completions", {"prompt": "Hi", **nulls, "echo": None})
  assert status == 200 and got["usage"]["completion_tokens"] == 16, got  # the legacy API's max_tokens default
  status, got = raw(server, "/v1/chat/completions", {"messages": None})
  assert status == 400 and "messages" in got["error"]["message"], got  # a required field stays required


def test_a_request_arriving_as_the_engine_stops_is_a_503(server, monkeypatch):
  """A request whose handler began before a SIGTERM drain reaches an engine that takes no more: 503 (retry
  elsewhere), not a 500."""
  def stopped(*args, **kwargs):
    raise EngineStopped("the engine is not accepting requests (shutting down or stopped).")

  monkeypatch.setattr(server.loop, "submit_all", stopped)
  status, got = raw(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
  assert status == 503 and got["error"]["type"] == "service_unavailable", got


def test_a_stop_token_id_ends_the_text_without_its_own(server, client):
  """stop_token_ids end generation and, as in vLLM, the stopping token's text is not output; min_tokens keeps stop
  strings from ending the text too early."""
  period = raw(server, "/tokenize", {"prompt": ".", "add_special_tokens": False})[1]["tokens"]
  assert len(period) == 1
  kw = dict(model="smollm2", prompt="The capital of France is Paris. The capital of Spain is", temperature=0,
            max_tokens=40)
  by_string = client.completions.create(**kw, stop=".", extra_body={"ignore_eos": True}).choices[0]
  by_id = client.completions.create(**kw, extra_body={"ignore_eos": True, "stop_token_ids": period}).choices[0]
  assert by_id.finish_reason == by_string.finish_reason == "stop" and by_id.text == by_string.text
  assert not by_id.text.endswith(".")
  later = client.completions.create(**kw, stop=".", extra_body={"ignore_eos": True, "min_tokens": 12}).choices[0]
  assert later.text.startswith(by_string.text + ".") and later.finish_reason == "stop", later.text


def test_model_by_id(server, client):
  assert client.models.retrieve("smollm2").id == "smollm2"
  assert raw(server, "/v1/models/smollm2")[1]["id"] == "smollm2"


def test_echo_with_logprobs_scores_the_prompt(server, client, default_llm):
  prompt = "The capital of France is Paris"
  out = client.completions.create(model="smollm2", prompt=prompt, max_tokens=1, temperature=0, echo=True,
                                  logprobs=0)
  lp = out.choices[0].logprobs
  ids = default_llm.tokenizer.encode(prompt)
  assert out.choices[0].text.startswith(prompt)
  assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids) + 1
  want = default_llm.score(token_pairs=[(ids[:1], ids[1:])])[0].logprobs
  assert lp.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)
  # max_tokens 0 with echo: the legacy API's prompt scoring, nothing generated; top-n dicts for every prompt token
  # but the first (lm-eval-harness's local-completions reads them for is_greedy).
  scored = client.completions.create(model="smollm2", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
  got = scored.choices[0].logprobs
  assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0
  assert got.token_logprobs[1:] == pytest.approx(want, abs=1e-4) and len(got.tokens) == len(ids)
  tops = default_llm.score(token_pairs=[(ids[:1], ids[1:])], num_top_logprobs=2)[0].top_logprobs
  assert got.top_logprobs[0] is None and len(got.top_logprobs) == len(ids)
  for d, want_top in zip(got.top_logprobs[1:], tops):
    assert list(d) == [default_llm.tokenizer.decode([t]) for t in want_top]
    assert list(d.values()) == pytest.approx(list(want_top.values()), abs=1e-4)
  status, body = raw(server, "/v1/completions", {"prompt": prompt, "max_tokens": 0})
  assert status == 400 and body["error"]["param"] == "max_tokens" and "echo" in body["error"]["message"]
  # Streamed, the prompt's chunk carries its logprobs (sent once the engine has scored it), then the tokens follow.
  for max_tokens in (0, 3):
    whole = client.completions.create(model="smollm2", prompt=prompt, max_tokens=max_tokens, echo=True, logprobs=2,
                                      temperature=0)
    chunks = list(client.completions.create(model="smollm2", prompt=prompt, max_tokens=max_tokens, echo=True,
                                            logprobs=2, temperature=0, stream=True))
    assert chunks[0].choices[0].text == prompt and chunks[0].choices[0].logprobs.tokens == got.tokens
    parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [t for p in parts for t in p.tokens] == whole.choices[0].logprobs.tokens
    assert [v for p in parts for v in p.token_logprobs] == whole.choices[0].logprobs.token_logprobs
    assert [d for p in parts for d in p.top_logprobs] == whole.choices[0].logprobs.top_logprobs


def test_vllm_prompt_logprobs(server, default_llm):
  """vLLM's `prompt_logprobs` extension: per prompt token (None for the first) {id: {logprob, rank, decoded_token}}
  for the token itself and the top-n; on each completion choice, and beside the choices of a chat answer."""
  prompt = "The capital of France is Paris"
  ids = default_llm.tokenizer.encode(prompt)
  want = default_llm.score(token_pairs=[(ids[:1], ids[1:])], num_top_logprobs=2)[0]
  status, body = raw(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2,
                                                 "temperature": 0})
  assert status == 200, body
  got = body["choices"][0]["prompt_logprobs"]
  assert got[0] is None and len(got) == len(ids)
  for p, (entry, lp, top) in enumerate(zip(got[1:], want.logprobs, want.top_logprobs), 1):
    mine = entry[str(ids[p])]
    assert mine["logprob"] == pytest.approx(lp, abs=1e-4) and mine["decoded_token"] == default_llm.tokenizer.decode(
        [ids[p]])
    assert (mine["rank"] == 1) == (ids[p] == next(iter(top)))
    assert [entry[str(t)]["rank"] for t in top] == [1, 2] and set(entry) == {str(ids[p]), *map(str, top)}
  status, body = raw(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                      "max_tokens": 1, "prompt_logprobs": 0})
  assert status == 200 and len(body["prompt_logprobs"]) == body["usage"]["prompt_tokens"], body
  assert all(len(e) == 1 for e in body["prompt_logprobs"][1:])
  status, body = raw(server, "/v1/completions", {"prompt": prompt, "prompt_logprobs": 1, "stream": True})
  assert status == 400 and body["error"]["param"] == "prompt_logprobs"


@pytest.mark.parametrize("path, body, status, needle", [
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", b"\xff\xfe{}", 400, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_token": 5}, 400, "max_token"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 404, "gpt-9"),
    ("/v1/completions", {"prompt": "hi " * 300_000}, 400, "max_model_len"),
    ("/v1/completions", {"prompt": [1, 2, 10**7]}, 400, "vocabulary"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": PARIS, "top_logprobs": 3}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": PARIS, "audio": {"voice": "alloy", "format": "wav"}}, 400,
     "audio: audio output is not supported"),
    ("/v1/chat/completions", {"messages": PARIS, "prediction": {"type": "content", "content": "x"}}, 400,
     "prediction"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "image_url content parts"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "18 C"}]}, 400, "tool_call_id"),
    ("/v1/chat/completions", {"messages": PARIS, "max_completion_tokenz": 4}, 400, "max_completion_tokenz"),
    ("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    ("/v1/nope", {}, 404, "Not Found"),
    ("/v1/models/gpt-9", None, 404, "gpt-9"),
    ("/v1/completions", b'{"prompt": "' + b"a" * (5 << 20) + b'"}', 413, "Too Large"),
    # past Python's 4,300-digit int conversion limit; lone surrogates (tokenizers raise TypeError on them)
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", 400, "not valid JSON"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400,
     "messages.0.content: a string holds a lone UTF-16 surrogate"),
    ("/tokenize", b'{"prompt": "\\udc00"}', 400, "lone UTF-16 surrogate"),
    # every stop string is searched for after every token: 330,000 of them would stall the engine for everyone
    ("/v1/completions", {"prompt": "hi", "stop": ["x"] * 330_000}, 400, "at most 64 strings of 4096 characters"),
    ("/v1/chat/completions", {"messages": PARIS, "stop": ["ab" * 2049]}, 400, "--max_stop_chars"),
    ("/tokenize", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "image_url content parts"),
])
def test_malformed_requests_get_4xx_and_the_server_keeps_serving(server, client, path, body, status, needle):
  got_status, got = raw(server, path, body)
  assert got_status == status, got
  assert needle in got["error"]["message"] and got["error"]["code"] == status
  assert client.completions.create(model="smollm2", prompt="Hi", max_tokens=2).choices[0].text is not None
  assert pages_all_free(server)


def _eight_streams(server, started=None):
  """Eight greedy 96-token streams at once; the arrival times of each one's tokens. `started` (a Barrier of 9) is
  passed once every stream has its first token."""
  arrivals = [[] for _ in range(8)]

  def stream(i):
    body = json.dumps({"prompt": f"Story {i}:", "max_tokens": 96, "temperature": 0, "ignore_eos": True,
                       "stream": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
      for line in r:
        if line.startswith(b"data: {"):
          if not arrivals[i] and started is not None:
            started.wait(timeout=120)
          arrivals[i].append(time.perf_counter())

  streams = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
  for t in streams:
    t.start()
  return streams, arrivals


def test_huge_bodies_stall_neither_health_nor_running_streams(server):
  """Tokenizing a ~3.5 MB /tokenize prompt of distinct words (seconds of work) and templating and tokenizing a 1 MB
  chat message run off the event loop, the tokenizer's own work at a lower CPU priority: /health answers within an
  engine step and 8 running streams keep their pace meanwhile. An engine step is measured here, as the longest gap
  between two tokens of the same 8 streams run alone first (which also compiles every program they need, so that
  no compilation lands in the measurement)."""
  text = _huge_text()
  chat = {"messages": [{"role": "user", "content": text[:1 << 20]}]}
  big_bodies = {"/tokenize": json.dumps({"prompt": text}).encode(), "/v1/chat/completions": json.dumps(chat).encode()}
  streams, arrivals = _eight_streams(server)
  for t in streams:
    t.join()
  step = max(b - a for times in arrivals for a, b in zip(times[1:], times[2:]))  # after every prompt is read

  for _ in range(2):  # a second try when the first one's bound is missed: a shared machine's noise
    worst, gaps, took = _stalls_under_huge_bodies(server, big_bodies)
    if worst < 2 * step and max(gaps) < 2.5 * step:
      break
  # Measured on 2 cores (the test client shares the server's GIL): /health 0.07-0.15 s, streams 0.17-0.21 s, against
  # a step of 0.14-0.16 s; with the tokenizer on the event loop's cores at full priority, 0.5-0.7 s both.
  assert worst < 2 * step and max(gaps) < 2.5 * step, (worst, max(gaps), step, took)


@functools.lru_cache(maxsize=1)
def _huge_text() -> str:
  """~3.5 MB of 500,000 distinct made-up words (seconds of tokenizing: no word repeats enough to be cached)."""
  import random

  rng = random.Random(0)
  return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
                  for _ in range(500_000))


def test_bulk_bodies_do_not_hold_up_ordinary_requests(server):
  """Two 3.5 MB /tokenize bodies (seconds of tokenizing each, one at a time in the tokenizer process) take the bulk
  workers, never every text worker: a small /tokenize and a one-token completion sent meanwhile answer at once."""
  big = json.dumps({"prompt": _huge_text()}).encode()
  assert raw(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 1})[0] == 200  # compiled before timing
  done = []

  def send():
    done.append((raw(server, "/tokenize", big)[0], time.perf_counter()))

  senders = [threading.Thread(target=send) for _ in range(2)]
  for t in senders:
    t.start()
  time.sleep(1.0)  # both bodies read and at work
  start = time.perf_counter()
  assert raw(server, "/tokenize", {"prompt": "hi"})[0] == 200
  status, body = raw(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 1})
  small = time.perf_counter() - start
  for t in senders:
    t.join()
  assert status == 200 and [s for s, _ in done] == [200, 200], body
  assert all(finished > start + small for _, finished in done), (done, start, small)  # still at work meanwhile
  assert small < 2.0, small


def test_a_tokenizer_process_killed_mid_request_is_a_503_and_the_next_request_restarts_it(server):
  """The tokenizer child dying under a request (killed, out of memory) is not the client's fault nor the server's
  end: that request gets a 503 to retry, and the next one starts a new child."""
  import os
  import signal

  proc = server.tokenizer._engine.process
  status, before = raw(server, "/tokenize", {"prompt": "hello " * 12_000})  # long: the child encodes it
  assert status == 200
  pid, idle = proc.pid, _cpu_ticks(proc.pid)
  done = []
  sender = threading.Thread(target=lambda: done.append(raw(server, "/tokenize", {"prompt": _huge_text()})))
  sender.start()
  deadline = time.time() + 30
  while _cpu_ticks(pid) < idle + 20:  # the child is at work on the huge text (0.2 s of CPU)
    assert time.time() < deadline and sender.is_alive()
    time.sleep(0.05)
  os.kill(pid, signal.SIGKILL)
  sender.join(60)
  (status, body), = done
  assert status == 503 and body["error"]["type"] == "service_unavailable", body
  assert "died" in body["error"]["message"] and "retry" in body["error"]["message"]
  status, body = raw(server, "/tokenize", {"prompt": "hello " * 12_000})
  assert status == 200 and body == before and proc.pid != pid
  assert raw(server, "/health")[0] == 200


def _cpu_ticks(pid: int) -> int:
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return int(fields[11]) + int(fields[12])  # utime + stime


def _stalls_under_huge_bodies(server, big_bodies):
  """(the longest wait between two /health answers, every gap between two tokens of 8 running streams, the
  /tokenize time) while the big bodies are in flight."""
  started = threading.Barrier(9)
  streams, arrivals = _eight_streams(server, started)
  started.wait(timeout=120)  # every stream is generating
  results, done = {}, threading.Event()

  def big(path):  # the reply is parsed after the measurement: this process's GIL is the server's too
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", data=big_bodies[path],
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
      with urllib.request.urlopen(req, timeout=300) as r:
        status, reply = r.status, r.read()
    except urllib.error.HTTPError as e:
      status, reply = e.code, e.read()
    results[path] = (status, reply, start, time.perf_counter())
    if len(results) == 2:
      done.set()

  for path in big_bodies:
    threading.Thread(target=big, args=(path,)).start()
  worst, last = 0.0, time.perf_counter()  # the longest gap between two /health answers
  while not done.is_set():
    assert raw(server, "/health")[0] == 200
    worst, last = max(worst, time.perf_counter() - last), time.perf_counter()
    time.sleep(0.02)
  for t in streams:
    t.join()
  (status, body, t0, t1), (chat_status, chat_body, _, _) = results["/tokenize"], results["/v1/chat/completions"]
  body, chat_body = json.loads(body), json.loads(chat_body)
  assert status == 200 and body["count"] > 500_000 and t1 - t0 > 2.0
  assert chat_status == 400 and "max_model_len" in chat_body["error"]["message"]
  gaps = [b - a for times in arrivals for a, b in zip(times, times[1:]) if b > t0 and a < t1]
  assert gaps and all(len(times) > 48 for times in arrivals)
  return worst, gaps, t1 - t0


def test_200_abandoned_requests_free_their_pages_within_seconds(server):
  """200 requests (streamed and not) whose clients hang up within a few seconds: every page is free again soon after
  the last one leaves, and none of them ran on to its 300 tokens (each cancel is applied before the next engine step).
  The proof is the tokens made, not a wall-clock bound: on a loaded machine a step (or a first compilation, the
  server not being warmed up) can hold a cancel back for seconds, and it then makes fewer tokens, not more."""
  import socket

  warm = [threading.Thread(target=raw, args=(server, "/v1/completions", {"prompt": f"Story {i}", "max_tokens": 4}))
          for i in range(16)]  # the programs a full batch steps with, compiled before the clock of the clients starts
  for t in warm:
    t.start()
  for t in warm:
    t.join()
  made = metric(server, "jaxllm_generation_tokens_total")

  def abandon(i):
    body = json.dumps({"prompt": f"Story {i}: once upon a time", "max_tokens": 300, "ignore_eos": True,
                       "stream": i % 2 == 0}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
      s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body)
      time.sleep(0.5 + (i % 20) * 0.1)

  threads = [threading.Thread(target=abandon, args=(i,)) for i in range(200)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert pages_all_free(server, timeout=60)
  engine_idle(server)
  made = metric(server, "jaxllm_generation_tokens_total") - made
  # Run to completion, they would make 200 * 300 tokens (~7,500 steps of 8 sequences); cancelled as their clients
  # leave, what the ~2.5 s of connections allowed (mostly prefills of new arrivals). Measured: 160 on 2 cores.
  assert 0 < made < 200 * 300 / 4, made


def engine_idle(server, timeout=30):
  """Waits until the engine thread has nothing to do and has published its gauges (it owns `num_waiting`: a test
  that sets it while the thread is still finishing a request would be overwritten)."""
  deadline = time.time() + timeout
  while server.loop.scheduler.has_work() and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(0.2)  # its last iteration's gauge refresh
  assert not server.loop.scheduler.has_work()


def test_admission_counts_every_sequence_and_queues_all_or_none(server, client):
  """A request is queued whole or not at all, its prompts x n samples counted against --max_waiting: more samples
  than that is a 400 at once (no seeds drawn for n=200,000), a prompt list with a bad last prompt is a 400 that queued
  nothing, a full queue is a 503 with Retry-After; the server is idle right after each and then serves."""
  deadline = time.time() + 60  # earlier tests' requests may still be finishing
  while (server.loop.queued or server.loop.num_running) and time.time() < deadline:
    time.sleep(0.1)
  assert server.loop.queued == 0 and server.loop.num_running == 0
  t0 = time.perf_counter()
  for body in ({"prompt": "Hi", "max_tokens": 2, "n": 200_000}, {"prompt": ["Hi"] * 600, "max_tokens": 2, "n": 2}):
    status, got = raw(server, "/v1/completions", body)
    assert status == 400 and "(prompts x n); this server queues at most 1024" in got["error"]["message"], got
  assert time.perf_counter() - t0 < 5
  status, got = raw(server, "/v1/completions", {"prompt": [[1, 2], [3, 4], [1, 2, 10**7]], "max_tokens": 64})
  assert status == 400 and "vocabulary" in got["error"]["message"], got
  assert server.loop.queued == 0 and server.loop.num_running == 0 and pages_all_free(server)
  engine_idle(server)
  server.loop.num_waiting = server.loop.max_waiting  # as if --max_waiting sequences were queued: the idle engine's
  try:                                               # 8 free slots still take a burst's first requests (finding 11)
    status, got = raw(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
  finally:
    server.loop.num_waiting = 0
  assert status == 200, got
  engine_idle(server)
  server.loop.num_waiting = server.loop.max_waiting + 8  # and with the free slots spoken for too: a 503
  try:
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/completions", data=b'{"prompt": "Hi"}')
    with pytest.raises(urllib.error.HTTPError) as e:
      urllib.request.urlopen(req, timeout=60)
    _, gauges = raw(server, "/metrics")
  finally:
    server.loop.num_waiting = 0
  assert e.value.code == 503 and e.value.headers["Retry-After"] == "1"  # clients back off and retry
  assert "capacity" in json.loads(e.value.read())["error"]["message"]
  assert "jaxllm_num_requests_waiting 1032.0" in gauges
  assert client.completions.create(model="smollm2", prompt="Hi", max_tokens=2).choices[0].text is not None
  assert server.loop.queued == 0 and pages_all_free(server)


def test_metrics_count_requests_and_tokens(server, client):
  client.completions.create(model="smollm2", prompt="Hi", max_tokens=3, temperature=0)
  status, text = raw(server, "/metrics")
  assert status == 200
  for name in ("jaxllm_requests_total", "jaxllm_generation_tokens_total", "jaxllm_time_to_first_token_seconds",
               "jaxllm_kv_pages_used", "jaxllm_num_requests_waiting", "jaxllm_num_preemptions",
               "jaxllm_engine_step_seconds_count"):
    assert name in text, name
  assert 'jaxllm_requests_total{endpoint="completions",status="200"}' in text
  assert 'jaxllm_kv_pages_total{replica="0"}' in text and 'replica="1"' not in text  # one replica: one series
  assert metric(server, "jaxllm_engine_step_seconds_count") >= 3  # the 3 tokens above took a step each at least
  # labelled by route name: paths a client makes up all count as "unknown", so /metrics cannot grow with them
  for i in range(20):
    assert raw(server, f"/v1/made-up-{i}", {})[0] == 404
  _, after = raw(server, "/metrics")
  assert "made-up" not in after and 'jaxllm_requests_total{endpoint="unknown",status="404"}' in after
  assert len(after.splitlines()) == len(raw(server, "/metrics")[1].splitlines())
  # a paired surrogate escape (an emoji as OpenAI's clients send it) is text
  status, body = raw(server, "/tokenize", b'{"prompt": "\\ud83d\\ude00 ok"}')
  assert status == 200 and body["count"] >= 1, body


def metric(server, name: str) -> float:
  _, text = raw(server, "/metrics")
  return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_tokens_of_a_cancelled_stream_are_counted(server):
  """A streaming client that hangs up mid-answer: the tokens made for it count in generation_tokens, and its prompt in
  prompt_tokens (#19 finding 9)."""
  import http.client
  import socket

  pages_all_free(server)
  before = metric(server, "jaxllm_generation_tokens_total"), metric(server, "jaxllm_prompt_tokens_total")
  conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
  conn.request("POST", "/v1/completions", json.dumps({"prompt": [5, 6, 7, 8], "max_tokens": 400, "stream": True,
                                                      "ignore_eos": True, "temperature": 0}),
               {"Content-Type": "application/json"})
  resp, seen = conn.getresponse(), 0
  while seen < 5:
    seen += resp.readline().startswith(b"data: {")
  conn.sock.shutdown(socket.SHUT_RDWR)  # gone mid-stream (the response still holds the socket: close() alone
  resp.close()                          # would not close it)
  conn.close()
  assert pages_all_free(server)
  made = metric(server, "jaxllm_generation_tokens_total") - before[0]
  assert 5 <= made < 400 and metric(server, "jaxllm_prompt_tokens_total") - before[1] == 4, made


def test_echo_scoring_runs_in_the_engine_and_is_cancelled_on_disconnect(server):
  """Prompt scoring (echo + logprobs, max_tokens 0: lm-eval's loglikelihood requests) goes through the scheduler like
  any request: its sequences count in `running`, and a client that hangs up stops the work at once (#19 finding 8).
  16 prompts of 480 tokens are ~16 engine steps of work; the client leaves once some of it runs. An engine step of
  this size is timed first (one such prompt scored alone), as what the release is held to."""
  import http.client
  import socket

  assert pages_all_free(server)
  sched = server.loop.scheduler
  prompts = [[(7 * i + j) % 5000 + 100 for j in range(480)] for i in range(17)]
  alone = {"prompt": prompts.pop(), "max_tokens": 0, "echo": True, "logprobs": 1}
  raw(server, "/v1/completions", alone)  # compiles what a step of this size needs, if no test did before
  start = time.perf_counter()
  status, one = raw(server, "/v1/completions", alone)
  step = time.perf_counter() - start
  assert status == 200 and len(one["choices"][0]["logprobs"]["token_logprobs"]) == 480
  computed = sched.num_prompt_tokens_computed
  conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
  conn.request("POST", "/v1/completions", json.dumps({"prompt": prompts, "max_tokens": 0, "echo": True,
                                                      "logprobs": 1}), {"Content-Type": "application/json"})
  deadline, running = time.time() + 60, 0.0
  while running == 0 and time.time() < deadline:
    running = metric(server, "jaxllm_num_requests_running")
    time.sleep(0.05)
  assert running > 0
  conn.sock.shutdown(socket.SHUT_RDWR)
  conn.close()
  left = time.perf_counter()
  assert pages_all_free(server, timeout=30)
  # The cancel lands between two steps: a step or two (the one in flight, the one being absorbed) finish first.
  assert time.perf_counter() - left < 2 * step + 1, (time.perf_counter() - left, step)
  assert server.loop.num_running == 0 and server.loop.queued == 0
  assert sched.num_prompt_tokens_computed - computed < 16 * 480 // 2  # most of the work never ran


def test_prefix_cache_hits_show_in_metrics_and_usage(server, client):
  """Hits count in /metrics and in each response's usage.prompt_tokens_details.cached_tokens (the Responses API's
  input_tokens_details); a prompt counts once in usage however many samples read it."""
  system = {"role": "system", "content": "You are a terse assistant. " * 12}  # ~70 tokens: 4 full pages
  before = (metric(server, "jaxllm_prefix_cache_queries_total"), metric(server, "jaxllm_prefix_cache_hits_total"))
  replies = [client.chat.completions.create(model="smollm2", messages=[system, {"role": "user", "content": q}],
                                            max_tokens=4, temperature=0) for q in ("Hi!", "Hello!", "Hi!")]
  queries = metric(server, "jaxllm_prefix_cache_queries_total") - before[0]
  hits = metric(server, "jaxllm_prefix_cache_hits_total") - before[1]
  assert queries > 3 * 70 and hits >= 2 * 64  # the 2nd and 3rd reuse the system prompt's pages
  assert replies[0].choices[0].message.content == replies[2].choices[0].message.content
  cached = [r.usage.prompt_tokens_details.cached_tokens for r in replies]
  assert cached[0] == 0 and 64 <= cached[1] <= cached[2] < replies[2].usage.prompt_tokens and sum(cached) == hits
  assert all(c % 16 == 0 for c in cached), cached  # whole pages
  two = client.chat.completions.create(model="smollm2", messages=[system, {"role": "user", "content": "Hi!"}],
                                       max_tokens=4, temperature=1.0, n=2, seed=1)
  assert two.usage.prompt_tokens == replies[0].usage.prompt_tokens and len(two.choices) == 2
  assert two.usage.prompt_tokens_details.cached_tokens == cached[2]
  streamed = list(client.chat.completions.create(model="smollm2", messages=[system, {"role": "user", "content": "Hi!"}],
                                                 max_tokens=4, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
  assert streamed[-1].usage.prompt_tokens_details.cached_tokens == cached[2]
  r = client.responses.create(model="smollm2", instructions=system["content"], input="Hi!", max_output_tokens=4,
                              temperature=0)
  assert r.usage.input_tokens == replies[0].usage.prompt_tokens
  assert r.usage.input_tokens_details.cached_tokens == cached[2]


def test_concurrent_streams_with_disconnects_all_complete_and_free_every_page(server, default_llm):
  """64 streaming clients at once over 8 slots; every fourth hangs up after its first chunk. The others' text equals
  the same request run alone; afterwards every page is free."""
  import aiohttp

  prompts = [f"Count from {i} to {i + 5}:" for i in range(64)]
  want = {i: o.text for i, o in enumerate(default_llm.generate(
      prompts, SamplingParams(max_tokens=12, temperature=0)))}
  url = f"http://127.0.0.1:{server.port}/v1/completions"

  async def one(session, i):
    body = {"prompt": prompts[i], "max_tokens": 12, "temperature": 0, "stream": True}
    async with session.post(url, json=body) as r:
      assert r.status == 200
      text, done = "", False
      async for line in r.content:
        line = line.decode().strip()
        if not line:
          continue
        payload = line[len("data: "):]
        if payload == "[DONE]":
          done = True
          break
        text += json.loads(payload)["choices"][0]["text"]
        if i % 4 == 3:
          return None  # hang up mid-stream
      assert done
      return text

  async def main():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
      return await asyncio.gather(*(one(session, i) for i in range(64)))

  results = asyncio.run(main())
  for i, text in enumerate(results):
    if i % 4 != 3:
      assert text == want[i], i
  assert pages_all_free(server)
  assert not server.loop.scheduler.requests


def test_sigterm_drains_in_flight_requests_then_exits(tmp_path):
  """A real `jaxllm serve` process: a request in flight when SIGTERM arrives still gets its whole answer; then the
  process exits 0."""
  import os
  import signal
  import socket
  import subprocess
  import sys

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen([sys.executable, "-m", "jaxllm.serving.server", "--model=default", f"--port={port}",
                           "--max_model_len=256", "--max_num_seqs=4", "--nowarmup", "--api_key=sekret"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    ready = proc.stdout.readline()
    assert "ready on" in ready, proc.stderr.read()
    curl = proc.stdout.readline()  # the example it prints asks for the greedy answer
    assert '"temperature": 0' in curl and f"http://127.0.0.1:{port}/v1/chat/completions" in curl
    url = f"http://127.0.0.1:{port}/v1/completions"
    body = json.dumps({"prompt": "Tell me a long story.", "max_tokens": 48, "temperature": 0,
                       "ignore_eos": True}).encode()
    unauth = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
      urllib.request.urlopen(unauth, timeout=60)
    assert e.value.code == 401
    tokenize = f"http://127.0.0.1:{port}/tokenize"
    with pytest.raises(urllib.error.HTTPError) as e:  # behind the key too: unauthenticated work is bounded
      urllib.request.urlopen(urllib.request.Request(tokenize, data=b'{"prompt": "hi"}'), timeout=60)
    assert e.value.code == 401
    for wrong in ("Bearer sekreT", "Basic sekret", "Bearer", "sekret"):
      with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(tokenize, data=b'{"prompt": "hi"}',
                                                      headers={"Authorization": wrong}), timeout=60)
      assert e.value.code == 401, wrong
    # the scheme is case-insensitive (RFC 7235)
    keyed = urllib.request.Request(tokenize, data=b'{"prompt": "hi"}', headers={"Authorization": "bearer sekret"})
    with urllib.request.urlopen(keyed, timeout=60) as r:
      assert json.loads(r.read())["count"] >= 1
    result = {}

    def call():
      req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json",
                                                            "Authorization": "Bearer sekret"})
      with urllib.request.urlopen(req, timeout=300) as r:
        result["body"] = json.loads(r.read())

    t = threading.Thread(target=call)
    t.start()
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGTERM)
    t.join(300)
    assert result["body"]["usage"]["completion_tokens"] == 48
    assert proc.wait(120) == 0
  finally:
    proc.kill()


def test_sigterm_while_warming_up_exits_at_once(tmp_path):
  """SIGTERM during a first start (nothing in the compilation cache: minutes of warmup on 2 cores) stops the process
  within 10 s with exit code 0; warmup logs its progress."""
  import os
  import signal
  import socket
  import subprocess
  import sys

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jit"))
  proc = subprocess.Popen([sys.executable, "-m", "jaxllm.serving.server", "--model=default", f"--port={port}",
                           "--max_model_len=256", "--max_num_seqs=4"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)
  try:
    state, deadline = None, time.time() + 180
    while state != "warming up" and time.time() < deadline and proc.poll() is None:
      try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
      except urllib.error.HTTPError as e:
        state = json.loads(e.read())["status"]
      except OSError:
        pass
      time.sleep(0.1)
    assert state == "warming up", state
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert time.time() - t0 < 10
    _, err = proc.communicate(timeout=10)
  finally:
    proc.kill()
  assert "warmup: bucket 1/" in err and "stopped while warming up" in err, err[-2000:]

