"""The engine's mixed step and the scheduler on a tiny random model: batch invariance with chunked prefill and the
prefix cache on and off, seeded sampling, preemption, page accounting, no recompilation after warmup, bad requests.
The oracle is `tests.oracle.Generator` running each prompt alone (contiguous cache, its own code path), itself
checked against transformers in test_hf_parity / test_generate."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from jaxllm import checkpoint
from jaxllm.config import ModelConfig
from jaxllm.layers import Llama
from jaxllm.sampling import SamplingArrays, SamplingParams
from jaxllm.serving.config import EngineConfig
from jaxllm.serving.engine import Engine
from jaxllm.serving.scheduler import Scheduler
from tests.oracle import Generator

CONFIG = ModelConfig(vocab_size=256, d_model=64, d_ff=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                     max_position_embeddings=512)
MAX_LEN = 384
# Chunks of at most 64 tokens: prompts up to 300 tokens are prefilled over several steps beside the decodes.
ENGINE = EngineConfig(max_model_len=MAX_LEN, max_num_seqs=8, max_num_batched_tokens=64, page_size=16)


@pytest.fixture(scope="module")
def model():
  params = jax.tree.map(np.asarray, nnx.state(Llama(CONFIG, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict())
  return checkpoint.build_model(CONFIG, params, "float32")


@pytest.fixture(scope="module")
def alone(model):
  """Each prompt generated on its own (batch of one) by the oracle."""
  gen = Generator(model, max_batch_size=1)
  cache = {}

  def run(prompt, max_tokens, temperature=0.0, seed=0, top_k=0, top_p=1.0):
    key = (tuple(prompt), max_tokens, temperature, seed, top_k, top_p)
    if key not in cache:
      s = SamplingArrays.create(1, temperature=temperature, seed=seed, top_k=top_k, top_p=top_p)
      cache[key] = gen.generate([prompt], [max_tokens], s, lambda i, t: False, max_len=MAX_LEN)[0][0]
    return cache[key]

  return run


@pytest.fixture(scope="module")
def engine(model):
  eng = Engine(model, ENGINE)
  eng.warmup()
  return eng


def engine_with(model, **changes):
  """Another engine over the same model: programs of equal shapes are shared, so nothing new compiles."""
  return Engine(model, dataclasses.replace(ENGINE, **changes))


def run_with_arrivals(sched, prompts, params, rng, seeds=None):
  """Requests join at random steps while others decode."""
  order = list(range(len(prompts)))
  reqs = {}
  while order or sched.has_work():
    for _ in range(int(rng.integers(0, 4))):
      if order:
        i = order.pop(0)
        reqs[i] = sched.add(prompts[i], params[i], seed=None if seeds is None else seeds[i])
    sched.step()
  return [reqs[i] for i in range(len(prompts))]


def assert_all_pages_back(sched):
  sched.check_pages()
  assert sched.num_pages_held() == 0  # free, or cached and held by nobody
  assert all(s is None for rep in sched.replicas for s in rep.slots) and not sched.running and not sched.requests


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_outputs_equal_each_prompt_alone_whatever_the_batch(model, engine, alone, prefix_caching):
  rng = np.random.default_rng(1)
  lengths = rng.integers(1, 301, 32)
  system = rng.integers(0, 256, 40).tolist()  # a third of the prompts share a 40-token prefix (2 full pages)
  prompts = [(system if i % 3 == 0 else []) + rng.integers(0, 256, int(n)).tolist() for i, n in enumerate(lengths)]
  prompts = [p[:MAX_LEN - 30] for p in prompts]
  max_tokens = [int(m) for m in rng.integers(1, 24, 32)]
  params = [SamplingParams(max_tokens=m, temperature=0) for m in max_tokens]
  compiled = engine.num_compilations()
  sched = Scheduler(engine_with(model, enable_prefix_caching=prefix_caching))
  reqs = run_with_arrivals(sched, prompts, params, rng)
  for i, r in enumerate(reqs):
    assert r.output_ids == alone(prompts[i], max_tokens[i]), i
    assert r.finish_reason == "length" and len(r.logprobs) == max_tokens[i]
  assert engine.num_compilations() == compiled  # every shape was compiled by warmup
  hits = sched.prefix_cache_hits
  assert (hits > 0) == prefix_caching
  assert sched.num_steps > max(len(p) for p in prompts) // ENGINE.max_num_batched_tokens  # long prompts chunked
  assert_all_pages_back(sched)


def test_a_long_prompt_is_prefilled_in_chunks_beside_running_decodes(engine, alone):
  rng = np.random.default_rng(7)
  short = [rng.integers(0, 256, 5).tolist() for _ in range(4)]
  long = rng.integers(0, 256, 330).tolist()
  sched = Scheduler(engine)
  runners = [sched.add(p, SamplingParams(max_tokens=40, temperature=0)) for p in short]
  for _ in range(3):
    sched.step()
  before = [len(r.output_ids) for r in runners]
  big = sched.add(long, SamplingParams(max_tokens=8, temperature=0))
  steps = 0
  while big.num_computed < len(long):
    sched.step()
    steps += 1
  # 330 tokens at <= 64 - 4 per step: at least 6 steps, and every decode moved on at each of them.
  assert steps >= 330 // 60
  assert all(len(r.output_ids) + r.pending >= b + steps for r, b in zip(runners, before))
  sched.run_until_done()
  assert big.output_ids == alone(long, 8)
  for p, r in zip(short, runners):
    assert r.output_ids == alone(p, 40)


def test_seeded_sampling_is_independent_of_batch_company(engine, alone):
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, 256, int(n)).tolist() for n in rng.integers(1, 80, 12)]
  params = [SamplingParams(max_tokens=12, temperature=0.9, top_k=40, top_p=0.95) for _ in prompts]
  seeds = list(range(100, 112))
  sched = Scheduler(engine)
  reqs = run_with_arrivals(sched, prompts, params, rng, seeds)
  for i, r in enumerate(reqs):
    assert r.output_ids == alone(prompts[i], 12, 0.9, seeds[i], 40, 0.95), i
  # A request alone in the engine draws the same tokens as in company.
  solo = Scheduler(engine)
  r = solo.add(prompts[3], params[3], seed=seeds[3])
  solo.run_until_done()
  assert r.output_ids == reqs[3].output_ids


def test_forced_preemption_gives_the_unconstrained_outputs(model, alone):
  # 16 usable pages of 8 tokens (one sequence of max_model_len): four sequences of ~40 tokens cannot all grow to
  # ~64; the latest admitted is preempted and later recomputed from prompt + output so far (mostly from its own cached
  # pages).
  eng = Engine(model, dataclasses.replace(ENGINE, max_model_len=128, max_num_seqs=4, page_size=8, num_pages=17))
  rng = np.random.default_rng(3)
  prompts = [rng.integers(0, 256, int(n)).tolist() for n in rng.integers(20, 40, 6)]
  sched = Scheduler(eng)
  reqs = [sched.add(p, SamplingParams(max_tokens=24, temperature=0)) for p in prompts]
  sched.run_until_done()
  assert sched.num_preemptions > 0
  assert sched.prefix_cache_queries == sum(len(p) for p in prompts)  # a recompute is not another query
  for p, r in zip(prompts, reqs):
    assert r.output_ids == alone(p, 24)
  assert_all_pages_back(sched)


@pytest.mark.parametrize("quantization,kv_cache_dtype", [("int8", "int8"),
                                                       pytest.param(None, "fp8", marks=pytest.mark.slow)])
def test_quantized_kv_cache_keeps_batch_invariance_preemption_and_page_accounting(model, alone, quantization,
                                                                                  kv_cache_dtype):
  """With int8 weights and int8 pages (fp8 pages: slow) each prompt still gets what it gets alone (through batching,
  chunked prefill and forced preemption with recompute), every page comes back, and the outputs stay near the float
  model's."""
  if quantization is not None:
    params = jax.tree.map(np.asarray, nnx.state(Llama(CONFIG, quantization=quantization, rngs=nnx.Rngs(0)),
                                                nnx.Param).to_pure_dict())
    model = checkpoint.build_model(CONFIG, params, "float32", quantization=quantization)
    assert model.layers.mlp.w_up_DF[...].dtype == np.int8
  base = dataclasses.replace(ENGINE, max_model_len=128, max_num_seqs=4, page_size=8, kv_cache_dtype=kv_cache_dtype)
  rng = np.random.default_rng(3)
  prompts = [rng.integers(0, 256, int(n)).tolist() for n in rng.integers(20, 40, 5)]
  sp = SamplingParams(max_tokens=16, temperature=0)
  roomy = Scheduler(Engine(model, base))
  assert roomy.state.k.values.dtype == {"int8": np.int8, "fp8": jax.numpy.float8_e4m3fn}[kv_cache_dtype]
  solo = []
  for p in prompts:
    solo.append(roomy.add(p, sp))
    roomy.run_until_done()
  tight = Scheduler(Engine(model, dataclasses.replace(base, num_pages=17)))
  reqs = [tight.add(p, sp) for p in prompts]
  tight.run_until_done()
  assert tight.num_preemptions > 0
  assert [r.output_ids for r in reqs] == [r.output_ids for r in solo]
  assert_all_pages_back(tight)
  assert_all_pages_back(roomy)
  agree = np.mean([a == b for p, r in zip(prompts, solo) for a, b in zip(r.output_ids, alone(p, 16))])
  assert agree > 0.5, agree  # a random model's near-ties flip under rounding; most tokens still agree


