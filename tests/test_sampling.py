"""The sampler against the exact filtered distribution computed in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.sampling import SamplingArrays, sample

LOGITS = np.array([2.0, 1.5, 1.2, 1.0, 0.3, 0.0, -0.5, -1.0, -3.0, 0.9], np.float32)
DRAWS = 20000


def exact(logits, temperature, top_k, top_p):
  """vLLM semantics: scale by temperature, keep top-k, then the smallest top set with mass >= top_p, renormalise."""
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
  return p / p.sum()


def draw(temperature, top_k, top_p):
  n = DRAWS
  s = SamplingArrays(temperature=jnp.full(n, temperature, jnp.float32), top_k=jnp.full(n, top_k, jnp.int32),
                     top_p=jnp.full(n, top_p, jnp.float32), seed=jnp.arange(n, dtype=jnp.uint32))
  tokens, logprobs = jax.jit(sample)(jnp.broadcast_to(LOGITS, (n, len(LOGITS))), s, jnp.zeros(n, jnp.int32))
  return np.asarray(tokens), np.asarray(logprobs)


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.6), (0.7, 5, 0.8), (2.0, 0, 0.9),
])
def test_empirical_frequencies_match_exact_distribution(temperature, top_k, top_p):
  tokens, logprobs = draw(temperature, top_k, top_p)
  want = exact(LOGITS, temperature, top_k, top_p)
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
