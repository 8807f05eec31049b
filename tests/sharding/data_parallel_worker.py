"""Runs in a subprocess with 8 CPU devices: the serving engine's data-parallel replicas against one device. Prints one
JSON line of results."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import dataclasses
import json
import sys

import jax
import numpy as np
from flax import nnx

from jaxllm import checkpoint
from jaxllm.layers import Llama
from jaxllm.sampling import SamplingParams
from jaxllm.serving.config import EngineConfig
from jaxllm.serving.engine import Engine
from jaxllm.serving.scheduler import Scheduler
from jaxllm.sharding import make_mesh

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import TINY_8_2  # noqa: E402

MESHES = [(None, "tp"), ("data=2,model=4", "tp"), ("data=8", "dp")]


def workload(sched: Scheduler, rng):
  """Mixed requests: greedy, seeded samples (n=2), penalties, top logprobs, prompt logprobs, two sharing a prefix."""
  prompts = [rng.integers(3, 512, int(rng.integers(3, 40))).tolist() for _ in range(14)]
  prompts[5] = prompts[4][:33] + [7, 8]  # two pages in common with prompt 4
  reqs = []
  for i, p in enumerate(prompts):
    kind = i % 5
    if kind == 1:
      reqs += sched.add_samples(p, SamplingParams(n=2, temperature=0.8, max_tokens=7, ignore_eos=True),
                                seeds=[i, i + 100])
      continue
    params = [SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
              None,
              SamplingParams(temperature=0.7, seed=i, max_tokens=6, repetition_penalty=1.3, presence_penalty=0.5,
                             ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2, ignore_eos=True)][kind]
    reqs.append(sched.add(p, params))
  return reqs


def run(spec, layout, params, engine_config, seed=0):
  mesh = make_mesh(spec) if spec else None
  sched = Scheduler(Engine(checkpoint.build_model(TINY_8_2, params, "float32", mesh, layout), engine_config))
  reqs = workload(sched, np.random.default_rng(seed))
  most = [0] * len(sched.replicas)
  places = set()
  while sched.has_work():
    sched.step()
    most = [max(m, len(rep.running)) for m, rep in zip(most, sched.replicas)]
    places |= {(r.request_id, r.replica) for r in sched.running}
    sched.check_pages()
  return sched, {
      "outputs": [(r.output_ids, np.round(r.logprobs, 4).tolist(), r.top_logprobs and
                   [{str(k): round(v, 4) for k, v in d.items()} for d in r.top_logprobs],
                   r.prompt_logprobs and np.round([x for x in r.prompt_logprobs if x is not None], 4).tolist())
                  for r in reqs],
      "steps": sched.num_steps, "most_running": most, "preemptions": sched.num_preemptions,
      "pages_held": sched.num_pages_held(), "replicas": len(sched.replicas),
      "replicas_used": sorted({rep for _, rep in places}),
      "prefix_hits": sched.prefix_cache_hits,
      "state_shards": [list(x.addressable_shards[0].data.shape) for x in (sched.state.k, sched.state.tokens)]}


def placement(params):
  """Where the queue's head goes on data=2: to the replica holding its prefix while the load allows, else the least
  loaded one."""
  ec = EngineConfig(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64, num_pages=40)
  mesh = make_mesh("data=2,model=4")
  sched = Scheduler(Engine(checkpoint.build_model(TINY_8_2, params, "float32", mesh, "tp"), ec))
  rng = np.random.default_rng(1)
  prefix = rng.integers(3, 512, 48).tolist()  # 3 pages
  greedy = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731
  other = lambda: rng.integers(3, 512, 6).tolist()  # noqa: E731
  first = sched.add(prefix + [5], greedy(2))
  sched.step()
  home = first.replica
  sched.run_until_done()  # its replica now caches the prefix's 3 pages
  busy = sched.add(other(), greedy(40))
  sched.step()
  hit = sched.add(prefix + [6], greedy(2))
  sched.step()
  out = {"home": home, "busy_on": busy.replica, "hit_on": hit.replica, "hit_cached": hit.num_cached_tokens}
  sched.cancel(busy.request_id)
  sched.run_until_done()
  held = [sched.add(other(), greedy(60)) for _ in range(6)]
  sched.step()
  out["held_on"] = [r.replica for r in held]
  for r in held:  # leaves 3 running on the prefix's replica, none on the other
    if r.replica != home:
      sched.cancel(r.request_id)
  sched.step()
  out["loads"] = [len(rep.running) for rep in sched.replicas]
  far = sched.add(prefix + [10], greedy(2))
  sched.step()
  out.update(far_on=far.replica, far_cached=far.num_cached_tokens)
  for r in held:
    sched.cancel(r.request_id)
  sched.run_until_done()
  sched.check_pages()
  out["pages_held"] = sched.num_pages_held()
  out["prefix_cached_on"] = [len(rep.allocator.match(prefix + [1])) for rep in sched.replicas]
  return out


def pallas_operands(jaxpr) -> list[list[list[int]]]:
  """The operand shapes of every Pallas kernel call in a jaxpr, nested ones (scan, shard_map, cond) included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      found.append([list(v.aval.shape) for v in eqn.invars])
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found += pallas_operands(inner)
  return found


