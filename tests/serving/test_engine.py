"""The engine and scheduler on a tiny random model: batch invariance, seeded sampling, preemption, page accounting,
no recompilation after warmup, bad requests. The oracle is `jaxllm.generate.Generator` running each prompt alone
(contiguous cache, its own code path), itself checked against transformers in test_hf_parity / test_generate."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxllm import checkpoint
from jaxllm.config import ModelConfig
from jaxllm.generate import Generator
from jaxllm.layers import Llama
from jaxllm.sampling import SamplingArrays, SamplingParams
from jaxllm.serving.engine import Engine, EngineConfig
from jaxllm.serving.scheduler import Scheduler

CONFIG = ModelConfig(vocab_size=256, d_model=64, d_ff=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                     max_position_embeddings=512)
MAX_LEN = 384


@pytest.fixture(scope="module")
def model():
  params = jax.tree.map(np.asarray, nnx.state(Llama(CONFIG, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict())
  return checkpoint.build_model(CONFIG, params, "float32")


@pytest.fixture(scope="module")
def alone(model):
  """Each prompt generated on its own (batch of one) by the first generation path."""
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
  eng = Engine(model, EngineConfig(max_model_len=MAX_LEN, num_slots=8, page_size=16, max_prefill_batch=4,
                                   min_prefill_len=32, decode_steps=2))
  eng.warmup()
  return eng


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


def test_greedy_outputs_equal_each_prompt_alone_whatever_the_batch(engine, alone):
  rng = np.random.default_rng(1)
  lengths = rng.integers(1, 301, 32)
  prompts = [rng.integers(0, 256, int(n)).tolist() for n in lengths]
  max_tokens = [int(m) for m in rng.integers(1, 24, 32)]
  params = [SamplingParams(max_tokens=m, temperature=0) for m in max_tokens]
  compiled = engine.num_compilations()
  sched = Scheduler(engine)
  reqs = run_with_arrivals(sched, prompts, params, rng)
  for i, r in enumerate(reqs):
    assert r.output_ids == alone(prompts[i], max_tokens[i]), i
    assert r.finish_reason == "length" and len(r.logprobs) == max_tokens[i]
  assert engine.num_compilations() == compiled  # every shape was compiled by warmup
  sched.allocator.check()
  assert sched.allocator.num_free == sched.allocator.capacity


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
  # 12 usable pages of 8 tokens: four sequences of ~40 tokens cannot all grow to ~64; the latest admitted is
  # preempted and later recomputed from prompt + output so far.
  eng = Engine(model, EngineConfig(max_model_len=128, num_slots=4, page_size=8, num_pages=13, max_prefill_batch=2,
                                   min_prefill_len=32, decode_steps=2))
  rng = np.random.default_rng(3)
  prompts = [rng.integers(0, 256, int(n)).tolist() for n in rng.integers(20, 40, 6)]
  sched = Scheduler(eng)
  reqs = [sched.add(p, SamplingParams(max_tokens=24, temperature=0)) for p in prompts]
  sched.run_until_done()
  assert sched.num_preemptions > 0
  for p, r in zip(prompts, reqs):
    assert r.output_ids == alone(p, 24)
  sched.allocator.check()
  assert sched.allocator.num_free == 12


def test_2000_mixed_requests_with_cancellations_and_preemptions_free_every_page(model, alone):
  # A cache too small for every slot to grow: preemptions happen throughout; a fifth of the requests are n = 2
  # samples sharing pages; cancellations hit queued, running and in-flight requests alike.
  eng = Engine(model, EngineConfig(max_model_len=128, num_slots=8, page_size=8, num_pages=48, max_prefill_batch=4,
                                   min_prefill_len=32, decode_steps=4))
  rng = np.random.default_rng(4)
  sched = Scheduler(eng)
  live, cancelled, checked = [], 0, []
  while len(live) < 2000:
    prompt = rng.integers(0, 256, int(rng.integers(1, 40))).tolist()
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
      sched.allocator.check()
    if rng.random() < 0.08:  # cancel a random unfinished request
      pending = [r for r in live if not r.finished and r not in [c[0] for c in checked]]
      if pending:
        assert sched.cancel(pending[int(rng.integers(len(pending)))].request_id)
        cancelled += 1
  sched.run_until_done()
  assert all(r.finished for r in live)
  done = sum(r.finish_reason == "length" for r in live)
  assert cancelled > 50 and done + cancelled == len(live) >= 2000
  assert sched.num_preemptions > 20 and sched.num_forks > 50
  for r, prompt, max_tokens in checked:
    assert r.output_ids == alone(prompt, max_tokens)
  sched.allocator.check()
  assert sched.allocator.num_free == sched.allocator.capacity
  assert all(s is None for s in sched.slots) and not sched.requests


@pytest.mark.parametrize("prompt, params, message", [
    ([], SamplingParams(), "prompt is empty"),
    ([1] * MAX_LEN, SamplingParams(), "max_model_len"),
    ([1, 2, 300], SamplingParams(), "outside the vocabulary"),
    ([1, 2], SamplingParams(logit_bias={999: 1.0}), "logit_bias names token ids"),
    ([1, 2], SamplingParams(logprobs=5), "num_top_logprobs"),
])
def test_bad_requests_are_rejected_before_the_device_and_the_engine_keeps_serving(engine, alone, prompt, params,
                                                                                  message):
  sched = Scheduler(engine)
  good = sched.add([5, 6, 7], SamplingParams(max_tokens=5, temperature=0))
  with pytest.raises(ValueError, match=message):
    sched.add(prompt, params)
  sched.run_until_done()
  assert good.output_ids == alone([5, 6, 7], 5)


def test_n_samples_share_the_prompt_pages_and_draw_what_each_seed_draws_alone(engine, alone):
  rng = np.random.default_rng(5)
  prompt = rng.integers(0, 256, 70).tolist()  # 70 tokens: 4 full pages shared, the 5th copied per sample
  params = SamplingParams(n=4, max_tokens=10, temperature=0.8, top_k=50)
  seeds = [11, 12, 13, 14]
  sched = Scheduler(engine)
  samples = sched.add_samples(prompt, params, seeds=seeds)
  other = sched.add([3, 4, 5], SamplingParams(max_tokens=6, temperature=0))
  sched.step()
  assert sched.num_forks == 3  # one prefill for the prompt; samples 1..3 joined on its pages
  assert sched.allocator.num_shared() == 4
  sched.run_until_done()
  for k, r in enumerate(samples):
    assert r.output_ids == alone(prompt, 10, 0.8, seeds[k], 50), k
  assert len({tuple(r.output_ids) for r in samples}) > 1
  assert other.output_ids == alone([3, 4, 5], 6)
  sched.allocator.check()
  assert sched.allocator.num_free == sched.allocator.capacity


def test_n_samples_without_room_to_share_are_prefilled_on_their_own(model, alone):
  # Two slots: sample 0 and 1 share; samples 2 and 3 wait for a slot and are prefilled alone later.
  eng = Engine(model, EngineConfig(max_model_len=128, num_slots=2, page_size=8, max_prefill_batch=2,
                                   min_prefill_len=32, decode_steps=2))
  prompt = list(range(1, 21))
  sched = Scheduler(eng)
  samples = sched.add_samples(prompt, SamplingParams(n=4, max_tokens=8, temperature=1.0), seeds=[1, 2, 3, 4])
  sched.run_until_done()
  assert sched.num_forks == 1
  for k, r in enumerate(samples):
    assert r.output_ids == alone(prompt, 8, 1.0, k + 1), k
  sched.allocator.check()
  assert sched.allocator.num_free == sched.allocator.capacity
