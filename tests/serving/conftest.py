"""The default model behind a real HTTP server on a free loopback port, shared by the server test modules (one load,
one set of compiled programs), and a raw-HTTP helper beside the official `openai` client."""

import json
import time
import urllib.error
import urllib.request

import pytest

from jaxllm.serving.config import EngineConfig
from jaxllm.serving.server import ServerConfig, run_in_thread


def serving(config: ServerConfig):
  """A server of `config` on its own thread, yielded once ready, stopped after."""
  srv, thread, loop, stop = run_in_thread(config)
  deadline = time.time() + 300
  while getattr(srv, "port", None) is None or srv.state != "ready":
    assert srv.state != "failed", srv.load_error
    assert time.time() < deadline, srv.state
    time.sleep(0.2)
  yield srv
  loop.call_soon_threadsafe(stop.set)
  thread.join(60)


@pytest.fixture(scope="session")
def server():
  yield from serving(ServerConfig(model="default", quantization=None, port=0, warmup=False, served_model_name="smollm2",
                                  engine=EngineConfig(max_model_len=512, max_num_seqs=8)))


@pytest.fixture(scope="session")
def client(server):
  from openai import OpenAI

  return OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0, timeout=120)


def raw(server, path, body=None, method=None, headers=None):
  """(status, parsed JSON or text) of one request; `body` bytes are sent as they are."""
  data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
  req = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", data=data, method=method,
                               headers={"Content-Type": "application/json", **(headers or {})})
  try:
    with urllib.request.urlopen(req, timeout=120) as r:
      text = r.read().decode()
      status = r.status
  except urllib.error.HTTPError as e:
    text, status = e.read().decode(), e.code
  try:
    return status, json.loads(text)
  except json.JSONDecodeError:
    return status, text


def pages_all_free(server, timeout=30):
  sched = server.loop.scheduler
  deadline = time.time() + timeout
  while sched.num_pages_held() and time.time() < deadline:
    time.sleep(0.1)
  return sched.num_pages_held() == 0


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  """A tiny random Llama written by transformers' save_pretrained, with SmolLM2's real tokenizer (49,152 ids)."""
  import torch
  import transformers

  from jaxllm import default_model
  from jaxllm.tokenizer import load_tokenizer

  path = tmp_path_factory.mktemp("tiny-smollm-vocab")
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True,
                                    max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                                    bos_token_id=1, eos_token_id=2)
  transformers.LlamaForCausalLM(config).eval().save_pretrained(path)
  load_tokenizer(default_model.gguf_path()).save(path)
  return str(path)
