"""`LLM` on the engine: offline batches through the scheduler, n > 1, the progress bar, the KV-cache sizing and
the persistent compilation cache, on a tiny random model (the default model's outputs vs transformers are in
test_default_model)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.config import ModelConfig
from jaxllm.serving.config import EngineConfig
from jaxllm.serving.kv_cache import page_bytes, size_kv_cache

CONFIG = ModelConfig(vocab_size=256, d_model=64, d_ff=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                     max_position_embeddings=256)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A tiny random Llama written by transformers' save_pretrained (no tokenizer: token ids in, token ids out)."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.manual_seed(0)
  hf = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    max_position_embeddings=256, tie_word_embeddings=False))
  d = tmp_path_factory.mktemp("tiny")
  hf.save_pretrained(d)
  return str(d)


@pytest.fixture(scope="module")
def llm(saved):
  return LLM(saved, max_num_seqs=4, max_num_batched_tokens=32)


def test_offline_batch_larger_than_the_slots_comes_back_in_input_order(llm):
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 256, int(n)).tolist() for n in rng.integers(1, 60, 11)]
  lengths = [int(m) for m in rng.integers(1, 20, 11)]
  outs = [llm.generate(prompt_token_ids=[p], sampling_params=SamplingParams(max_tokens=m, temperature=0,
                                                                            ignore_eos=True))[0]
          for p, m in zip(prompts, lengths)]
  # All at once: 11 prompts over 4 slots, each admitted as another finishes; the longest max_tokens decides none.
  batch = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=19, temperature=0,
                                                                                ignore_eos=True))
  for p, m, one, many in zip(prompts, lengths, outs, batch):
    assert many.prompt_token_ids == p
    assert many.token_ids[:m] == one.token_ids and len(many.token_ids) == 19
  # One SamplingParams per prompt, as vLLM takes them: each request stops at its own max_tokens.
  each = llm.generate(prompt_token_ids=prompts, sampling_params=[
      SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in lengths])
  assert [o.token_ids for o in each] == [o.token_ids for o in outs]
  with pytest.raises(ValueError, match="one per prompt"):
    llm.generate(prompt_token_ids=prompts, sampling_params=[SamplingParams()] * 3)
  assert llm.scheduler.num_pages_held() == 0
  assert not llm.scheduler.requests  # finished requests are not kept


def test_n_samples_with_a_seed_are_reproducible_and_independent(llm):
  params = SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=7, ignore_eos=True, logprobs=2)
  a = llm.generate(prompt_token_ids=[[1, 2, 3, 4, 5] * 5], sampling_params=params)[0]
  b = llm.generate(prompt_token_ids=[[9, 9], [1, 2, 3, 4, 5] * 5], sampling_params=params)[1]
  assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
  assert len({tuple(o.token_ids) for o in a.outputs}) == 3
  # The first run computed the prompt (its other samples read the first's pages); the second found its full pages.
  page = llm.engine.config.page_size
  assert (a.num_cached_tokens, b.num_cached_tokens) == (0, 24 // page * page) and b.num_cached_tokens > 0
  assert [o.index for o in a.outputs] == [0, 1, 2]
  for o in a.outputs:  # top-2 logprobs hold the raw distribution's two best; the chosen token's logprob is <= them
    assert len(o.top_logprobs) == 12 and all(len(d) == 2 for d in o.top_logprobs)
    assert all(lp <= max(d.values()) + 1e-6 for lp, d in zip(o.logprobs, o.top_logprobs))


def test_prompt_logprobs_equal_transformers(llm, saved):
  """vLLM's SamplingParams.prompt_logprobs: each prompt token's logprob given those before it, plus the top-n, from
  the engine's prefill chunks (prompts of 70 tokens in <= 32-token chunks), against transformers' log-softmax."""
  import torch
  from transformers import LlamaForCausalLM

  rng = np.random.default_rng(4)
  prompts = [rng.integers(0, 256, n).tolist() for n in (70, 9)]
  outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=2, prompt_logprobs=3))
  hf = LlamaForCausalLM.from_pretrained(saved, torch_dtype=torch.float32)
  for p, out in zip(prompts, outs):
    with torch.no_grad():
      want = torch.log_softmax(hf(torch.tensor([p])).logits[0, :-1].double(), -1).numpy()
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    for pos, d in enumerate(out.prompt_logprobs[1:]):
      top = np.argsort(-want[pos])[:3].tolist()
      assert set(d) == {p[pos + 1], *top}  # the prompt token itself, and the top 3 (vLLM's shape)
      np.testing.assert_allclose([d[t] for t in d], want[pos, list(d)], rtol=0, atol=1e-4)
  plain = llm.generate(prompt_token_ids=prompts[:1], sampling_params=SamplingParams(max_tokens=2))[0]
  assert plain.prompt_logprobs is None


def test_progress_bar_counts_every_sequence(llm, capsys):
  llm.generate(prompt_token_ids=[[1, 2], [3, 4], [5, 6]], sampling_params=SamplingParams(n=2, max_tokens=3),
               use_tqdm=True)
  err = capsys.readouterr().err
  assert "6/6" in err and "Generating" in err
  llm.generate(prompt_token_ids=[[1, 2]], sampling_params=SamplingParams(max_tokens=3))  # not a terminal: no bar
  assert "Generating" not in capsys.readouterr().err


def test_a_bad_prompt_queues_nothing(llm):
  with pytest.raises(ValueError, match="prompt_token_ids\\[1\\].*outside"):
    llm.generate(prompt_token_ids=[[1, 2], [1, 999]])
  assert not llm.scheduler.has_work()


def test_the_layout_defaults_to_what_the_mesh_names(saved):
  assert LLM(saved, mesh="data=1").layout == "dp" and LLM(saved, mesh="model=1").layout == "tp"
  assert LLM(saved).layout == "tp"
  with pytest.raises(ValueError, match="mesh axis 'model'"):  # a layout asked for is taken as asked
    LLM(saved, mesh="data=1", layout="tp")


def test_engine_settings_have_one_carrier(saved):
  with pytest.raises(ValueError, match="unknown engine setting 'max_num_seq' \\(did you mean 'max_num_seqs'\\?\\)"):
    LLM(saved, max_num_seq=4)
  with pytest.raises(ValueError, match="max_model_len=300 exceeds the model's context length 256"):
    LLM(saved, max_model_len=300)
  with pytest.raises(ValueError, match="not both"):
    LLM(saved, engine_config=EngineConfig(), max_num_seqs=2)
  with pytest.raises(ValueError, match="max_num_batched_tokens=8 must be at least max_num_seqs=16"):
    EngineConfig(max_num_seqs=16, max_num_batched_tokens=8)


def test_kv_cache_is_sized_from_a_memory_budget():
  ec = EngineConfig(max_model_len=256, max_num_seqs=4, page_size=16)
  per_page = page_bytes(ec, CONFIG, "float32")
  assert per_page == 2 * 2 * 2 * 16 * 16 * 4  # K and V, 2 layers, 2 KV heads, 16 tokens, head dim 16, f32
  assert size_kv_cache(ec, CONFIG, "float32") == ec.pages_wanted  # 0.5 of free RAM holds more than all slots need
  assert size_kv_cache(EngineConfig(max_model_len=256, num_pages=40), CONFIG, "float32") == 40
  with pytest.raises(ValueError, match="fewer than one sequence of max_model_len=256"):
    size_kv_cache(EngineConfig(max_model_len=256, kv_cache_memory_fraction=1e-12), CONFIG, "float32")
  # An explicit pool too small for one sequence (a sequence that fills it would preempt itself forever): refused too.
  assert size_kv_cache(EngineConfig(max_model_len=256, page_size=16, num_pages=17), CONFIG, "float32") == 17
  with pytest.raises(ValueError, match=r"num_pages=16 leaves 15 pages .* needs \(16\); raise num_pages to at least 17"):
    size_kv_cache(EngineConfig(max_model_len=256, page_size=16, num_pages=16), CONFIG, "float32")
  with pytest.raises(ValueError, match="kv_cache_memory_fraction=1.5"):
    EngineConfig(max_model_len=256, kv_cache_memory_fraction=1.5)
  # A quantized cache: 1 byte per element plus a float32 scale per token and KV head.
  assert page_bytes(ec, CONFIG, "int8") == page_bytes(ec, CONFIG, "float8_e4m3fn") == 2 * 2 * 2 * 16 * (16 + 4)
  with pytest.raises(ValueError, match="kv_cache_dtype='int4' is not supported; choose auto, int8, fp8"):
    EngineConfig(kv_cache_dtype="int4")


def test_quantized_kv_cache_holds_about_twice_the_pages_of_bfloat16():
  """The same memory budget for SmolLM2's shape (H = 64): int8 / fp8 pages cost (64 + 4) / 128 of bfloat16's."""
  mc = ModelConfig.from_preset("smollm2-135m")
  ec = EngineConfig(max_model_len=2048, max_num_seqs=256, kv_cache_memory_fraction=0.05)
  bf16 = size_kv_cache(ec, mc, "bfloat16")
  for dtype in ("int8", "float8_e4m3fn"):
    assert page_bytes(ec, mc, "bfloat16") / page_bytes(ec, mc, dtype) == 128 / 68
    assert size_kv_cache(ec, mc, dtype) / bf16 == pytest.approx(128 / 68, rel=0.02)  # free RAM read twice


def test_compilation_cache_dir_is_reused_by_a_second_process(saved, tmp_path):
  """The second process loads every program the first compiled (jax counts the hits) and compiles nothing new."""
  script = f"""