def kernels(params):
  """The Pallas kernels (interpreted on CPU) on model=8, x=2,y=4 and data=2,model=4 make one device's tokens, and
  each kernel call sees only its device's heads: the shapes inside the traced step (on an accelerator a kernel call
  is opaque to XLA's partitioner, which would otherwise gather the whole KV cache onto every device)."""
  from jaxllm.serving import engine as engine_lib

  ec = EngineConfig(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=64, num_pages=20)
  rng = np.random.default_rng(2)
  prompts = [rng.integers(3, 512, n).tolist() for n in (5, 19, 11)]
  greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
  out = {}
  # (The TPU kernel's interpreter cannot run under the replicas' shard_map on CPU: its callbacks need every mesh axis
  # manual, and XLA:CPU fails on the nested one; on a TPU the kernel is a Mosaic call like any other.)
  for spec, layout, impl in ((None, "tp", "xla"), ("model=8", "tp", "gpu-interpret"),
                             ("x=2,y=4", "2d", "gpu-interpret"), ("data=2,model=4", "tp", "gpu-interpret"),
                             ("model=8", "tp", "tpu-interpret")):
    mesh = make_mesh(spec) if spec else None
    engine = Engine(checkpoint.build_model(TINY_8_2, params, "float32", mesh, layout),
                    dataclasses.replace(ec, attention_impl=impl))
    sched = Scheduler(engine)
    reqs = [sched.add(p, greedy) for p in prompts]
    sched.run_until_done()
    batch = engine._padding_batch(4)
    traced = engine_lib._forward.trace(engine.graphdef, engine.params, jax.eval_shape(engine.init_state), batch,
                                       attention_impl=impl, mesh=engine.mesh)
    out[f"{spec or 'one'} {impl}"] = {"tokens": [r.output_ids for r in reqs],
                                      "kernel_operands": pallas_operands(traced.jaxpr.jaxpr)}
  return out


def main():
  params = jax.tree.map(np.asarray, nnx.state(Llama(TINY_8_2, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict())
  out = {"devices": len(jax.devices()), "runs": {}, "tight": {}}
  roomy = EngineConfig(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64, num_pages=40,
                       num_top_logprobs=3)
  tight = EngineConfig(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64, num_pages=9,
                       num_top_logprobs=3)  # 8 pages a replica: running sequences get preempted
  for spec, layout in MESHES:
    out["runs"][spec or "one"] = run(spec, layout, params, roomy)[1]
  for spec, layout in MESHES[:2]:
    out["tight"][spec or "one"] = run(spec, layout, params, tight)[1]
  out["placement"] = placement(params)
  out["kernels"] = kernels(params)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
