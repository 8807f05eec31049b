"""Sharded runs on 8 CPU devices (a subprocess: the device count is fixed when jax starts) equal single-device runs."""

import json
import os
import subprocess
import sys

import pytest

from jaxllm.config import ModelConfig
from jaxllm.sharding import make_mesh, parse_mesh, resolve
from jax.sharding import PartitionSpec as P


@pytest.fixture(scope="module")
def results():
  worker = os.path.join(os.path.dirname(__file__), "sharded_worker.py")
  r = subprocess.run([sys.executable, worker], capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_every_layout_matches_single_device(results):
  assert results["devices"] == 8
  assert len(results["runs"]) == 8  # 4 layouts x (8/2 and 8/8 heads)
  for run in results["runs"]:
    assert run["max_logit_diff"] <= 1e-5, run  # prefill, f32
    assert run["decode_equal"], run  # greedy decode through the sharded KV cache


def test_tp_has_two_all_reduces_per_layer_and_no_weight_gathers(results):
  hlo = results["hlo"]
  # The layer loop body appears once in the HLO: out-projection and down-projection all-reduces of [B, T, D];
  # plus one for the vocab-sharded embedding lookup.
  activations = [l for l in hlo["all-reduce"] if "f32[8,24,128]" in l]
  assert len(activations) == 3, hlo["all-reduce"]
  assert hlo["all-gather"] == [] and hlo["reduce-scatter"] == [] and hlo["all-to-all"] == []
  # Each device holds about 1/8 of the weights (norms are replicated; they are tiny).
  assert results["arg_bytes_sharded"] <= results["weight_bytes"] / 8 * 1.05, results


def test_mesh_parsing_and_errors():
  assert parse_mesh("data=2,model=4") == {"data": 2, "model": 4}
  for bad in ("model", "model=0", "model=x", "data=2,data=2", ""):
    with pytest.raises(ValueError, match="mesh"):
      parse_mesh(bad)
  with pytest.raises(ValueError, match="device"):
    make_mesh("model=3")  # one CPU device in this process


def test_resolver_drops_axes_that_do_not_divide():
  mesh = type("FakeMesh", (), {"shape": {"data": 2, "model": 4}})()
  rules = {"heads": "model", "kv_heads": "model", "batch": "data"}
  assert resolve(("embed", "heads", "head_dim"), (64, 8, 16), rules, mesh) == P(None, "model", None)
  assert resolve(("embed", "kv_heads", "head_dim"), (64, 2, 16), rules, mesh) == P(None, None, None)
  assert resolve(("batch", "heads"), (6, 8), rules, mesh) == P("data", "model")
  assert resolve(("batch", "heads"), (5, 8), rules, mesh) == P(None, "model")
  assert resolve(("heads", "kv_heads"), (8, 8), rules, mesh) == P("model", None)  # an axis is used once


def test_mesh_that_cannot_fit_the_model_is_a_clear_error():
  from jaxllm.sharding.rules import check_model_fits

  config = ModelConfig(vocab_size=512, d_model=128, d_ff=256, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16)
  mesh = type("FakeMesh", (), {"shape": {"model": 3}})()
  with pytest.raises(ValueError, match=r"'model' has size 3.*8 query heads"):
    check_model_fits(config, mesh, "tp")
