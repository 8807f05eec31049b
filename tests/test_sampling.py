"""The sampler against the exact filtered distribution computed in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.sampling import SamplingArrays, sample

LOGITS = np.array([2.0, 1.5, 1.2, 1.0, 0.3, 0.0, -0.5, -1.0, -3.0, 0.9], np.float32)
DRAWS = 20000


def exact(logits, temperature, top_k, top_p, min_p=0.0):
  """vLLM semantics: scale by temperature, keep top-k, then the smallest top set with mass >= top_p, then tokens with
  probability >= min_p * the largest, renormalise."""
  z = logits.astype(np.float64) / temperature
  order = np.argsort(-z)
  keep = np.zeros_like(z, bool)
  k = top_k if top_k > 0 else len(z)
  keep[order[:k]] = True
  p = np.where(keep, np.exp(z - z.max()), 0)
  p /= p.sum()
  mass_before = np.cumsum(p[order]) - p[order]
  keep_p = np.zeros_like(keep)
  keep_p[order[mass_before < top_p]] = True
  p = np.where(keep & keep_p, p, 0)
  p = p / p.sum()
  p = np.where(p >= min_p * p.max(), p, 0)
  return p / p.sum()


def draw(temperature, top_k, top_p, min_p=0.0):
  n = DRAWS
  s = SamplingArrays.create(n, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=np.arange(n))
  tokens, logprobs = jax.jit(sample)(jnp.broadcast_to(LOGITS, (n, len(LOGITS))), s, jnp.zeros(n, jnp.int32))
  return np.asarray(tokens), np.asarray(logprobs)


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 0, 1.0, 0.0), (0.5, 0, 1.0, 0.0), (1.0, 3, 1.0, 0.0), (1.0, 0, 0.6, 0.0), (0.7, 5, 0.8, 0.0),
    (2.0, 0, 0.9, 0.0), (1.0, 0, 1.0, 0.3), (1.5, 6, 0.95, 0.2),
])
def test_empirical_frequencies_match_exact_distribution(temperature, top_k, top_p, min_p):
  tokens, logprobs = draw(temperature, top_k, top_p, min_p)
  want = exact(LOGITS, temperature, top_k, top_p, min_p)
  got = np.bincount(tokens, minlength=len(LOGITS)) / DRAWS
  assert np.all(got[want == 0] == 0), "a filtered-out token was sampled"
  tv = 0.5 * np.abs(got - want).sum()
  assert tv < 0.02, (tv, got, want)  # TV of 20k draws from <= 10 outcomes is ~0.01 at most by chance
  # Reported logprobs are those of the unmodified model distribution.
  ref_lp = LOGITS - np.log(np.exp(LOGITS.astype(np.float64)).sum())
  np.testing.assert_allclose(logprobs, ref_lp[tokens], atol=1e-5)


def test_temperature_zero_is_argmax_and_seeds_are_reproducible():
  tokens, _ = draw(0.0, 0, 1.0)
  assert np.all(tokens == LOGITS.argmax())
  a, _ = draw(1.0, 0, 1.0)
  b, _ = draw(1.0, 0, 1.0)
  np.testing.assert_array_equal(a, b)


def test_penalties_bias_and_min_tokens_change_logits_exactly_as_defined():
  from jaxllm.sampling import SamplingParams, TokenHistory, process_logits

  V = len(LOGITS)
  counts = np.zeros((1, V), np.int32)
  counts[0, [0, 4, 6]] = [2, 1, 3]  # generated so far: token 0 twice, 4 once, 6 three times
  in_prompt = np.zeros((1, V), bool)
  in_prompt[0, [1, 6, 8]] = True
  params = SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25,
                          logit_bias={2: 3.0, 9: -100.0}, min_tokens=4, max_tokens=8)
  s = SamplingArrays.from_params([params], [0], [(3, 5)], min_lens=[10 + 4])  # prompt of 10 tokens
  history = TokenHistory(output_counts=counts, in_prompt=in_prompt)
  z = LOGITS.astype(np.float64).copy()
  z[2] += 3.0
  z[9] -= 100.0
  seen = (counts[0] > 0) | in_prompt[0]
  z = np.where(seen, np.where(z > 0, z / 1.3, z * 1.3), z)
  z = z - 0.25 * counts[0] - 0.5 * (counts[0] > 0)
  held = z.copy()
  held[[3, 5]] = -np.inf  # stop ids masked while the position is before prompt + min_tokens
  got = process_logits(jnp.asarray(LOGITS)[None], s, jnp.array([13]), history)
  np.testing.assert_allclose(np.asarray(got)[0], held, rtol=1e-6)
  got = process_logits(jnp.asarray(LOGITS)[None], s, jnp.array([14]), history)  # min_tokens reached
  np.testing.assert_allclose(np.asarray(got)[0], z, rtol=1e-6)
  # Greedy picks the argmax of the processed logits; the reported logprob is the raw model's.
  greedy = s.replace(temperature=np.zeros(1, np.float32), num_logprobs=np.full(1, 3, np.int32))
  tok, lp, top_ids, top_lp = sample(jnp.asarray(LOGITS)[None], greedy, jnp.array([13]), history, num_top=3)
  raw = LOGITS - np.log(np.exp(LOGITS.astype(np.float64)).sum())
  assert int(tok[0]) == int(np.argmax(held)) == 2
  np.testing.assert_allclose(float(lp[0]), raw[2], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(top_ids)[0], np.argsort(-LOGITS)[:3])
  np.testing.assert_allclose(np.asarray(top_lp)[0], np.sort(raw)[::-1][:3], atol=1e-6)
  # No row asking for logprobs: the top-n work is skipped and comes back empty.
  _, _, top_ids, top_lp = sample(jnp.asarray(LOGITS)[None], greedy.replace(num_logprobs=np.zeros(1, np.int32)),
                                 jnp.array([13]), history, num_top=3)
  assert not np.asarray(top_ids).any() and not np.asarray(top_lp).any()


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_p=1.5), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(logit_bias={5: 200.0}), "logit_bias"), (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens"), (dict(logprobs=21), "logprobs"),
])
def test_bad_sampling_params_name_the_field(kwargs, message):
  from jaxllm.sampling import SamplingParams

  with pytest.raises(ValueError, match=f"SamplingParams.{message}="):
    SamplingParams(**kwargs)
