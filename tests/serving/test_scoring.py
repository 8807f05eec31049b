"""Scoring against transformers on the default model: the `jaxllm score` job path and `LLM.score`."""

import json

import numpy as np
import pytest
import torch

from jaxllm.serving import score_job, scoring

UNICODE = ["Café au lait à Paris — très bien, merci !", "東京は日本の首都です。大阪は西にあります。",
           "emoji 🙂🚀 and accents: naïve façade", "def square(x):\n    return x ** 2\n\nprint(square(3))\n",
           "1, 2, 3, 5, 8, 13, 21, 34, 55, 89"]


def corpus() -> str:
  """Fixed English prose and code: docstrings of the standard library, plus a few non-ASCII lines."""
  import argparse
  import collections
  import json as json_mod
  import subprocess
  import textwrap
  import typing
  import unittest

  docs = [m.__doc__ for m in (argparse, collections, json_mod, subprocess, textwrap, typing, unittest)]
  return "\n".join(docs + UNICODE * 3)


def varied_records(n: int, seed: int = 0) -> list[dict]:
  """n records like an eval set's: whole texts (a few words to a few hundred tokens) and (context, continuation)
  pairs cut at word boundaries, some with a context ending in a space, some with an empty context."""
  rng = np.random.default_rng(seed)
  text = corpus()
  spaces = [i for i, ch in enumerate(text) if ch == " "]
  out = []
  for i in range(n):
    start = int(rng.integers(0, len(text) - 1600))
    if i % 2 == 0:
      length = 1100 if i == 0 else int(rng.choice([8, 20, 40, 70]) * rng.uniform(0.7, 1.5))
      out.append({"id": f"t{i}", "text": text[start:start + length]})
    else:
      cut = spaces[int(np.searchsorted(spaces, start + int(rng.integers(0, 120))))]
      ctx = "" if i % 17 == 1 else text[start:cut]
      if i % 5 == 3:
        ctx += " "
      cont = text[cut:cut + int(rng.integers(2, 40))]
      out.append({"id": f"p{i}", "context": ctx, "continuation": cont if cont.strip() else " the end"})
  return out


def lm_eval_split(encode, bos_id, ctx, cont):
  """lm-eval-harness's split of a (context, continuation) pair into token ids, written out independently."""
  n = len(ctx) - len(ctx.rstrip())
  if n:
    ctx, cont = ctx[:-n], ctx[-n:] + cont
  if not ctx:
    return [bos_id], encode(cont)
  whole, c = encode(ctx + cont), encode(ctx)
  return c, whole[len(c):]


def hf_token_logprobs(model, rows):
  """float64 log_softmax of transformers' logits for each row (rows batched by length, right-padded: a causal
  model's logits at real positions do not see the padding)."""
  out = [None] * len(rows)
  order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
  for k in range(0, len(order), 16):
    idx = order[k:k + 16]
    T = max(len(rows[i]) for i in idx)
    batch = torch.zeros((len(idx), T), dtype=torch.long)
    for b, i in enumerate(idx):
      batch[b, :len(rows[i])] = torch.tensor(rows[i])
    with torch.no_grad():
      lp = torch.log_softmax(model(batch).logits.double(), -1).numpy()
    for b, i in enumerate(idx):
      out[i] = lp[b, :len(rows[i])]
  return out


def test_job_matches_transformers_on_varied_records(tmp_path, default_llm, hf_default):
  model, tok = hf_default
  records = varied_records(96)
  src = tmp_path / "in.jsonl"
  src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
  out = tmp_path / "out.jsonl"
  summary = score_job.run(default_llm, score_job.JobConfig(str(src), str(out), num_workers=0, checkpoint_every=64,
                                                           token_logprobs=True))
  got = [json.loads(line) for line in out.read_text().split("\n")[:-1]]
  assert summary["records"] == len(records) == len(got)
  assert [g["line"] for g in got] == list(range(1, len(records) + 1)) and [g["id"] for g in got] == [
      r["id"] for r in records]

  # The token ids come from jaxllm's tokenizer: transformers' GGUF loader gives SmolLM2 a pre-tokenizer without the
  # digit split of SmolLM2's own tokenizer.json (see jaxllm/tokenizer_gguf.py), so the two differ on rare inputs
  # such as two spaces before a digit; the tokenizer is checked on its own in tests/test_tokenizer.py.
  encode = default_llm.tokenizer.encode
  agree = sum(encode(r.get("text", r.get("context", "") + r.get("continuation", ""))) == tok.encode(
      r.get("text", r.get("context", "") + r.get("continuation", ""))) for r in records)
  assert agree >= 0.95 * len(records)
  rows, targets = [], []
  for r in records:
    if "text" in r:
      ids = encode(r["text"])
      rows.append(ids)
      targets.append(1)
    else:
      c, x = lm_eval_split(encode, tok.bos_token_id, r["context"], r["continuation"])
      rows.append(c + x)
      targets.append(len(c))
  lps = hf_token_logprobs(model, rows)
  worst, lengths, checked = 0.0, [], 0
  for r, g, ids, first, lp in zip(records, got, rows, targets, lps):
    if len(ids) - first < 1 or first < 1:  # a one-token text, or a continuation merged into the context's last token
      assert "error" in g, (r, g)
      continue
    checked += 1
    ref = lp[np.arange(first - 1, len(ids) - 1), ids[first:]]
    assert g["num_tokens"] == len(ref), r
    worst = max(worst, abs(g["logprob"] - ref.sum()))
    np.testing.assert_allclose(g["token_logprobs"], ref, atol=1e-3, rtol=0)
    lengths.append(len(ids))
    if "text" in r:
      assert g["perplexity"] == pytest.approx(np.exp(-ref.sum() / len(ref)), rel=1e-3)
    else:  # greedy unless some target's margin over the runner-up is within float32 noise
      top2 = np.sort(lp[np.arange(first - 1, len(ids) - 1)], axis=-1)[:, -2:]
      if np.all(np.abs(top2[:, 1] - top2[:, 0]) > 1e-3):
        assert g["is_greedy"] == bool(np.all(lp[np.arange(first - 1, len(ids) - 1)].argmax(-1) == ids[first:]))
  assert worst <= 1e-3, worst
  assert checked >= 0.95 * len(records) and summary["errors"] == len(records) - checked
  assert min(lengths) <= 4 and max(lengths) >= 250  # the records really vary
  assert summary["padding_fraction"] < 0.35

  # LLM.score is the same path: the same numbers for the same records.
  some = records[:12]
  mine = default_llm.score([r["text"] if "text" in r else (r["context"], r["continuation"]) for r in some])
  for s, g in zip(mine, got):
    assert s.num_tokens == g["num_tokens"]
    assert s.sum_logprob == pytest.approx(g["logprob"], abs=1e-4)


