"""The sampler as it was before its fast paths: `process_logits` and `sample` copied verbatim from jaxllm/sampling.py
(names suffixed `_reference`; the filter thresholds' sort in `threshold_reference`). It always builds the full [B, V]
log_softmax, applies bias, penalties and the min_tokens mask unconditionally and sorts the whole vocabulary whenever
a row samples. tests/test_sampling.py asserts the fast sampler picks the same tokens (and logprobs within float32
rounding); benchmarks/sampler.py times both."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.sampling import SamplingArrays, TokenHistory


def process_logits_reference(logits_BV, s: SamplingArrays, positions_B, history: TokenHistory | None = None):
  """Bias, penalties and the min_tokens mask applied to float32 logits (the distribution the token is drawn from)."""
  B, V = logits_BV.shape
  rows_B1 = jnp.arange(B)[:, None]
  bias = jnp.where(s.bias_ids >= 0, s.bias_values, 0.0)
  logits_BV = logits_BV.at[rows_B1, jnp.where(s.bias_ids >= 0, s.bias_ids, V)].add(bias, mode="drop")
  if history is not None:
    counts = history.output_counts
    seen = (counts > 0) | history.in_prompt
    rp = s.repetition_penalty[:, None]
    logits_BV = jnp.where(seen, jnp.where(logits_BV > 0, logits_BV / rp, logits_BV * rp), logits_BV)
    logits_BV = (logits_BV - s.frequency_penalty[:, None] * counts
                 - s.presence_penalty[:, None] * (counts > 0).astype(jnp.float32))
  hold = (positions_B < s.min_len)[:, None] & (s.stop_ids >= 0)
  return logits_BV.at[rows_B1, jnp.where(hold, s.stop_ids, V)].set(-jnp.inf, mode="drop")


def threshold_reference(scaled, s: SamplingArrays):
  """The smallest scaled logit each row keeps after top-k, top-p (over the top-k survivors) and min-p, [B, 1], read
  off the whole sorted vocabulary."""
  V = scaled.shape[-1]
  sorted_desc = -jnp.sort(-scaled, axis=-1)
  # top-k: everything below the k-th largest logit goes.
  k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, V), V)
  kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
  # top-p over the top-k survivors: keep a sorted token while the mass before it is < top_p.
  sorted_masked = jnp.where(jnp.arange(V)[None] < k[:, None], sorted_desc, -jnp.inf)
  probs = jax.nn.softmax(sorted_masked, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = (mass_before < s.top_p[:, None]) | (s.top_p[:, None] >= 1.0)  # f32 cumsum can reach 1 early
  n_keep = jnp.maximum(jnp.sum(keep_sorted, axis=-1), 1)
  pth = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)
  # min-p over the survivors (vLLM applies it last): p >= min_p * p_max  <=>  z >= z_max + log(min_p).
  log_min_p = jnp.log(jnp.maximum(s.min_p, 1e-30))[:, None]
  mth = jnp.where(s.min_p[:, None] > 0, sorted_desc[:, :1] + log_min_p, -jnp.inf)
  return jnp.maximum(jnp.maximum(kth, pth), mth)


def sample_reference(logits_BV: jax.Array, s: SamplingArrays, positions_B: jax.Array,
                     history: TokenHistory | None = None, num_top: int = 0):
  """-> (token ids [B] int32, their logprobs [B] float32) and, with num_top > 0, (top ids [B, num_top], top logprobs
  [B, num_top]) of the unmodified model distribution. `positions_B` is the position of the token being chosen."""
  logits_BV = logits_BV.astype(jnp.float32)
  logprobs_BV = jax.nn.log_softmax(logits_BV, axis=-1)
  z_BV = process_logits_reference(logits_BV, s, positions_B, history)
  greedy_B = jnp.argmax(z_BV, axis=-1).astype(jnp.int32)

  def filtered_sample(_):
    scaled = z_BV / jnp.maximum(s.temperature, 1e-6)[:, None]
    threshold = threshold_reference(scaled, s)
    masked = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    keys = jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.key(seed), pos))(s.seed, positions_B)
    return jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)

  any_sampling = jnp.any(s.temperature > 0)
  sampled_B = jax.lax.cond(any_sampling, filtered_sample, lambda _: greedy_B, None)
  tokens_B = jnp.where(s.temperature > 0, sampled_B, greedy_B)
  chosen_B = jnp.take_along_axis(logprobs_BV, tokens_B[:, None], axis=-1)[:, 0]
  if not num_top:
    return tokens_B, chosen_B
  B = logprobs_BV.shape[0]
  top_lp, top_ids = jax.lax.cond(
      jnp.any(s.num_logprobs > 0), lambda x: tuple(jax.lax.top_k(x, num_top)),
      lambda x: (jnp.zeros((B, num_top), x.dtype), jnp.zeros((B, num_top), jnp.int32)), logprobs_BV)
  return tokens_B, chosen_B, top_ids.astype(jnp.int32), top_lp
