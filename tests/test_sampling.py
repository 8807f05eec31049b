"""The sampler against the exact filtered distribution computed in numpy."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.sampling import SamplingArrays, argmax, greedy, sample

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


# --- The fast sampler against the straightforward one (tests/sampler_oracle.py) -----------------------------------

from jaxllm.sampling import TokenHistory, filter_path  # noqa: E402
from tests.sampler_oracle import sample_reference, threshold_reference  # noqa: E402

FAST = jax.jit(sample, static_argnames="num_top")
REFERENCE = jax.jit(sample_reference, static_argnames="num_top")
NUM_TOP = 5
BY_MAX, BY_SEARCH = 0, 1
SMALL_K = 64  # top_k values drawn below / above it
# What a row asks for, as (temperature, top_k, top_p, min_p) drawn from rng for a vocabulary of V.
KINDS = {
    # A greedy row's filter settings must not matter (they would force the searches if they counted).
    "greedy": lambda r, V: (0.0, int(r.integers(0, V)), r.uniform(0.05, 1), r.uniform(0, 0.5)),
    "temperature": lambda r, V: (r.uniform(0.2, 2), 0, 1.0, 0.0),
    "min_p": lambda r, V: (r.uniform(0.2, 2), 0, 1.0, r.uniform(0.01, 0.5)),
    "top_k_small": lambda r, V: (r.uniform(0.2, 2), int(r.integers(1, SMALL_K + 1)), 1.0, 0.0),
    "top_k_top_p": lambda r, V: (r.uniform(0.2, 2), int(r.integers(1, SMALL_K + 1)), _top_p(r), 0.0),
    "top_k_all": lambda r, V: (r.uniform(0.2, 2), int(r.integers(1, SMALL_K + 1)), _top_p(r), r.uniform(0, 0.3)),
    "top_k_large": lambda r, V: (r.uniform(0.2, 2), int(r.integers(SMALL_K + 1, V + 50)), 1.0, 0.0),
    "top_p": lambda r, V: (r.uniform(0.2, 2), 0, _top_p(r), 0.0),
    "top_k_large_top_p": lambda r, V: (r.uniform(0.2, 2), int(r.integers(SMALL_K + 1, 1000)), _top_p(r), 0.0),
}
MIXES = {  # -> the filter path the batch must take
    "rankless": (("greedy", "temperature", "min_p"), BY_MAX),
    "small_top_k": (("greedy", "temperature", "min_p", "top_k_small", "top_k_top_p", "top_k_all"), BY_SEARCH),
    "everything": (tuple(KINDS), BY_SEARCH),
}


def _top_p(r):
  """Mostly uniform, sometimes a round fraction: with tied logits the top-p mass lands exactly on it (a close call)."""
  return float(r.choice([0.25, 0.5, 0.75])) if r.random() < 0.2 else r.uniform(0.05, 0.99)


def random_batch(rng, B, V, kinds, *, history_rows=None):
  """Logits of varied sharpness (some with exact ties), per-row settings drawn from `kinds`, and per row at random:
  penalties with a history touching the row's top tokens, logit biases (on top tokens too), a min_tokens hold on top
  tokens (active or just expired), and top-n logprobs. -> (logits, SamplingArrays, positions, TokenHistory)."""
  scale_B1 = rng.choice([0.3, 1.0, 3.0, 10.0, 30.0], size=(B, 1))
  logits = rng.standard_normal((B, V)).astype(np.float32) * scale_B1
  tied = rng.random(B) < 0.2
  logits[tied] = np.round(logits[tied])
  logits = logits.astype(np.float32)
  top_B10 = np.argsort(-logits, axis=-1)[:, :10]
  s = SamplingArrays.create(B, seed=rng.integers(0, 2**32, B, dtype=np.uint64))
  positions = rng.integers(8, 200, B).astype(np.int32)
  rows = B if history_rows is None else history_rows
  counts = np.where(rng.random((rows, V)) < 0.002, rng.integers(1, 4, (rows, V)), 0).astype(np.int32)
  in_prompt = rng.random((rows, V)) < 0.002
  for b in range(B):
    s.temperature[b], s.top_k[b], s.top_p[b], s.min_p[b] = KINDS[str(rng.choice(kinds))](rng, V)
    if rng.random() < 0.3:
      s.repetition_penalty[b] = rng.uniform(0.5, 2.0)
      s.presence_penalty[b], s.frequency_penalty[b] = rng.uniform(-2, 2, 2)
    if rng.random() < 0.2:
      ids = np.unique(np.concatenate([rng.choice(top_B10[b], 3), rng.integers(0, V, 3)]))
      s.bias_ids[b, :len(ids)] = ids
      s.bias_values[b, :len(ids)] = rng.uniform(-30, 30, len(ids))
    if rng.random() < 0.3:
      ids = np.unique(rng.choice(top_B10[b], 3))
      s.stop_ids[b, :len(ids)] = ids
      s.min_len[b] = positions[b] + rng.choice([1, 0])  # held at this position, or held no more
    if rng.random() < 0.3:
      s.num_logprobs[b] = rng.integers(1, NUM_TOP + 1)
  for b, row in enumerate(range(B) if history_rows is None else rng.choice(rows, B, replace=False)):
    seen = rng.choice(top_B10[b], 4)
    counts[row, seen] = rng.integers(0, 3, 4)
    in_prompt[row, rng.choice(top_B10[b], 2)] = True
  return logits, s, positions, TokenHistory(output_counts=counts, in_prompt=in_prompt)


def assert_same_as_reference(logits, s, positions, history=None, num_top=0, history_rows_B=None):
  """Identical tokens, logprobs (and top-n) within float32 rounding."""
  got = FAST(logits, s, positions, history, num_top=num_top, history_rows_B=history_rows_B)
  if history_rows_B is not None:
    history = jax.tree.map(lambda x: np.asarray(x)[np.asarray(history_rows_B)], history)
  want = REFERENCE(logits, s, positions, history, num_top=num_top)
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=1e-5, rtol=0)
  if num_top:
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want[2]))
    np.testing.assert_allclose(np.asarray(got[3]), np.asarray(want[3]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("V, seeds", [(1000, 40), (49152, 4)])
@pytest.mark.parametrize("mix", list(MIXES))
def test_random_mixes_pick_the_reference_tokens(mix, V, seeds):
  kinds, path = MIXES[mix]
  rng = np.random.default_rng(V)
  for _ in range(seeds):
    logits, s, positions, history = random_batch(rng, 32, V, kinds)
    assert int(filter_path(s, V)) == path
    assert_same_as_reference(logits, s, positions, history, NUM_TOP)


@pytest.mark.parametrize("settings, path", [
    (dict(temperature=0.0, top_k=1000, top_p=0.5), BY_MAX),  # all greedy: nothing is drawn at all
    (dict(temperature=0.8), BY_MAX),
    (dict(temperature=1.2, min_p=0.05), BY_MAX),
    (dict(temperature=0.7, top_k=50), BY_SEARCH),
    (dict(temperature=0.7, top_k=1000, top_p=0.9, min_p=0.01), BY_SEARCH),
    (dict(temperature=0.7, top_p=0.9), BY_SEARCH),
])
def test_uniform_batches_take_their_fast_path_and_match(settings, path):
  """Every row alike (the benchmark's batches) at the default model's vocabulary: no bias, penalties, min_tokens or
  logprobs asked for, so each of those stages is skipped too (with a history present)."""
  B, V = 32, 49152
  rng = np.random.default_rng(1)
  logits, _, positions, history = random_batch(rng, B, V, ("greedy",))
  s = SamplingArrays.create(B, seed=np.arange(B), **settings)
  assert int(filter_path(s, V)) == path
  assert_same_as_reference(logits, s, positions, history, NUM_TOP)
  hlo = FAST.lower(logits, s, positions, history, num_top=NUM_TOP).compile().as_text()
  assert not re.search(r"\bsort\(", hlo), "the sampler sorts the vocabulary"


def test_bare_rows_are_exactly_those_greedy_picks_for_sample():
  """`SamplingArrays.bare` (computed on the host, numpy) names the rows with nothing but an argmax to do, and
  `greedy()` (the engine's program for a batch of them) gives such rows sample's tokens and logprobs, bit for bit;
  each stage's setting alone makes a greedy row not bare."""
  B, V = 32, 1000
  rng = np.random.default_rng(7)
  logits, _, positions, history = random_batch(rng, B, V, ("greedy",))
  s = SamplingArrays.create(B, temperature=0.0, seed=np.arange(B))
  s.top_k[:], s.top_p[:] = 7, 0.5  # filters do not matter to a greedy row
  assert s.bare(positions).all() and isinstance(s.bare(positions), np.ndarray)
  want = FAST(logits, s, positions, history, num_top=NUM_TOP)
  got = jax.jit(greedy, static_argnames="num_top")(logits, num_top=NUM_TOP)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  np.testing.assert_array_equal(np.asarray(got[0]), np.argmax(logits, axis=-1))
  s.temperature[0] = 0.5
  s.bias_ids[1, 0] = 3
  s.num_logprobs[2] = 1
  s.repetition_penalty[3] = 1.1
  s.presence_penalty[4] = 0.5
  s.frequency_penalty[5] = -0.5
  s.stop_ids[6, 0], s.min_len[6] = 9, positions[6] + 1  # min_tokens holds token 9 back at this position
  s.stop_ids[7, 0], s.min_len[7] = 9, positions[7]  # ... and no longer here
  s.min_len[8] = positions[8] + 1  # a min_tokens with no stop ids holds nothing back
  np.testing.assert_array_equal(s.bare(positions), np.arange(B) >= 7)


def test_argmax_is_jnp_argmax_in_two_plain_reductions():
  """`argmax` gives jnp.argmax's index, int32, on ties (the first), NaN (the first NaN), rows of -inf, +-0 and +inf
  ties, in float32 and bfloat16; on CPU as a max and a min over indices, not argmax's (value, index) reduction."""
  rng = np.random.default_rng(3)
  ties = np.round(rng.standard_normal((64, 50)) * 2).astype(np.float32)
  nans = ties.copy()
  nans[3, 7] = nans[5, 0] = nans[5, 9] = nans[6, -1] = np.nan
  inf = np.full((4, 10), -np.inf, np.float32)
  inf[1, 4], inf[2, 3:5] = 0.0, np.inf
  zeros = np.array([[-0.0, 0.0, -0.0], [0.0, -0.0, 0.0]], np.float32)
  for x in (rng.standard_normal((8, 3, 1000)).astype(np.float32), ties, nans, inf, zeros):
    for dtype in (jnp.float32, jnp.bfloat16):
      got = jax.jit(argmax)(jnp.asarray(x, dtype))
      assert got.dtype == jnp.int32
      np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(jnp.asarray(x, dtype), axis=-1)))
  hlo = jax.jit(argmax).lower(jnp.zeros((32, 1000))).compile().as_text()
  assert not re.search(r"= \(f32\[32\]\{0\}, s32\[32\]\{0\}\) reduce", hlo), "a (value, index) reduction"
  assert re.search(r"= \(f32\[32\]\{0\}, s32\[32\]\{0\}\) reduce",
                   jax.jit(lambda x: jnp.argmax(x, -1)).lower(jnp.zeros((32, 1000))).compile().as_text())


