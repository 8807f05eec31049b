"""Invariances of the tests' generation oracle (`tests/oracle.py`): cached decode == full forward, padding and batch
company change nothing."""

import numpy as np
import pytest
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.layers import Llama
from jaxllm.sampling import SamplingArrays
from tests.oracle import Generator

TOL = 1e-5  # f32


@pytest.fixture(scope="module", params=["tiny-gqa", pytest.param("tiny-mqa", marks=pytest.mark.slow)])
def gen(request):
  config = ModelConfig.from_preset(request.param)
  return Generator(Llama(config, rngs=nnx.Rngs(1)))


def sampling(n, temperature=0.0, top_k=0, top_p=1.0, seeds=None):
  return SamplingArrays.create(n, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=seeds if seeds is not None else np.arange(n))


def never(i, toks):
  return False


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_cached_decode_equals_full_forward(gen, rng):
  prompt = rng.integers(0, 512, size=13).tolist()
  toks, lps = gen.generate([prompt], [20], sampling(1), never, max_len=512)
  full = np.array(prompt + toks[0])
  logits = gen.logits(full[None])[0]
  # Position len(prompt)-1+i predicts generated token i.
  pred = logits[len(prompt) - 1:-1]
  np.testing.assert_array_equal(pred.argmax(-1), toks[0])
  expected = log_softmax(pred.astype(np.float64))[np.arange(20), toks[0]]
  np.testing.assert_allclose(lps[0], expected, atol=TOL, rtol=0)


def test_padding_and_batch_company_do_not_change_results(gen, rng):
  short = rng.integers(0, 512, size=5).tolist()
  others = [rng.integers(0, 512, size=n).tolist() for n in (70, 1, 33)]
  alone_t, alone_lp = gen.generate([short], [12], sampling(1), never, max_len=512)
  batch_t, batch_lp = gen.generate([short] + others, [12, 3, 12, 7], sampling(4), never, max_len=512)
  assert batch_t[0] == alone_t[0]
  np.testing.assert_allclose(batch_lp[0], alone_lp[0], atol=TOL, rtol=0)
  assert [len(t) for t in batch_t] == [12, 3, 12, 7]


def test_score_padding_invariant_and_consistent_with_logits(gen, rng):
  rows = [rng.integers(0, 512, size=n).tolist() for n in (9, 40, 2)]
  chosen, greedy = gen.score(rows)
  for r, c, g in zip(rows, chosen, greedy):
    logits = gen.logits(np.array(r)[None])[0, :-1].astype(np.float64)
    np.testing.assert_allclose(c, log_softmax(logits)[np.arange(len(r) - 1), r[1:]], atol=TOL, rtol=0)
    np.testing.assert_array_equal(g, logits.argmax(-1) == np.array(r[1:]))


def test_seeded_sampling_is_independent_of_batch_company(gen, rng):
  prompt = rng.integers(0, 512, size=8).tolist()
  alone, _ = gen.generate([prompt], [16], sampling(1, temperature=1.0, seeds=[1234]), never, max_len=512)
  other = rng.integers(0, 512, size=30).tolist()
  batched, _ = gen.generate([other, prompt], [16, 16], sampling(2, temperature=1.0, seeds=[7, 1234]), never,
                            max_len=512)
  assert batched[1] == alone[0]
  different, _ = gen.generate([prompt], [16], sampling(1, temperature=1.0, seeds=[99]), never, max_len=512)
  assert different[0] != alone[0]  # 16 tokens from 512 at temperature 1: a collision is vanishingly unlikely


def test_top_k_1_is_greedy_and_stop_fn_ends_a_row(gen, rng):
  prompt = rng.integers(0, 512, size=6).tolist()
  greedy, _ = gen.generate([prompt], [10], sampling(1), never, max_len=512)
  topk1, _ = gen.generate([prompt], [10], sampling(1, temperature=0.7, top_k=1), never, max_len=512)
  assert topk1 == greedy
  stop_at = greedy[0][3]
  stopped, _ = gen.generate([prompt], [10], sampling(1), lambda i, t: t[-1] == stop_at, max_len=512)
  assert stopped[0] == greedy[0][:greedy[0].index(stop_at) + 1]


def test_a_long_row_does_not_cut_the_others_short(gen, rng):
  """A row whose prompt nearly fills max_len finishes early; the others still get their whole budget."""
  long, short = rng.integers(0, 512, size=500).tolist(), rng.integers(0, 512, size=5).tolist()
  toks, _ = gen.generate([long, short], [12, 100], sampling(2), never, max_len=512)
  alone, _ = gen.generate([short], [100], sampling(1), never, max_len=512)
  assert [len(t) for t in toks] == [12, 100]
  assert toks[1] == alone[0]


def test_budget_beyond_max_len_is_rejected(gen):
  with pytest.raises(ValueError, match="max_len"):
    gen.generate([[1] * 60], [5], sampling(1), never, max_len=64)


def test_dropping_a_generator_frees_it():
  import gc
  import weakref

  g = Generator(Llama(ModelConfig.from_preset("tiny-gqa"), rngs=nnx.Rngs(0)))
  g.generate([[1, 2, 3]], [4], sampling(1), never, max_len=64)
  ref = weakref.ref(g)
  del g
  gc.collect()
  assert ref() is None
