"""Sampling parameters (the user's request) and the jit-side sampler (per-row arrays, so requests never recompile).

`SamplingParams` follows vLLM's names, defaults and semantics. `SamplingArrays` holds one row per sequence (slot) of
every setting the device needs. `sample()` turns a row of float32 logits into a token:

    logits --logit_bias--> --repetition / presence / frequency penalties (given the row's token history)-->
    --min_tokens: stop ids masked--> greedy argmax (temperature 0) | /temperature -> top-k -> top-p -> min-p -> draw

Each row's PRNG key is fold_in(key(seed), position): a seeded request gives the same tokens whatever else is in the
batch. The logprob reported for a token (and the top-n alternatives) is that of the unmodified model distribution, as
vLLM reports by default.

A batch whose rows are all greedy with nothing to apply (`SamplingArrays.bare`: no bias, penalty, pending min_tokens
or logprobs) is just the logits' argmax (`greedy()`); the host knows that from the rows' settings and compiles it as
its own program, with no conditional (XLA:GPU reads every conditional's predicate back to the host and waits).
In `sample()`, a stage no row of the batch uses is skipped at run time (`lax.cond`), so a temperature-only batch
does one pass of the [B, V] logits plus the draw: no [B, V] log_softmax unless top-n logprobs are asked for, no
history read without penalties, and the filter thresholds come from the row maximum (min-p only) or from binary
searches over the float order (top-k's k-th largest value by counting, top-p's cut by summing probabilities), never a
sort of the vocabulary. Each path picks the tokens of the straightforward sampler (tests/sampler_oracle.py: a full
sort) for the same seeds; top-p can differ only where a partial mass lies within float32 rounding of top_p, as the
two sum the same probabilities in different orders.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxllm.structured_outputs import StructuredOutputsParams

MAX_LOGIT_BIAS = 64  # entries of logit_bias per request (a fixed width, so a request never recompiles)
MAX_STOP_IDS = 16  # stop token ids masked until min_tokens, per request
MAX_LOGPROBS = 20  # top-n logprobs a request may ask for (vLLM's default max_logprobs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
  """How to pick tokens for one request.

  Attributes:
    n: number of independent samples per prompt.
    max_tokens: at most this many generated tokens.
    temperature: 0 is greedy; otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0 or -1: all).
    top_p: keep the smallest set of tokens whose probability reaches top_p (1.0: all).
    min_p: drop tokens whose probability is below min_p times the most likely token's (0: off).
    repetition_penalty: > 1 discourages tokens already in the prompt or output (CTRL's rule: positive logits divided
      by it, negative ones multiplied); 1: off.
    presence_penalty: subtracted once from the logit of every token already generated, in [-2, 2].
    frequency_penalty: subtracted per occurrence from the logit of every token already generated, in [-2, 2].
    logit_bias: {token id: bias} added to the logits (at most MAX_LOGIT_BIAS entries, each in [-100, 100]).
    seed: per-request seed; None draws one from the LLM's generator.
    stop: string(s) that end generation; the stop string is not part of the output.
    stop_token_ids: token ids that end generation besides the model's EOS (the ending token is not in the text).
    ignore_eos: keep generating past EOS.
    min_tokens: EOS and stop_token_ids cannot be generated before this many tokens, and a stop string must end
      after their text.
    logprobs: also return the top-n logprobs (0..MAX_LOGPROBS) of each generated position; None: off.
    prompt_logprobs: also return each prompt token's logprob given the tokens before it, with the top-n
      (0..MAX_LOGPROBS) tokens there (vLLM's `prompt_logprobs`; the first token has none); None: off. Computed in the
      engine's steps, by the prefill chunks themselves; such a request computes its whole prompt (no cached prefix).
    structured_outputs: constrain the output to a JSON schema, regex, choice or grammar
      (`jaxllm.structured_outputs.StructuredOutputsParams`, or a dict of its fields); None: free text.
  """

  n: int = 1
  max_tokens: int = 16
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  repetition_penalty: float = 1.0
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  logit_bias: dict[int, float] | None = None
  seed: int | None = None
  stop: str | list[str] | tuple[str, ...] | None = None
  stop_token_ids: tuple[int, ...] | list[int] | None = None
  ignore_eos: bool = False
  min_tokens: int = 0
  logprobs: int | None = None
  prompt_logprobs: int | None = None
  structured_outputs: StructuredOutputsParams | None = None

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
    if not _number(self.min_p) or not 0 <= self.min_p <= 1:
      bad("min_p", self.min_p, "must be in [0, 1]")
    if not _number(self.repetition_penalty) or not 0 < self.repetition_penalty < float("inf"):
      bad("repetition_penalty", self.repetition_penalty, "must be a finite number > 0")
    for name in ("presence_penalty", "frequency_penalty"):
      value = getattr(self, name)
      if not _number(value) or not -2 <= value <= 2:
        bad(name, value, "must be in [-2, 2]")
    bias = dict(self.logit_bias or {})
    if len(bias) > MAX_LOGIT_BIAS:
      bad("logit_bias", f"<{len(bias)} entries>", f"may hold at most {MAX_LOGIT_BIAS} entries")
    for tok, b in bias.items():
      if not _int(tok) or tok < 0 or not _number(b) or not -100 <= b <= 100:
        bad("logit_bias", {tok: b}, "maps non-negative token ids to biases in [-100, 100]")
    object.__setattr__(self, "logit_bias", {int(t): float(b) for t, b in bias.items()})
    if not _int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
      bad("min_tokens", self.min_tokens, f"must be an integer in [0, max_tokens={self.max_tokens}]")
    for name in ("logprobs", "prompt_logprobs"):
      value = getattr(self, name)
      if value is not None and (not _int(value) or not 0 <= value <= MAX_LOGPROBS):
        bad(name, value, f"must be None or an integer in [0, {MAX_LOGPROBS}]")
    if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
      bad("seed", self.seed, "must be a non-negative integer or None")
    stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
    if any(not isinstance(s, str) or not s for s in stops):
      bad("stop", self.stop, "must be a non-empty string or a list of them")
    object.__setattr__(self, "stop", tuple(stops))
    ids = tuple(self.stop_token_ids or ())
    if any(not isinstance(i, int) or i < 0 for i in ids) or len(ids) > MAX_STOP_IDS - 2:
      bad("stop_token_ids", self.stop_token_ids, f"must be at most {MAX_STOP_IDS - 2} non-negative integers")
    object.__setattr__(self, "stop_token_ids", ids)
    if isinstance(self.structured_outputs, dict):
      object.__setattr__(self, "structured_outputs", StructuredOutputsParams(**self.structured_outputs))
    elif self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
      bad("structured_outputs", self.structured_outputs, "must be a StructuredOutputsParams, a dict or None")

  @property
  def uses_penalties(self) -> bool:
    """Whether a repetition, presence or frequency penalty is on (the token history is read)."""
    return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

  def check_vocab(self, vocab_size: int) -> None:
    """Token ids the request names must exist in the model's vocabulary."""
    for field, ids in (("logit_bias", list(self.logit_bias)), ("stop_token_ids", list(self.stop_token_ids))):
      bad = [i for i in ids if i >= vocab_size]
      if bad:
        raise ValueError(f"SamplingParams.{field} names token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}.")


def _int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _number(x) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


@struct.dataclass
class SamplingArrays:
  """Per-row sampling settings on device: every field has a leading [B] axis."""

  temperature: jax.Array  # float32; 0 = greedy
  top_k: jax.Array  # int32; 0 = off
  top_p: jax.Array  # float32; 1 = off
  min_p: jax.Array  # float32; 0 = off
  repetition_penalty: jax.Array  # float32; 1 = off
  presence_penalty: jax.Array  # float32
  frequency_penalty: jax.Array  # float32
  seed: jax.Array  # uint32
  bias_ids: jax.Array  # [B, MAX_LOGIT_BIAS] int32; -1 = unused
  bias_values: jax.Array  # [B, MAX_LOGIT_BIAS] float32
  stop_ids: jax.Array  # [B, MAX_STOP_IDS] int32, masked while position < min_len; -1 = unused
  min_len: jax.Array  # int32 absolute position before which stop_ids cannot be sampled (prompt len + min_tokens)
  num_logprobs: jax.Array  # int32 top-n logprobs the row asked for (0: none; the top-n work is skipped if no row asks)

  @classmethod
  def create(cls, n: int, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
             presence_penalty=0.0, frequency_penalty=0.0, seed=0) -> "SamplingArrays":
    """n rows of the same settings as numpy arrays (a scalar or an [n] array per field); no bias, no min_tokens."""
    full = lambda v, dt: np.broadcast_to(np.asarray(v, dt), (n,)).copy()  # noqa: E731
    return cls(temperature=full(temperature, np.float32), top_k=full(top_k, np.int32), top_p=full(top_p, np.float32),
               min_p=full(min_p, np.float32), repetition_penalty=full(repetition_penalty, np.float32),
               presence_penalty=full(presence_penalty, np.float32),
               frequency_penalty=full(frequency_penalty, np.float32), seed=full(seed, np.uint32),
               bias_ids=np.full((n, MAX_LOGIT_BIAS), -1, np.int32),
               bias_values=np.zeros((n, MAX_LOGIT_BIAS), np.float32),
               stop_ids=np.full((n, MAX_STOP_IDS), -1, np.int32), min_len=np.zeros((n,), np.int32),
               num_logprobs=np.zeros((n,), np.int32))

  @classmethod
  def from_params(cls, params: list[SamplingParams], seeds: list[int], stop_ids: list[tuple[int, ...]],
                  min_lens: list[int]) -> "SamplingArrays":
    """One row per request: `seeds` resolved by the caller, `stop_ids` the ids min_tokens holds back (EOS unless
    ignore_eos, plus stop_token_ids), `min_lens` the absolute position min_tokens reaches."""
    n = len(params)
    out = cls.create(n, temperature=[p.temperature for p in params], top_k=[max(p.top_k, 0) for p in params],
                     top_p=[p.top_p for p in params], min_p=[p.min_p for p in params],
                     repetition_penalty=[p.repetition_penalty for p in params],
                     presence_penalty=[p.presence_penalty for p in params],
                     frequency_penalty=[p.frequency_penalty for p in params], seed=np.asarray(seeds, np.uint64))
    for i, p in enumerate(params):
      for j, (tok, b) in enumerate(p.logit_bias.items()):
        out.bias_ids[i, j], out.bias_values[i, j] = tok, b
      ids = tuple(stop_ids[i])[:MAX_STOP_IDS]
      out.stop_ids[i, :len(ids)] = ids
      out.min_len[i] = min_lens[i] if p.min_tokens else 0
      out.num_logprobs[i] = p.logprobs or 0
    return out

  def uses_penalties(self) -> jax.Array:
    """[B] bool: the rows that read the token history (a repetition, presence or frequency penalty is on)."""
    return (self.repetition_penalty != 1) | (self.presence_penalty != 0) | (self.frequency_penalty != 0)

  def bare(self, positions_B) -> jax.Array:
    """[B] bool: the rows whose token is the argmax of the model's logits with nothing else to compute (greedy; no
    bias, penalty, logprobs, or stop ids held back by min_tokens at `positions_B`, the positions being sampled).
    numpy in, numpy out: the host decides with it which program a step runs (see `greedy`)."""
    holding = ((positions_B < self.min_len)[:, None] & (self.stop_ids >= 0)).any(axis=-1)
    return ((self.temperature <= 0) & (self.bias_ids < 0).all(axis=-1) & (self.num_logprobs == 0) & ~holding
            & ~self.uses_penalties())


@struct.dataclass
class TokenHistory:
  """What the penalties read, per row: output token counts and which tokens the prompt holds."""

  output_counts: jax.Array  # [B, V] int32
  in_prompt: jax.Array  # [B, V] bool


def apply_if(pred, fn, x):
  """fn(x) where `pred`, else x, for a cheap fn (masked scatters) whose result is as good as x when pred is False.
  A conditional on CPU and TPU; on GPU fn always: XLA:GPU reads a conditional's predicate back to the host and
  waits for it (~0.1 ms apiece on an H200, benchmarks/RESULTS.md), and the host cannot queue the next step meanwhile."""
  return jax.lax.platform_dependent(x, default=lambda y: jax.lax.cond(pred, fn, lambda z: z, y), cuda=fn, rocm=fn)


def process_logits(logits_BV, s: SamplingArrays, positions_B, history: TokenHistory | None = None,
                   history_rows_B: jax.Array | None = None):
  """Bias, penalties and the min_tokens mask applied to float32 logits (the distribution the token is drawn from).

  Each stage runs under a `lax.cond` on whether any row uses it (`apply_if`: always on GPU), so a batch without
  biases, penalties or a pending min_tokens pays nothing for them; a skipped stage is the identity (a zero bias, a
  penalty of 1 / 0 and an empty mask change no logit). With `history_rows_B`, row b reads history row
  history_rows_B[b] of a larger table (e.g. the engine's [max_num_seqs, V] state); the gather happens inside the
  penalty branch only.
  """
  B, V = logits_BV.shape
  rows_B1 = jnp.arange(B)[:, None]
  if history is not None and history_rows_B is None and history.output_counts.shape[0] != B:
    raise ValueError(f"history has {history.output_counts.shape[0]} rows for a batch of {B}: pass history_rows_B "
                     "to say which history row each batch row reads.")

  def add_bias(z_BV):
    bias = jnp.where(s.bias_ids >= 0, s.bias_values, 0.0)
    return z_BV.at[rows_B1, jnp.where(s.bias_ids >= 0, s.bias_ids, V)].add(bias, mode="drop")

  def penalize(z_BV):
    counts, in_prompt = history.output_counts, history.in_prompt
    if history_rows_B is not None:
      counts, in_prompt = counts[history_rows_B], in_prompt[history_rows_B]
    seen = (counts > 0) | in_prompt
    rp = s.repetition_penalty[:, None]
    z_BV = jnp.where(seen, jnp.where(z_BV > 0, z_BV / rp, z_BV * rp), z_BV)
    return (z_BV - s.frequency_penalty[:, None] * counts
            - s.presence_penalty[:, None] * (counts > 0).astype(jnp.float32))

  hold = (positions_B < s.min_len)[:, None] & (s.stop_ids >= 0)

  def mask_stops(z_BV):
    return z_BV.at[rows_B1, jnp.where(hold, s.stop_ids, V)].set(-jnp.inf, mode="drop")

  logits_BV = apply_if(jnp.any(s.bias_ids >= 0), add_bias, logits_BV)
  if history is not None:
    logits_BV = apply_if(jnp.any(s.uses_penalties()), penalize, logits_BV)
  return apply_if(jnp.any(hold), mask_stops, logits_BV)


def _min_p_threshold(s: SamplingArrays, max_B1):
  """min-p (vLLM applies it last): p >= min_p * p_max  <=>  z >= z_max + log(min_p); -inf where min_p is off."""
  return jnp.where(s.min_p[:, None] > 0, max_B1 + jnp.log(jnp.maximum(s.min_p, 1e-30))[:, None], -jnp.inf)


def _effective_top_k(s: SamplingArrays, V: int):
  return jnp.where(s.top_k > 0, jnp.minimum(s.top_k, V), V)


def filter_path(s: SamplingArrays, V: int):
  """How the batch's filter thresholds are found (an int32 scalar, see _threshold_B1): 0 by_max when no sampling row
  uses top-k or top-p, 1 by_search otherwise. Greedy rows' settings do not count."""
  k_B = _effective_top_k(s, V)
  free_B = (s.temperature <= 0) | ((k_B == V) & (s.top_p >= 1))
  return jnp.where(jnp.all(free_B), 0, 1).astype(jnp.int32)


def _float_key(x):
  """float32 -> uint32 in the floats' order (-inf lowest, +inf highest; -0.0 one step below +0.0)."""
  i = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.where(i >> 31 == 1, ~i, i | jnp.uint32(0x80000000))


def _key_float(k):
  """_float_key's inverse."""
  return jax.lax.bitcast_convert_type(jnp.where(k >> 31 == 1, k & jnp.uint32(0x7FFFFFFF), ~k), jnp.float32)


SEARCH_STEPS = 32  # halvings of a uint32 key range: every row's search ends on one key


def _kth_largest(scaled_BV, k_B, max_B1):
  """Each row's k-th largest value, exactly (the sort's sorted[k - 1]): the largest value v with at least k values
  >= v, found by halving the float-ordered key range [min, max] SEARCH_STEPS times, each step one counting pass."""
  lo = _float_key(jnp.min(scaled_BV, axis=-1))  # at least k values >= the minimum
  hi = _float_key(max_B1[:, 0])
  for _ in range(SEARCH_STEPS):
    mid = lo + ((hi - lo + 1) >> 1)
    # Counted as a float32 sum (exact below 2^24 entries): XLA:CPU reduces it 4x faster than an int32 count.
    ok = jnp.sum(jnp.where(scaled_BV >= _key_float(mid)[:, None], 1.0, 0.0), axis=-1) >= k_B
    lo, hi = jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
  return _key_float(lo)[:, None]


def _top_p_cut(scaled_BV, s: SamplingArrays, k_B, kth_B1, max_B1):
  """Each row's top-p cut over its top-k survivors: the smallest value v (>= kth) such that the probability of the
  tokens strictly more likely than v is < top_p, found by halving the key range [kth, max] SEARCH_STEPS times, each
  step one masked sum. Keeping every value >= it keeps the sort's set: a sorted token is kept while the mass before
  it is < top_p, and the mass before the first of equal values is that of the strictly larger ones. The probabilities
  are the sort's softmax over the top-k survivors, ties at kth counted only up to k; -inf where top_p >= 1."""
  e_BV = jnp.exp(scaled_BV - max_B1)
  above_BV = scaled_BV > kth_B1
  ties_B = k_B - jnp.sum(above_BV, axis=-1)  # copies of kth among the k survivors (>= 1)
  total_B1 = (jnp.sum(jnp.where(above_BV, e_BV, 0.0), axis=-1) + ties_B * jnp.exp(kth_B1 - max_B1)[:, 0])[:, None]
  p_BV = jnp.where(above_BV, e_BV / total_B1, 0.0)
  lo, hi = _float_key(kth_B1[:, 0]), _float_key(max_B1[:, 0])  # nothing is more likely than the maximum
  for _ in range(SEARCH_STEPS):
    mid = lo + ((hi - lo) >> 1)
    ok = jnp.sum(jnp.where(scaled_BV > _key_float(mid)[:, None], p_BV, 0.0), axis=-1) < s.top_p
    lo, hi = jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)
  return jnp.where(s.top_p[:, None] >= 1.0, -jnp.inf, _key_float(lo)[:, None])


