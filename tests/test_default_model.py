"""The default model (SmolLM2-135M-Instruct Q4_1 GGUF) against transformers loading the very same file."""

import numpy as np
import pytest
import torch

from jaxllm import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea, there lived",
    "Water boils at 100 degrees Celsius. In Fahrenheit, that is",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


def test_logits_match_transformers(default_llm, hf_default):
  model, tok = hf_default
  worst = 0.0
  for prompt in PROMPTS:
    ids = tok.encode(prompt)
    assert ids == default_llm.tokenizer.encode(prompt)
    with torch.no_grad():
      ref = model(torch.tensor([ids])).logits[0].numpy()
    ours = default_llm.logits(np.array([ids]))[0]
    worst = max(worst, float(np.abs(ours - ref).max()))
  assert worst <= 1e-3, worst


def hf_greedy(model, ids, n):
  """transformers' cached greedy decode for exactly n tokens (no EOS rule, unlike generate's min_new_tokens, which
  changes the distribution by banning EOS)."""
  out_ids = []
  with torch.no_grad():
    out = model(torch.tensor([ids]), use_cache=True)
    for _ in range(n):
      nxt = int(out.logits[0, -1].argmax())
      out_ids.append(nxt)
      out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
  return out_ids


def test_greedy_32_tokens_identical_to_transformers(default_llm, hf_default):
  model, tok = hf_default
  prompts = PROMPTS[:3]
  ours = default_llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
  for prompt, out in zip(prompts, ours):
    ref = hf_greedy(model, tok.encode(prompt), 32)
    assert out.token_ids == ref, (prompt, out.text, tok.decode(ref))
    assert out.finish_reason == "length"


def test_chat_answers_paris(default_llm, hf_default):
  _, tok = hf_default
  messages = [{"role": "user", "content": "What is the capital of France?"}]
  assert default_llm.tokenizer.apply_chat_template(messages) == tok.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=True)
  out = default_llm.chat(messages, SamplingParams(max_tokens=32, temperature=0))[0]
  assert out.text == "The capital of France is Paris."
  assert out.finish_reason == "stop" and out.token_ids[-1] in default_llm.tokenizer.eos_ids


def test_score_matches_transformers_log_softmax(default_llm, hf_default):
  model, tok = hf_default
  pairs = [("The capital of France is", " Paris"), ("The capital of France is", " a banana split"),
           ("1, 2, 3, 4,", " 5, 6")]
  scores = default_llm.score(pairs, num_top_logprobs=3)
  for (ctx, cont), s in zip(pairs, scores):
    c, x = tok.encode(ctx), tok.encode(cont)
    with torch.no_grad():
      lp = torch.log_softmax(model(torch.tensor([c + x])).logits[0].double(), -1).numpy()
    rows = np.arange(len(c) - 1, len(c) + len(x) - 1)
    np.testing.assert_allclose(s.logprobs, lp[rows, x], atol=1e-3, rtol=0)
    assert s.is_greedy == bool(all(lp[len(c) - 1 + i].argmax() == t for i, t in enumerate(x)))
    for row, top in zip(rows, s.top_logprobs):  # the 3 likeliest tokens at each scored position, and their logprobs
      assert list(top) == np.argsort(-lp[row])[:3].tolist()
      np.testing.assert_allclose(list(top.values()), np.sort(lp[row])[::-1][:3], atol=1e-3, rtol=0)
  assert scores[0].sum_logprob > scores[1].sum_logprob


def test_stop_strings_and_n_samples(default_llm):
  params = SamplingParams(max_tokens=24, temperature=0, stop=["France"], ignore_eos=True)
  out = default_llm.generate("The capital of France is Paris. The capital of", params)[0]
  full = default_llm.generate("The capital of France is Paris. The capital of",
                              SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
  assert "France" in full.text[1:]  # greedy, so this is fixed; the cut below must happen
  assert out.text == full.text[:full.text.index("France")]
  assert out.finish_reason == "stop" and out.outputs[0].stop_reason == "France"
  many = default_llm.generate("Tell me a story.", SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=5))[0]
  assert len(many.outputs) == 3 and len({tuple(o.token_ids) for o in many.outputs}) > 1
  again = default_llm.generate("Tell me a story.", SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=5))[0]
  assert [o.token_ids for o in again.outputs] == [o.token_ids for o in many.outputs]


def test_stop_rules_apply_to_the_last_allowed_token(default_llm):
  messages = [{"role": "user", "content": "What is the capital of France?"}]
  free = default_llm.chat(messages, SamplingParams(max_tokens=32, temperature=0))[0]
  n = len(free.token_ids)  # ends in EOS
  exact = default_llm.chat(messages, SamplingParams(max_tokens=n, temperature=0))[0]
  assert exact.token_ids == free.token_ids and exact.finish_reason == "stop"
  assert exact.outputs[0].stop_reason == free.token_ids[-1]
  cut = default_llm.chat(messages, SamplingParams(max_tokens=n - 2, temperature=0, stop=["Paris"]))[0]
  assert cut.text == "The capital of France is " and cut.finish_reason == "stop"


def test_stop_string_inside_a_long_token(default_llm):
  """SmolLM2 has an 81-character token ("\n" + 80 spaces): a stop string at its start must still be found."""
  from jaxllm.serving.detokenizer import Detokenizer

  tok = default_llm.tokenizer
  long_id = max(range(tok.vocab_size), key=lambda i: len(tok.decode([i])))
  assert len(tok.decode([long_id])) > 40
  toks = tok.encode("def f():", add_bos=False) + [long_id] + tok.encode("return 1", add_bos=False)
  checker = Detokenizer(tok, frozenset(), ("\n",), stream=False)
  for hit, t in enumerate(toks, 1):
    checker.add(t)
    if checker.finished:
      break
  assert toks[hit - 1] == long_id
  assert checker.text == "def f():"


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(stop=[""]), "stop"),
])
def test_bad_sampling_params(kwargs, message):
  with pytest.raises(ValueError, match=message):
    SamplingParams(**kwargs)


def test_bad_prompts_are_rejected_before_the_device(default_llm):
  with pytest.raises(ValueError, match="empty"):
    default_llm.generate(prompt_token_ids=[[]])
  with pytest.raises(ValueError, match="outside"):
    default_llm.generate(prompt_token_ids=[[1, 2, 10**6]])
  with pytest.raises(ValueError, match="max_model_len"):
    default_llm.generate(prompt_token_ids=[[5] * default_llm.max_model_len])