def test_tied_leaders_with_top_p_on_their_mass_keep_the_sorted_set():
  """Tied logits put a top-p mass exactly on top_p (eight equal leaders: the mass before the j-th is j/8). The search
  keeps every token of the cut value, as the sort's threshold does, whichever side of top_p the rounding falls."""
  from jaxllm.sampling import _threshold_B1

  B, V = 32, 1000
  rng = np.random.default_rng(2)
  _, _, positions, history = random_batch(rng, B, V, ("greedy",))
  logits = rng.standard_normal((B, V)).astype(np.float32) - 30
  logits[:, :8] = 2.0
  top_p = np.where(np.arange(B) % 2 == 0, rng.choice([0.25, 0.5, 0.75], B), rng.uniform(0.05, 0.95, B))
  s = SamplingArrays.create(B, temperature=1.0, top_k=np.where(np.arange(B) % 4 < 2, 32, 0), top_p=top_p,
                            seed=np.arange(B))
  np.testing.assert_array_equal(np.asarray(jax.jit(_threshold_B1)(logits, s))[:, 0], 2.0)
  np.testing.assert_array_equal(np.asarray(jax.jit(threshold_reference)(logits, s))[:, 0], 2.0)
  assert_same_as_reference(logits, s, positions, history, NUM_TOP)