def test_2000_mixed_requests_with_cancellations_preemptions_and_prefix_hits_free_every_page(model, alone):
  # A cache too small for every slot to grow: preemptions happen throughout; a fifth of the requests are n = 2
  # samples, a third share one of a few prefixes; cancellations hit queued, running and in-flight requests alike.
  eng = Engine(model, dataclasses.replace(ENGINE, max_model_len=128, page_size=8, num_pages=48))
  rng = np.random.default_rng(4)
  prefixes = [rng.integers(0, 256, 24).tolist() for _ in range(3)]
  sched = Scheduler(eng)
  live, cancelled, checked = [], 0, []
  while len(live) < 2000:
    prompt = rng.integers(0, 256, int(rng.integers(1, 40))).tolist()
    if rng.random() < 0.3:
      prompt = prefixes[int(rng.integers(3))] + prompt[:16]
    max_tokens = int(rng.integers(1, 40))
    if rng.random() < 0.2:
      live += sched.add_samples(prompt, SamplingParams(n=2, max_tokens=max_tokens, temperature=0.8),
                                seeds=[len(live), len(live) + 1])
    elif rng.random() < 0.02:  # greedy ones are checked against the prompt run alone below
      live.append(sched.add(prompt, SamplingParams(max_tokens=max_tokens, temperature=0)))
      checked.append((live[-1], prompt, max_tokens))
    else:
      live.append(sched.add(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=len(live))))
    if rng.random() < 0.6:
      sched.step()
      sched.check_pages()
    if rng.random() < 0.08:  # cancel a random unfinished request
      pending = [r for r in live if not r.finished and r not in [c[0] for c in checked]]
      if pending:
        assert sched.cancel(pending[int(rng.integers(len(pending)))].request_id)
        cancelled += 1
  sched.run_until_done()
  assert all(r.finished for r in live)
  done = sum(r.finish_reason == "length" for r in live)
  assert cancelled > 50 and done + cancelled == len(live) >= 2000
  assert sched.num_preemptions > 20
  assert sched.prefix_cache_hits > 1000  # tokens: shared prefixes, n = 2 siblings, recomputes
  for r, prompt, max_tokens in checked:
    assert r.output_ids == alone(prompt, max_tokens)
  assert_all_pages_back(sched)


