"""The serving engine's data-parallel replicas (`--mesh data=D,...`) on 8 CPU devices (a subprocess) against one
device: every replica runs its own sequences in its own slots and pages, and the tokens are the same."""

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def results():
  worker = os.path.join(os.path.dirname(__file__), "data_parallel_worker.py")
  r = subprocess.run([sys.executable, worker], capture_output=True, text=True, timeout=1200)  # ~1.5 min alone
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_replicas_make_the_tokens_one_device_makes(results):
  """Greedy, seeded samples (n=2), penalties, top logprobs and prompt logprobs: the same tokens and logprobs on
  data=2,model=4 and data=8 as on one device, and with pools so small that replicas preempt."""
  assert results["devices"] == 8
  one = results["runs"]["one"]["outputs"]
  for spec in ("data=2,model=4", "data=8"):
    assert results["runs"][spec]["outputs"] == one, spec
  assert results["tight"]["one"]["outputs"] == one
  assert results["tight"]["data=2,model=4"]["outputs"] == one
  assert results["tight"]["data=2,model=4"]["preemptions"] > 0


def test_each_replica_runs_its_own_sequences(results):
  runs = results["runs"]
  # 17 sequences, 4 slots a replica: one replica runs 4 at a time, two run 8 in about half the steps, eight 2-3 each.
  assert runs["one"]["most_running"] == [4]
  assert runs["data=2,model=4"]["most_running"] == [4, 4]
  assert len(runs["data=8"]["most_running"]) == 8 and max(runs["data=8"]["most_running"]) <= 3
  assert runs["data=2,model=4"]["steps"] <= runs["one"]["steps"] * 0.6
  assert runs["data=8"]["steps"] <= runs["one"]["steps"] * 0.3
  for spec, run in runs.items():
    assert run["replicas_used"] == list(range(run["replicas"])), spec
    assert run["pages_held"] == 0, spec  # every replica's pages back (its accounting checked after every step)
  # Each device holds its replica's pool of 2 layers x 40 pages (of 160 on data=2: [D * L * P, K, C, H] with 4 KV
  # heads on model=4 -> 1 each) and its 4 slots; on data=8, 80 of 640 with both KV heads.
  assert runs["data=2,model=4"]["state_shards"] == [[80, 1, 16, 16], [4]]
  assert runs["data=8"]["state_shards"] == [[80, 2, 16, 16], [4]]


def test_requests_go_where_their_prefix_is_unless_that_replica_is_much_busier(results):
  p = results["placement"]
  # The prefix's pages are on replica 0; a running sequence makes it the busier one, yet the prefix wins.
  assert (p["home"], p["busy_on"], p["hit_on"], p["hit_cached"]) == (0, 0, 0, 48)
  # Least loaded: six requests alternate between the replicas.
  assert p["held_on"] == [0, 1, 0, 1, 0, 1]
  # Three running beyond the other replica (more than half of 4 slots): the prefix no longer outweighs the load.
  assert p["loads"] == [3, 0] and (p["far_on"], p["far_cached"]) == (1, 0)
  assert p["prefix_cached_on"] == [3, 3] and p["pages_held"] == 0


def test_attention_kernels_run_on_each_devices_own_heads(results):
  """The GPU (and TPU) Pallas kernels, interpreted, on meshes that split the heads: one device's tokens, and every
  kernel call reads a [L * P, 1, C, H] block of the pages (the one KV head its device holds: 2 KV heads copied to 8
  on model=8, to 4 on y=4 and on model=4), not the whole cache."""
  runs = results["kernels"]
  want = runs["one xla"]["tokens"]
  assert runs["one xla"]["kernel_operands"] == []  # one device runs the XLA reference: no kernel call
  for name in ("model=8 gpu-interpret", "x=2,y=4 gpu-interpret", "data=2,model=4 gpu-interpret",
               "model=8 tpu-interpret"):
    assert runs[name]["tokens"] == want, name
    calls = runs[name]["kernel_operands"]
    assert calls, name
    for operands in calls:
      pages = [s for s in operands if len(s) == 4 and s[0] == 40]  # K and V pages: 2 layers x 20 pages
      assert pages == [[40, 1, 16, 16]] * 2, (name, operands)
