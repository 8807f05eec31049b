"""Sampling parameters (the user's request) and the jit-side sampler (per-row arrays, so requests never recompile).

`SamplingParams` follows vLLM's names and defaults. `sample()` takes one row of float32 logits per sequence and that
row's temperature / top-k / top-p / PRNG key; temperature 0 means greedy. Each row's key is derived from the request's
seed and the token position, so a seeded request gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
  """How to pick tokens for one request.

  Attributes:
    n: number of independent samples per prompt.
    max_tokens: at most this many generated tokens.
    temperature: 0 is greedy; otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0 or -1: all).
    top_p: keep the smallest set of tokens whose probability reaches top_p (1.0: all).
    seed: per-request seed; None draws one from the LLM's generator.
    stop: string(s) that end generation; the stop string is not part of the output.
    stop_token_ids: token ids that end generation besides the model's EOS.
    ignore_eos: keep generating past EOS.
  """

  n: int = 1
  max_tokens: int = 16
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int | None = None
  stop: str | list[str] | tuple[str, ...] | None = None
  stop_token_ids: tuple[int, ...] | list[int] | None = None
  ignore_eos: bool = False

  def __post_init__(self):
    def bad(field, value, want):
      raise ValueError(f"SamplingParams.{field}={value!r} is invalid: {want}.")

    if not isinstance(self.n, int) or self.n < 1:
      bad("n", self.n, "must be an integer >= 1")
    if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
      bad("max_tokens", self.max_tokens, "must be an integer >= 1")
    if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < float("inf"):
      bad("temperature", self.temperature, "must be a finite number >= 0")
    if not isinstance(self.top_k, int) or self.top_k < -1:
      bad("top_k", self.top_k, "must be -1, 0 (disabled) or a positive integer")
    if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
      bad("top_p", self.top_p, "must be in (0, 1]")
    if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
      bad("seed", self.seed, "must be a non-negative integer or None")
    stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
    if any(not isinstance(s, str) or not s for s in stops):
      bad("stop", self.stop, "must be a non-empty string or a list of them")
    object.__setattr__(self, "stop", tuple(stops))
    ids = tuple(self.stop_token_ids or ())
    if any(not isinstance(i, int) or i < 0 for i in ids):
      bad("stop_token_ids", self.stop_token_ids, "must be non-negative integers")
    object.__setattr__(self, "stop_token_ids", ids)


@struct.dataclass
class SamplingArrays:
  """Per-row sampling state on device. All [B]."""

  temperature: jax.Array  # float32
  top_k: jax.Array  # int32, 0 = disabled
  top_p: jax.Array  # float32
  seed: jax.Array  # uint32


def sample(logits_BV: jax.Array, s: SamplingArrays, positions_B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns (token ids [B] int32, their logprobs under the unmodified model distribution [B] float32)."""
  logits_BV = logits_BV.astype(jnp.float32)
  logprobs_BV = jax.nn.log_softmax(logits_BV, axis=-1)
  greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

  def filtered_sample(_):
    V = logits_BV.shape[-1]
    scaled = logits_BV / jnp.maximum(s.temperature, 1e-6)[:, None]
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
    threshold = jnp.maximum(kth, pth)
    masked = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    keys = jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.key(seed), pos))(s.seed, positions_B)
    return jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)

  any_sampling = jnp.any(s.temperature > 0)
  sampled_B = jax.lax.cond(any_sampling, filtered_sample, lambda _: greedy_B, None)
  tokens_B = jnp.where(s.temperature > 0, sampled_B, greedy_B)
  return tokens_B, jnp.take_along_axis(logprobs_BV, tokens_B[:, None], axis=-1)[:, 0]