@pytest.mark.parametrize("prompt, params, message", [
    ([], SamplingParams(), "prompt is empty"),
    ([1] * MAX_LEN, SamplingParams(), "max_model_len"),
    ([1, 2, 300], SamplingParams(), "outside the vocabulary"),
    ([1, 2], SamplingParams(logit_bias={999: 1.0}), "logit_bias names token ids"),
    ([1, 2], SamplingParams(logprobs=5), "num_top_logprobs"),
])
def test_bad_requests_are_rejected_before_the_device_and_the_engine_keeps_serving(model, engine, alone, prompt,
                                                                                  params, message):
  sched = Scheduler(engine_with(model, num_top_logprobs=0) if "logprobs" in message else engine)
  good = sched.add([5, 6, 7], SamplingParams(max_tokens=5, temperature=0))
  with pytest.raises(ValueError, match=message):
    sched.add(prompt, params)
  sched.run_until_done()
  assert good.output_ids == alone([5, 6, 7], 5)


def test_n_samples_share_the_prompt_pages_and_draw_what_each_seed_draws_alone(engine, alone):
  rng = np.random.default_rng(5)
  prompt = rng.integers(0, 256, 70).tolist()  # 70 tokens: 4 full pages computed once, the 5th by every sample
  params = SamplingParams(n=4, max_tokens=10, temperature=0.8, top_k=50)
  seeds = [11, 12, 13, 14]
  sched = Scheduler(engine)
  samples = sched.add_samples(prompt, params, seeds=seeds)
  other = sched.add([3, 4, 5], SamplingParams(max_tokens=6, temperature=0))
  sched.step()
  # Sample 0's first chunk (64 tokens, the budget) registers 4 full pages; samples 1..3 are admitted in later steps
  # on those pages and compute only positions 64..69.
  sched.run_until_done()
  assert [r.num_cached_tokens for r in samples] == [0, 64, 64, 64]
  assert sched.num_prompt_tokens_computed == 70 + 3 * 6 + 3
  for k, r in enumerate(samples):
    assert r.output_ids == alone(prompt, 10, 0.8, seeds[k], 50), k
  assert len({tuple(r.output_ids) for r in samples}) > 1
  assert other.output_ids == alone([3, 4, 5], 6)
  assert_all_pages_back(sched)