def hf_sliding_window(model, ids, max_length, stride):
  """HF's "Perplexity of fixed-length models" recipe, verbatim in its arithmetic, plus each scored token's logprob."""
  nll_sum, n_tokens, prev_end, token_lps = 0.0, 0, 0, []
  seq = torch.tensor([ids])
  for begin in range(0, len(ids), stride):
    end = min(begin + max_length, len(ids))
    trg_len = end - prev_end
    input_ids = seq[:, begin:end]
    target_ids = input_ids.clone()
    target_ids[:, :-trg_len] = -100
    with torch.no_grad():
      out = model(input_ids, labels=target_ids)
    num_loss_tokens = int((target_ids != -100).sum()) - 1
    nll_sum += float(out.loss) * num_loss_tokens
    n_tokens += num_loss_tokens
    lp = torch.log_softmax(out.logits[0].double(), -1).numpy()
    for t in range(max(prev_end, begin + 1), end):
      token_lps.append(lp[t - begin - 1, ids[t]])
    prev_end = end
    if end == len(ids):
      break
  return float(np.exp(nll_sum / n_tokens)), np.array(token_lps)


def test_sliding_window_perplexity_matches_hf_recipe(default_llm, hf_default):
  model, tok = hf_default
  text = corpus()[:3200]
  ids = tok.encode(text)
  assert len(ids) > 600
  recipe_ppl, ref = hf_sliding_window(model, ids, 256, 128)
  s = default_llm.score(text, max_length=256, stride=128)[0]
  assert s.num_tokens == len(ids) - 1 == len(ref)  # every token after the first, once
  np.testing.assert_allclose(s.logprobs, ref, atol=1e-3, rtol=0)
  assert abs(s.sum_logprob - ref.sum()) <= 1e-2
  assert s.perplexity == pytest.approx(np.exp(-ref.sum() / len(ref)), rel=1e-4)
  # HF's recipe weights each window's mean by one token less than it scores; the difference is that small.
  assert s.perplexity == pytest.approx(recipe_ppl, rel=5e-3)
  # Context matters: disjoint 256-token chunks score the same tokens worse than overlapping windows.
  assert default_llm.score(text, max_length=256, stride=256)[0].perplexity > s.perplexity


# ------------------------------------------------------------------------------------------------ planning (no model)
@pytest.mark.parametrize("n,first,max_len,stride", [(10, 1, 16, 8), (100, 1, 16, 8), (100, 1, 16, 16),
                                                     (101, 1, 16, 5), (37, 1, 8, 1), (50, 40, 16, None)])
def test_windows_score_each_target_once(n, first, max_len, stride):
  item = scoring.Item(np.arange(n, dtype=np.int32), first)
  wins = scoring.windows(item, max_len, stride)
  scored = [t for w in wins for t in range(w.first, w.end)]
  # Disjoint windows (stride == max_len) cannot score a window's first token: it has no context (as in HF's recipe).
  unscored = {w.start for w in wins[1:]} if stride == max_len else set()
  assert scored == [t for t in range(first, n) if t not in unscored]
  for w in wins:
    assert w.end - w.start <= max_len and w.start < w.first
    if stride is not None and w.start > 0:  # past the first window, at least max_len - stride tokens of context
      assert w.first - w.start >= min(max_len - stride, w.first)


def test_too_long_continuation_is_an_error():
  with pytest.raises(ValueError, match="at most max_model_len - 1 = 15"):
    scoring.windows(scoring.Item(np.arange(40, dtype=np.int32), 20), 16, None)
  with pytest.raises(ValueError, match="stride=17"):
    scoring.windows(scoring.Item(np.arange(40, dtype=np.int32), 1), 16, 17)


def test_batch_plan_buckets_by_length():
  rng = np.random.default_rng(0)
  lengths = [int(x) for x in np.clip(rng.lognormal(4, 1, 500), 2, 1024)]
  buckets = (16, 32, 64, 128, 256, 512, 1024)
  padded = {}
  for sort in (True, False):
    plan = scoring.batch_plan(lengths, buckets, 64, 4096, sort)
    rows = sorted(i for _, _, idx in plan for i in idx)
    assert rows == list(range(len(lengths)))
    for R, T, idx in plan:
      assert R & (R - 1) == 0 and len(idx) <= R <= 64 and (R == 1 or R * T <= 4096)
      assert all(lengths[i] <= T for i in idx)
      if sort:
        assert len(idx) == R  # no padding rows
    padded[sort] = 1 - sum(lengths) / sum(R * T for R, T, _ in plan)
  assert padded[True] < 0.3 < padded[False]
