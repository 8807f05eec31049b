"""Sharded runs on 8 CPU devices (a subprocess: the device count is fixed when jax starts) equal single-device runs."""

import json
import os
import subprocess
import sys

import pytest

from jaxllm.config import ModelConfig
from jaxllm.sharding import default_layout, make_mesh, parse_mesh, resolve
from jax.sharding import PartitionSpec as P


@pytest.fixture(scope="module")
def results():
  worker = os.path.join(os.path.dirname(__file__), "sharded_worker.py")
  # 6-8 minutes alone on 2 cores under `make test`; the limit leaves room for a loaded machine (it was hit at 600 s
  # beside other CPU work).
  r = subprocess.run([sys.executable, worker], capture_output=True, text=True, timeout=1800)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_every_layout_matches_single_device(results):
  assert results["devices"] == 8
  # 4 layouts x 8/2 heads, 8/8 on tp and 2d, 6/3 heads on data=4,model=2, 8/2 heads of Qwen's shape on tp and 2d,
  # 6/2 of Qwen's shape on data=2,model=4 (query heads padded), and 8/2 of Gemma's shape (windows, soft-caps) on tp
  # and 2d
  assert len(results["runs"]) == 12
  for run in results["runs"]:
    assert run["max_logit_diff"] <= 1e-5, run  # prefill, f32
    assert run["decode_equal"], run  # greedy decode through the sharded KV cache


def test_kv_heads_fewer_than_shards_are_replicated_at_load(results):
  runs = {(r["heads"], r["kv"], r["mesh"]): r for r in results["runs"] if not r["family"]}
  # [L, D, K, H] and [L, B, S, K, H] shards as one device holds them.
  r = runs[(8, 2, "model=8")]  # 2 KV heads on 8 shards: each copied 4x, one head per device
  assert (r["placement"], r["runtime_kv_heads"], r["wk_shard"], r["cache_shard"]) == (
      "replicated", 8, [2, 128, 1, 16], [2, 8, 64, 1, 16])
  r = runs[(8, 2, "data=2,model=4")]  # 2 on 4: copied 2x; the batch also splits over data
  assert (r["placement"], r["runtime_kv_heads"], r["cache_shard"]) == ("replicated", 4, [2, 4, 64, 1, 16])
  r = runs[(6, 3, "data=4,model=2")]  # 3 on 2 (neither divides the other): lcm 6, three per device
  assert (r["placement"], r["runtime_kv_heads"], r["wk_shard"], r["cache_shard"]) == (
      "replicated", 6, [2, 96, 3, 16], [2, 2, 64, 3, 16])
  r = runs[(8, 8, "model=8")]
  assert (r["placement"], r["runtime_kv_heads"], r["cache_shard"]) == ("split", 8, [2, 8, 64, 1, 16])
  assert runs[(8, 2, "data=8")]["placement"] == "none"  # dp: weights and cache heads whole on every device
  qwen = [r for r in results["runs"] if "qkv_bias" in r["family"]]  # K/V biases copied with their heads
  assert [(r["heads"], r["mesh"], r["placement"], r["runtime_kv_heads"], r["runtime_heads"]) for r in qwen] == [
      (8, "data=2,model=4", "replicated", 4, 8), (8, "x=2,y=4", "replicated", 4, 8),
      (6, "data=2,model=4", "replicated", 4, 8)]  # 6 = 2 x 3 query heads do not split over 4: 2 x 4 zero-padded
  assert qwen[2]["wk_shard"] == [2, 96, 1, 16]  # d_model 96: one KV head copy per device