@pytest.mark.parametrize("V", [1000, 49152])
def test_searched_thresholds_keep_the_sorted_sets_over_many_rows(V):
  """The searches' kept sets vs the full sort's over 2048 rows: -inf entries, ties, every top_k (exact: it is a
  count) and top_p set just off a partial mass, by 1e-6 .. 1e-2 (beyond float32 rounding of a sum of probabilities,
  which the two take in different orders), min-p on some rows: identical, token for token."""
  from jaxllm.sampling import _threshold_B1

  B = 256
  rng = np.random.default_rng(V)
  for _ in range(8):
    scaled = (rng.standard_normal((B, V)) * rng.choice([0.3, 1.0, 3.0, 10.0], (B, 1))).astype(np.float32)
    tied = rng.random(B) < 0.2
    scaled[tied] = np.round(scaled[tied])
    scaled[rng.random((B, V)) < 0.01] = -np.inf
    k = np.where(rng.random(B) < 0.5, rng.integers(1, V + 50, B), 0)
    kk = np.where(k > 0, np.minimum(k, V), V)
    ordered = -np.sort(-scaled.astype(np.float64), axis=-1)
    p = np.where(np.arange(V) < kk[:, None], np.exp(ordered - ordered[:, :1]), 0)
    mass = np.cumsum(p / p.sum(-1, keepdims=True), axis=-1)
    at = mass[np.arange(B), rng.integers(0, np.minimum(kk, 300))]
    top_p = np.clip(at + rng.choice([-1, 1], B) * 10.0 ** rng.uniform(-6, -2, B), 0.01, 0.999)
    top_p = np.where(rng.random(B) < 0.8, top_p, 1.0)
    s = SamplingArrays.create(B, temperature=1.0, top_k=k, top_p=top_p, min_p=np.where(rng.random(B) < 0.2, 0.05, 0))
    searched = np.asarray(jax.jit(_threshold_B1)(scaled, s))
    np.testing.assert_array_equal(scaled >= searched, scaled >= np.asarray(jax.jit(threshold_reference)(scaled, s)))


def test_history_rows_gather_from_a_larger_table_only_when_penalties_are_on():
  B, V, S = 32, 1000, 48
  rng = np.random.default_rng(4)
  for _ in range(10):
    logits, s, positions, table = random_batch(rng, B, V, tuple(KINDS), history_rows=S)
    rows = rng.choice(S, B, replace=False).astype(np.int32)
    assert_same_as_reference(logits, s, positions, table, NUM_TOP, history_rows_B=rows)
  # The [S, V] table is read only inside the penalty branch's cond: a batch without penalties never touches it.
  jaxpr = jax.make_jaxpr(lambda h, r: sample(logits, s, positions, h, history_rows_B=r))(table, rows).jaxpr
  history_vars = set(jaxpr.invars[:2])
  readers = {e.primitive.name for e in jaxpr.eqns if history_vars & {v for v in e.invars if not hasattr(v, "val")}}
  assert readers == {"cond"}, readers
  with pytest.raises(ValueError, match="history has 48 rows for a batch of 32"):
    sample(logits, s, positions, table)