def _threshold_B1(scaled_BV, s: SamplingArrays):
  """The smallest scaled logit each row keeps after top-k, top-p (over the top-k survivors) and min-p, [B, 1].

  Drawing from where(scaled >= threshold, scaled, -inf) is vLLM's filtered distribution, as a full sort of the
  vocabulary finds it (tests/sampler_oracle.py), without the sort, in one of two ways picked per batch at run time
  (filter_path):
    by_max:    no sampling row uses top-k or top-p: only min-p's z_max + log(min_p) can cut, else the threshold is
               -inf and the draw is categorical(key, scaled) -- as the sort's, whose threshold (the row's minimum)
               passes every logit too.
    by_search: binary searches over the float order, a pass of [B, V] each step: the k-th largest value (exact: a
               count), then the top-p cut (a sum of probabilities; the sort sums the same ones in sorted order, so
               the two can differ only where a partial mass lies within float32 rounding of top_p). A search a
               batch does not need (no row with 0 < top_k < V, or with top_p < 1) is skipped.
  A top_p 0.9 batch of [32, 49152] logits on a 2-core CPU: 326-456 ms sorted, 25 ms searched (benchmarks/RESULTS.md).
  """
  V = scaled_BV.shape[-1]
  sampling_B = s.temperature > 0
  max_B1 = jnp.max(scaled_BV, axis=-1, keepdims=True)
  min_p_B1 = _min_p_threshold(s, max_B1)

  def by_max(_):
    return min_p_B1

  def by_search(_):
    k_B = _effective_top_k(s, V)
    kth = jax.lax.cond(jnp.any(sampling_B & (k_B < V)), lambda _: _kth_largest(scaled_BV, k_B, max_B1),
                       lambda _: jnp.min(scaled_BV, axis=-1, keepdims=True), None)
    pth = jax.lax.cond(jnp.any(sampling_B & (s.top_p < 1)), lambda _: _top_p_cut(scaled_BV, s, k_B, kth, max_B1),
                       lambda _: jnp.full_like(kth, -jnp.inf), None)
    return jnp.maximum(jnp.maximum(kth, pth), min_p_B1)

  return jax.lax.cond(filter_path(s, V) == 1, by_search, by_max, None)