def test_samples_admitted_in_one_step_reuse_the_pages_that_step_writes(engine, alone):
  # 40 tokens, n = 3, budget 64: sample 0 computes all 40; samples 1 and 2 join in the same step on its 2 full pages
  # (written earlier in the same forward pass, layer by layer) and compute 8 tokens each: 56 tokens in one step.
  prompt = list(range(7, 47))
  sched = Scheduler(engine)
  samples = sched.add_samples(prompt, SamplingParams(n=3, max_tokens=6, temperature=0.9), seeds=[1, 2, 3])
  sched.step()
  assert [r.num_cached_tokens for r in samples] == [0, 32, 32] and all(r.num_computed == 40 for r in samples)
  sched.run_until_done()
  for k, r in enumerate(samples):
    assert r.output_ids == alone(prompt, 6, 0.9, k + 1), k
  assert_all_pages_back(sched)


def test_a_prompt_of_whole_pages_recomputes_only_its_last_page(engine, alone):
  prompt = list(range(1, 49))  # 3 full pages: the cache may supply 2, the request computes the third itself
  sched = Scheduler(engine)
  a = sched.add(prompt, SamplingParams(max_tokens=4, temperature=0))
  sched.run_until_done()
  b = sched.add(prompt, SamplingParams(max_tokens=4, temperature=0))
  sched.run_until_done()
  assert (a.num_cached_tokens, b.num_cached_tokens) == (0, 32)
  assert a.output_ids == b.output_ids == alone(prompt, 4)
  assert_all_pages_back(sched)