import jax, json
hits = []
jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name))
from jaxllm import LLM, SamplingParams
llm = LLM({saved!r}, max_num_seqs=2, compilation_cache_dir={str(tmp_path / 'cache')!r})
out = llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=SamplingParams(max_tokens=5, temperature=0))
print(json.dumps([hits.count('/jax/compilation_cache/cache_hits'), hits.count('/jax/compilation_cache/cache_misses'),
                  out[0].token_ids]))
"""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT") and k != "JAX_COMPILATION_CACHE_DIR"}
  runs = [json.loads(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                    check=True).stdout.strip().splitlines()[-1]) for _ in range(2)]
  (hits1, misses1, toks1), (hits2, misses2, toks2) = runs
  assert misses1 > 0 and os.listdir(tmp_path / "cache")
  assert hits2 >= misses1 and misses2 == 0
  assert toks1 == toks2


def test_stream_yields_what_generate_returns_and_frees_pages_when_left_early(llm, rng):
  prompt = rng.integers(3, 256, 23).tolist()
  for params in (SamplingParams(max_tokens=19, temperature=0, ignore_eos=True),
                 SamplingParams(max_tokens=19, temperature=0.9, top_k=20, seed=11, ignore_eos=True)):
    want = llm.generate(prompt_token_ids=[prompt], sampling_params=params)[0].outputs[0]
    chunks = list(llm.stream(prompt, params))
    assert [t for c in chunks for t in c.token_ids] == want.token_ids
    assert len(chunks) == 19  # token by token: one chunk per engine step
    assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
  held = llm.scheduler.num_pages_held()
  for chunk in llm.stream(prompt, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)):
    break  # a notebook user interrupting: the request is cancelled and its pages come back
  assert llm.scheduler.num_pages_held() == held and not llm.scheduler.requests
  with pytest.raises(ValueError, match="n > 1"):
    next(llm.stream(prompt, SamplingParams(n=2)))
  with pytest.raises(ValueError, match="takes a text, a conversation"):
    next(llm.stream({"role": "user"}))