def argmax(x: jax.Array) -> jax.Array:
  """`jnp.argmax` over the last axis as int32, the same index (the first maximum; the first NaN in a row holding one),
  on CPU by two plain reductions: the maximum, then the least index holding it. XLA:CPU runs argmax's one (value,
  index) reduction unvectorized: 3.5 ms on a 32-row step's [32, 49152] float32 logits, against 0.5-1.1 ms. GPUs and
  TPUs reduce the pair in one pass, which stays theirs."""
  if jax.default_backend() != "cpu":
    return jnp.argmax(x, axis=-1).astype(jnp.int32)
  m = jnp.max(x, axis=-1, keepdims=True)  # NaN where the row holds one
  hit = (x == m) | ((m != m) & (x != x))
  V = x.shape[-1]
  return jnp.min(jnp.where(hit, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


def _chosen_logprob(logits_BV, tokens_B):
  """log_softmax at the chosen token only: (x_t - max) - log(sum(exp(x - max))), log_softmax's own arithmetic."""
  max_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
  log_norm_B1 = jnp.log(jnp.sum(jnp.exp(logits_BV - max_B1), axis=-1, keepdims=True))
  return (jnp.take_along_axis(logits_BV, tokens_B[:, None], axis=-1) - max_B1 - log_norm_B1)[:, 0]


def _result(tokens_B, chosen_B, top_ids, top_lp, num_top: int):
  return (tokens_B, chosen_B) if not num_top else (tokens_B, chosen_B, top_ids, top_lp)


def greedy(logits_BV: jax.Array, num_top: int = 0):
  """`sample()` for a batch whose rows are all `SamplingArrays.bare`: the argmax and its logprob (and empty top-n
  arrays, as sample returns when no row asks for logprobs). The same tokens and logprobs as `sample` gives such rows;
  no conditional and one pass over the logits."""
  logits_BV = logits_BV.astype(jnp.float32)
  B = logits_BV.shape[0]
  tokens_B = argmax(logits_BV)
  return _result(tokens_B, _chosen_logprob(logits_BV, tokens_B), jnp.zeros((B, num_top), jnp.int32),
                 jnp.zeros((B, num_top), jnp.float32), num_top)


def sample(logits_BV: jax.Array, s: SamplingArrays, positions_B: jax.Array, history: TokenHistory | None = None,
           num_top: int = 0, history_rows_B: jax.Array | None = None):
  """-> (token ids [B] int32, their logprobs [B] float32) and, with num_top > 0, (top ids [B, num_top], top logprobs
  [B, num_top]) of the distribution in `logits_BV` before bias, penalties and filters (the model's, or the one a
  structured-output mask left: refused tokens at -inf). `positions_B` is the position of the token being chosen;
  `history_rows_B` (optional) maps batch rows to rows of a larger `history` table (see process_logits).

  Every optional stage (bias, penalties, min_tokens mask, the draw, the filter thresholds, the top-n logprobs) is a
  `lax.cond` / `lax.switch` on the rows' settings: one compiled program serves every mix, and each stage costs
  nothing in a batch that does not use it (a batch of bare greedy rows is cheaper still through `greedy()`). The
  tokens are those of the straightforward sampler (every stage always applied, a full sort for the filters) for the
  same seeds (top-p's cut up to float32 rounding of its mass, see _threshold_B1), the logprobs equal to float32
  rounding.
  """
  logits_BV = logits_BV.astype(jnp.float32)
  B = logits_BV.shape[0]
  z_BV = process_logits(logits_BV, s, positions_B, history, history_rows_B)
  greedy_B = argmax(z_BV)
  sampling_B = s.temperature > 0

  def filtered_sample(z_BV):
    scaled = z_BV / jnp.maximum(s.temperature, 1e-6)[:, None]
    masked = jnp.where(scaled >= _threshold_B1(scaled, s), scaled, -jnp.inf)
    keys = jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.key(seed), pos))(s.seed, positions_B)
    # jax.random.categorical's own draw, the Gumbel-max argmax, with `argmax` (4-7x faster on CPU, same index)
    gumbel_BV = jax.vmap(lambda key: jax.random.gumbel(key, masked.shape[1:], masked.dtype))(keys)
    return argmax(masked + gumbel_BV)

  sampled_B = jax.lax.cond(jnp.any(sampling_B), filtered_sample, lambda _: greedy_B, z_BV)
  tokens_B = jnp.where(sampling_B, sampled_B, greedy_B)
  top_ids, top_lp = jnp.zeros((B, num_top), jnp.int32), jnp.zeros((B, num_top), jnp.float32)
  if num_top:
    top_lp, top_ids = jax.lax.cond(
        jnp.any(s.num_logprobs > 0), lambda x: tuple(jax.lax.top_k(jax.nn.log_softmax(x, axis=-1), num_top)),
        lambda x: (jnp.zeros((B, num_top), x.dtype), jnp.zeros((B, num_top), jnp.int32)), logits_BV)
  return _result(tokens_B, _chosen_logprob(logits_BV, tokens_B), top_ids.astype(jnp.int32),
                 top_lp.astype(jnp.float32), num_top)