def test_a_step_that_fails_before_it_runs_is_rolled_back(engine, alone, monkeypatch):
  """A step that raises before its programs are dispatched (an error, or Ctrl-C while a new bucket compiles, after
  which `LLM.generate` cancels its requests and the scheduler lives on) leaves nothing half-done: its rows' requests
  are recomputed rather than trusted to hold K/V the model never wrote, and the full pages the step had offered to
  the prefix cache are not served as cached. Every output equals its prompt's run alone."""
  first, prompt = list(range(100, 130)), list(range(1, 41))  # the second: 2 full pages of 16
  sched = Scheduler(engine)
  a = sched.add(first, SamplingParams(max_tokens=12, temperature=0))
  for _ in range(3):
    sched.step()  # a decodes, one step in flight
  b = sched.add(prompt, SamplingParams(max_tokens=4, temperature=0))
  real, calls = engine.forward, []

  def interrupted(*args, **kwargs):
    calls.append(1)
    if len(calls) == 1:
      raise KeyboardInterrupt
    return real(*args, **kwargs)

  monkeypatch.setattr(engine, "forward", interrupted)
  with pytest.raises(KeyboardInterrupt):
    sched.step()  # a's decode and b's prompt, never run
  sched.check_pages()
  assert a.num_preemptions == b.num_preemptions == 1 and list(sched.waiting) == [a, b]
  for _ in range(100):  # bounded: unrolled back, b waited forever for the token of a step that never ran
    if sched.has_work():
      sched.step()
  assert not sched.has_work()
  assert a.output_ids == alone(first, 12) and b.output_ids == alone(prompt, 4)
  c = sched.add(prompt, SamplingParams(max_tokens=4, temperature=0))
  sched.run_until_done()
  assert c.output_ids == b.output_ids and c.num_cached_tokens == 32  # b's pages, cached once written
  assert_all_pages_back(sched)


def test_prompt_logprobs_come_from_the_prefill_chunks_and_equal_a_full_forward(model, engine):
  # Prompt scoring (vLLM's prompt_logprobs, the server's echo) runs in the engine's steps: prompts of up to 300
  # tokens prefilled in <= 64-token chunks beside decodes and each other, one of them already in the prefix cache
  # (a scoring request computes it anyway). The oracle is a full forward over each prompt alone (no pages).
  rng = np.random.default_rng(8)
  prompts = [rng.integers(0, 256, n).tolist() for n in (1, 2, 17, 64, 300)]
  sched = Scheduler(engine)
  sched.add(prompts[4], SamplingParams(max_tokens=1, temperature=0))
  sched.run_until_done()
  decoders = [sched.add(rng.integers(0, 256, 5).tolist(), SamplingParams(max_tokens=30, temperature=0))
              for _ in range(3)]
  sched.step()
  scored = [sched.add(p, SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=k))
            for p, k in zip(prompts, (0, 1, 5, 0, 3))]
  sched.run_until_done()
  assert all(len(r.output_ids) == 30 for r in decoders)
  assert scored[0].prompt_logprobs == [None] and scored[4].num_cached_tokens == 0
  for p, r in zip(prompts[1:], scored[1:]):
    lp, _, top_ids, top_lp = (np.asarray(x)[0] for x in engine.score_tokens(np.array([p]), num_top=5))
    assert r.prompt_logprobs[0] is None and r.prompt_top_logprobs[0] is None
    np.testing.assert_allclose(r.prompt_logprobs[1:], lp, rtol=0, atol=2e-5)
    k = r.params.prompt_logprobs
    for pos, d in enumerate(r.prompt_top_logprobs[1:]):
      assert list(d) == top_ids[pos, :k].tolist()
      assert (r.prompt_ranks[pos + 1] == 1) == (top_ids[pos, 0] == p[pos + 1])
      np.testing.assert_allclose(list(d.values()), top_lp[pos, :k], rtol=0, atol=2e-5)
  assert_all_pages_back(sched)
  # Preempted and recomputed: the positions are scored again, to the same values.
  eng = Engine(model, dataclasses.replace(ENGINE, max_model_len=128, max_num_seqs=4, page_size=8, num_pages=17))
  prompts = [rng.integers(0, 256, int(n)).tolist() for n in rng.integers(20, 40, 6)]
  tight = Scheduler(eng)
  reqs = [tight.add(p, SamplingParams(max_tokens=24, temperature=0, prompt_logprobs=0)) for p in prompts]
  tight.run_until_done()
  assert tight.num_preemptions > 0
  for p, r in zip(prompts, reqs):
    lp = np.asarray(engine.score_tokens(np.array([p]))[0])[0]
    np.testing.assert_allclose(r.prompt_logprobs[1:], lp, rtol=0, atol=2e-5)
    assert r.prompt_scored == len(p) - 1
  assert_all_pages_back(tight)