@pytest.mark.parametrize("kv", ["2", "8"])
def test_tp_has_two_all_reduces_per_layer_and_no_weight_gathers(results, kv):
  hlo = results["hlo"][kv]
  # The layer loop body appears once in the HLO: out-projection and down-projection all-reduces of [B, T, D];
  # plus one for the vocab-sharded embedding lookup.
  activations = [l for l in hlo["all-reduce"] if "f32[8,24,128]" in l]
  assert len(activations) == 3, hlo["all-reduce"]
  assert hlo["all-gather"] == [] and hlo["reduce-scatter"] == [] and hlo["all-to-all"] == []
  # Each device holds about 1/8 of the weights (norms are replicated; they are tiny). With 2 KV heads the K/V
  # projections are copied 4x at load (the runtime model is that much larger) and each device holds one copy.
  assert hlo["arg_bytes_sharded"] <= hlo["runtime_weight_bytes"] / 8 * 1.05, hlo
  extra_kv = 2 * 2 * 128 * 16 * 4 * (8 // int(kv) - 1) * 2  # wk and wv: L * D * H * f32 * extra heads
  assert hlo["runtime_weight_bytes"] == hlo["weight_bytes"] + (extra_kv if kv == "2" else 0)


def test_quantized_weights_shard_like_float_and_as_the_planner_counts(results):
  runs = {(r["quantization"], r["mesh"]): r for r in results["int8"]}
  assert len(runs) == 4
  for run in runs.values():
    assert run["wq_dtype"] == "int8" and run["decode_equal"], run
    assert run["max_logit_diff"] <= 1e-5, run
    assert run["device0_bytes"] == run["planned_bytes"], run  # what one device holds is what `jaxllm plan` says
  # wo [L, N, H, D]: per-channel scales [L, D] are replicated on tp; q8_0's [L, N, H / 32, D] split by heads
  assert runs[("int8", "model=8")]["scale_shard"] == [2, 128]
  assert runs[("q8_0", "model=8")]["scale_shard"] == [2, 1, 1, 128]
  assert runs[("q8_0", "x=2,y=4")]["scale_shard"] == [2, 2, 1, 64]


def test_orbax_restores_each_shard_onto_its_device(results):
  o = results["orbax"]  # the 8/2-head model: wq [L=2, D=128, N=8, H=16] with heads over model=8
  assert o["equal"], o
  assert (o["wq_devices"], o["wq_spec"], o["wq_shard"]) == (8, [None, None, "model", None],
                                                             [2, 128, 1, 16]), o


def _free_port() -> int:
  import socket

  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


@pytest.mark.slow  # ~40 s; the default run proves two processes with `jaxllm score` (tests/serving/test_score_job.py)
def test_two_processes_of_four_devices_match_one_device():
  """`jax.distributed.initialize` on loopback: 2 processes x 4 CPU devices, a mesh over all 8 (tp over model=8, and
  data=2 x model=4 whose data axis splits the batch across the processes) give the single-device logits and tokens."""
  import jax
  import numpy as np
  from flax import nnx

  from jaxllm import checkpoint
  from jaxllm.layers import Llama
  from tests.oracle import Generator

  sys.path.insert(0, os.path.dirname(__file__))
  from common import TINY_8_2, greedy, inputs

  worker = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, worker, str(i), port], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in (0, 1)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  runs = json.loads(outs[0][0].strip().splitlines()[-1])["runs"]

  tokens, prompts = inputs()
  params = jax.tree.map(np.asarray, nnx.state(Llama(TINY_8_2, rngs=nnx.Rngs(2)), nnx.Param).to_pure_dict())
  single = Generator(checkpoint.build_model(TINY_8_2, params, "float32"))
  ref_tokens, _ = single.generate(prompts, [6] * 8, greedy(8), lambda i, t: False, max_len=64)
  ref_logits = single.logits(tokens)
  assert [r["mesh"] for r in runs] == ["model=8", "data=2,model=4"]
  for r in runs:
    assert np.abs(np.asarray(r["logits"]) - ref_logits).max() <= 1e-5, r["mesh"]
    assert r["tokens"] == ref_tokens, r["mesh"]


def test_multi_process_flags_are_checked_before_starting():
  from jaxllm.sharding import distributed

  assert distributed.initialize() is False  # nothing asked for: a single-process run
  with pytest.raises(ValueError, match="missing num_processes, process_id"):
    distributed.initialize("127.0.0.1:1234")
  with pytest.raises(ValueError, match="not HOST:PORT"):
    distributed.initialize("127.0.0.1", 2, 0)
  with pytest.raises(ValueError, match=r"process_id must be in \[0, num_processes\)"):
    distributed.initialize("127.0.0.1:1234", 2, 2)


def test_mesh_parsing_and_errors():
  assert parse_mesh("data=2,model=4") == {"data": 2, "model": 4}
  for bad in ("model", "model=0", "model=x", "data=2,data=2", ""):
    with pytest.raises(ValueError, match="mesh"):
      parse_mesh(bad)
  with pytest.raises(ValueError, match="device"):
    make_mesh("model=3")  # one CPU device in this process
  # the layout a mesh names when none is given: `--mesh data=8` alone is 8 replicas
  assert [default_layout(parse_mesh(m)) for m in ("data=8", "model=8", "data=2,model=4", "x=2,y=4", "data=2,x=2,y=2")] \
      == ["dp", "tp", "tp", "2d", "2d"]


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
  with pytest.raises(ValueError, match=r"'model' has size 3.*256 d_ff"):  # query heads are padded, d_ff is not
    check_model_fits(config, mesh, "tp")