def test_penalized_requests_build_their_own_history(engine):
  # A repetition penalty reads the whole prompt: such a request takes no cached prefix and still equals itself alone.
  rng = np.random.default_rng(6)
  prompt = rng.integers(0, 256, 50).tolist()
  params = SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.8, frequency_penalty=0.5)
  sched = Scheduler(engine)
  warm = sched.add(prompt, SamplingParams(max_tokens=2, temperature=0))  # puts the prompt's pages in the cache
  sched.run_until_done()
  pen = sched.add(prompt, params)
  plain = sched.add(prompt, SamplingParams(max_tokens=12, temperature=0))
  sched.run_until_done()
  solo = Scheduler(engine)
  ref = solo.add(prompt, params)
  solo.run_until_done()
  assert warm.finished and pen.num_cached_tokens == 0 and plain.num_cached_tokens == 48
  assert pen.output_ids == ref.output_ids
  assert pen.output_ids != plain.output_ids  # the penalties did something


def test_a_step_of_bare_greedy_rows_runs_the_argmax_program_and_any_other_the_sampler(model, engine, monkeypatch):
  """The host picks the pick program from the sampling rows' settings, so neither branches on them: greedy rows with
  nothing to apply take the argmax program, which holds no conditional (XLA:GPU reads each one's predicate back to
  the host and waits); a row that draws, asks for logprobs or is held back by min_tokens takes the sampler."""
  from jaxllm.serving import engine as engine_lib

  seen = []
  real = engine_lib._pick

  def spy(graphdef, params, state, h_SD, seqs, bitmask_SW, **kw):
    seen.append(bitmask_SW is None)
    return real(graphdef, params, state, h_SD, seqs, bitmask_SW, **kw)

  monkeypatch.setattr(engine_lib, "_pick", spy)
  prompt = list(range(10, 30))

  def picks(params):
    seen.clear()
    sched = Scheduler(engine)
    req = sched.add(prompt, params)
    while sched.has_work():
      sched.step()
    assert req.finish_reason == "length"
    return list(seen)

  assert picks(SamplingParams(max_tokens=3, temperature=0)) == [True] * 3
  assert picks(SamplingParams(max_tokens=3, temperature=0.7, seed=1)) == [False] * 3
  assert picks(SamplingParams(max_tokens=3, temperature=0, logprobs=2)) == [False] * 3
  # Token 7 is held back for the first 2 outputs (min_tokens), then nothing is left to apply.
  assert picks(SamplingParams(max_tokens=4, temperature=0, min_tokens=2, stop_token_ids=[7])) == [False] * 2 + [True] * 2
  batch = engine._padding_batch(ENGINE.max_num_seqs)
  state = engine.init_state()
  h_SD = np.zeros((ENGINE.max_num_seqs, CONFIG.d_model), np.float32)
  hlo = {name: real.lower(engine.graphdef, engine.params, state, h_SD, batch.seqs, mask,
                          num_top=ENGINE.num_top_logprobs).compile().as_text()
         for name, mask in [("argmax", None), ("sampler", engine.full_bitmask(ENGINE.max_num_seqs))]}
  assert hlo["argmax"].count("conditional(") == 0 and hlo["sampler"].count("conditional(") > 0
