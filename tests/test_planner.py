"""The capacity planner (`jaxllm.sharding.planner`, `jaxllm plan`): byte counts checked against numbers worked out here
from the architectures, not from the planner's code; mesh and layout errors; the command run as a process."""

import json
import subprocess
import sys

import pytest

from jaxllm.config import ModelConfig
from jaxllm.sharding import planner
from jaxllm.sharding.planner import parse_mesh, plan

GiB = 2**30
# llama3-70b: V, D, F, L, N, K, H
V70, D70, F70, L70, N70, K70, H70 = 128256, 8192, 28672, 80, 64, 8, 128


def llama(name):
  return ModelConfig.from_preset(name)


def test_weight_bytes_llama3_70b_bf16_on_model_8():
  m = 8
  # Split over model: wq, wo (D*N*H each), wk, wv (D*K*H each), gate, up, down (D*F each), embedding and LM head
  # (V*D each). Replicated: the two RMSNorms per layer and the final one (D each).
  split = L70 * (2 * D70 * N70 * H70 + 2 * D70 * K70 * H70 + 3 * D70 * F70) + 2 * V70 * D70
  replicated = L70 * 2 * D70 + D70
  expected = (split // m + replicated) * 2
  p = plan(llama("llama3-70b"), {"model": 8}, "bfloat16", 8192, 80 * GiB, "tp")
  assert p.weight_bytes_per_device == expected == 17_640_734_720
  assert p.weight_bytes_per_device == pytest.approx(70.6e9 * 2 / 8, rel=0.005)
  assert p.weight_bytes_total == (split + replicated) * 2
  assert p.kv_placement == "split" and p.kv_heads_per_device == 1


def test_per_host_memory_of_a_multi_host_mesh():
  """llama3-70b over 16 devices, 8 per host: each host's devices hold 8 devices' shards; an HF / GGUF load holds the
  whole model in each process's host memory before placing its shards."""
  split = L70 * (2 * D70 * N70 * H70 + 2 * D70 * K70 * H70 + 3 * D70 * F70) + 2 * V70 * D70
  replicated = L70 * 2 * D70 + D70
  p = plan(llama("llama3-70b"), {"model": 16}, "bfloat16", 8192, 80 * GiB, "tp", devices_per_host=8)
  assert (p.num_hosts, p.devices_per_host) == (2, 8)
  assert p.host_load_bytes == (split + replicated) * 2 == p.weight_bytes_total
  text = planner.format_plan(p)
  assert "Per host (8 devices each, 2 hosts)" in text and f"weights {8 * p.weight_bytes_per_device / GiB:,.2f} GiB" \
      in text and f"{(split + replicated) * 2 / GiB:,.2f} GiB: each process reads" in text
  assert "Per host" not in planner.format_plan(plan(llama("llama3-70b"), {"model": 16}, "bfloat16", 8192, 80 * GiB,
                                                     "tp"))
  with pytest.raises(ValueError, match="devices_per_host=3"):
    plan(llama("llama3-70b"), {"model": 16}, "bfloat16", 8192, 80 * GiB, "tp", devices_per_host=3)


def test_kv_bytes_per_token_llama3_8b():
  L, K, H = 32, 8, 128
  for m, heads_per_device in ((1, 8), (2, 4), (8, 1)):
    p = plan(llama("llama3-8b"), {"model": m}, "bfloat16", 8192, 80 * GiB, "tp")
    assert p.kv_bytes_per_token_total == 2 * L * K * H * 2 == 131072
    assert p.kv_heads_per_device == heads_per_device
    assert p.kv_bytes_per_token_per_device == 2 * L * heads_per_device * H * 2
  for name in ("int8", "fp8"):  # 1 B per element plus a float32 scale per token and head
    p = plan(llama("llama3-8b"), {"model": 2}, "bfloat16", 8192, 80 * GiB, "tp", kv_cache_dtype=name)
    assert (p.kv_bytes_per_token_total, p.kv_bytes_per_token_per_device) == (2 * L * K * 132, 2 * L * 4 * 132)
    assert "H=128 x 1 B + 4 B scale" in planner.format_plan(p)


def test_auto_dtype_plans_what_an_accelerator_loads():
  auto = plan(llama("llama3-8b"), {"model": 2}, "auto", 8192, 80 * GiB, "tp")
  assert auto == plan(llama("llama3-8b"), {"model": 2}, "bfloat16", 8192, 80 * GiB, "tp")
  with pytest.raises(ValueError, match="choose auto or one of"):
    plan(llama("llama3-8b"), {"model": 2}, "float16", 8192, 80 * GiB, "tp")


def test_gqa_kv_heads_replicated_when_model_axis_exceeds_them():
  # 8 KV heads on model=16: each head on 2 devices, one per device (vLLM's way).
  p = plan(llama("llama3-70b"), {"model": 16}, "bfloat16", 8192, 80 * GiB, "tp")
  assert (p.kv_placement, p.kv_heads_per_device, p.batch_shards) == ("replicated", 1, 1)
  assert p.kv_bytes_per_token_per_device == 2 * L70 * 1 * H70 * 2
  per_layer = (2 * D70 * N70 * H70 + 3 * D70 * F70) // 16 + 2 * D70 * 1 * H70 + 2 * D70  # wk, wv: 1 head each
  assert p.weight_bytes_per_device == (L70 * per_layer + 2 * V70 * D70 // 16 + D70) * 2
  assert "replicated" in planner.format_plan(p)
  # SmolLM2-135M: 3 KV heads split over model=3; its 9 query heads do not split over model=2 at all: each KV head is
  # copied 2x and its 3 query heads padded with a zero head to 4 (12 in all, 6 per device).
  p = plan(llama("smollm2-135m"), {"model": 3}, "bfloat16", 8192, 16 * GiB, "tp")
  assert (p.kv_placement, p.kv_heads_per_device) == ("split", 1)
  c = llama("smollm2-135m")
  p = plan(c, {"model": 2}, "bfloat16", 8192, 16 * GiB, "tp")
  assert (p.kv_placement, p.kv_heads_per_device) == ("replicated", 3)
  D, F, H = c.d_model, c.d_ff, c.head_dim
  per_layer = (2 * D * 12 * H + 3 * D * F) // 2 + 2 * D * 3 * H + 2 * D
  assert p.weight_bytes_per_device == (c.num_layers * per_layer + c.vocab_size * D // 2 + D) * 2
  assert any("9 query heads do not split over model=2" in n and "12 in all" in n for n in p.notes)


def test_kv_heads_that_do_not_divide_the_axis_are_replicated_to_the_lcm():
  # 12 query / 4 KV heads on model=6: 6 % 4 and 4 % 6 are both non-zero; the runtime copies each head 3x (lcm 12).
  c = ModelConfig(name="gqa-12-4", vocab_size=1200, d_model=768, d_ff=1536, num_layers=4, num_heads=12,
                  num_kv_heads=4, head_dim=64, max_position_embeddings=1024)
  p = plan(c, {"data": 2, "model": 6}, "float32", 1024, 1 * GiB, "tp", reserve=0.0)
  assert (p.kv_placement, p.kv_heads_per_device, p.batch_shards) == ("replicated", 2, 2)
  assert p.kv_bytes_per_token_per_device == 2 * 4 * 2 * 64 * 4
  per_layer = (2 * 768 * 12 * 64 + 3 * 768 * 1536) // 6 + 2 * 768 * 2 * 64 + 2 * 768  # wk, wv: 2 head copies each
  assert p.weight_bytes_per_device == (4 * per_layer + 2 * 1200 * 768 // 6 + 768) * 4
  assert "lcm" not in p.kv_note and "3x" in p.kv_note
  assert [x.op for x in p.collectives].count("all-to-all") == 0


def test_kv_cache_sharded_over_batch_as_a_what_if():
  c = ModelConfig(name="gqa-12-4", vocab_size=1200, d_model=768, d_ff=1536, num_layers=4, num_heads=12,
                  num_kv_heads=4, head_dim=64, max_position_embeddings=1024)
  p = plan(c, {"data": 2, "model": 6}, "float32", 1024, 1 * GiB, "tp", reserve=0.0, kv_placement="batch")
  assert (p.kv_placement, p.kv_heads_per_device, p.batch_shards) == ("batch", 4, 12)
  assert p.kv_bytes_per_token_per_device == p.kv_bytes_per_token_total == 2 * 4 * 4 * 64 * 4
  per_layer = (2 * 768 * 12 * 64 + 3 * 768 * 1536) // 6 + 2 * 768 * 4 * 64 + 2 * 768  # wk, wv replicated
  assert p.weight_bytes_per_device == (4 * per_layer + 2 * 1200 * 768 // 6 + 768) * 4
  assert p.max_batch % 12 == 0 and p.max_tokens == p.tokens_per_device * 12
  assert [x.op for x in p.collectives].count("all-to-all") == 2
  text = planner.format_plan(p)
  assert "over batch" in text and "what-if" in text
  # Where K divides the axis the what-if changes nothing.
  assert plan(c, {"model": 4}, "float32", 1024, GiB, "tp", kv_placement="batch").kv_placement == "split"
  with pytest.raises(ValueError, match="kv_placement 'heads'"):
    plan(c, {"model": 4}, "float32", 1024, GiB, "tp", kv_placement="heads")


def test_dp_and_unsplit_vocab():
  p = plan(llama("llama3-8b"), {"data": 4}, "bfloat16", 8192, 80 * GiB, "dp")
  assert p.weight_bytes_per_device == p.weight_bytes_total and p.collectives == ()
  assert (p.kv_heads_per_device, p.batch_shards) == (8, 4)
  assert "no per-layer collectives" in planner.format_plan(p)
  # 12 query / 4 KV heads with a 1001-row vocab on model=4: the vocab does not split, so it is replicated.
  c = ModelConfig(vocab_size=1001, d_model=64, d_ff=128, num_layers=2, num_heads=12, num_kv_heads=4, head_dim=16)
  p = plan(c, {"model": 4}, "float32", 512, GiB, "tp")
  assert p.vocab_rows_per_device == 1001
  per_layer = (2 * 64 * 12 * 16 + 2 * 64 * 4 * 16 + 3 * 64 * 128) // 4 + 2 * 64
  assert p.weight_bytes_per_device == (2 * per_layer + 2 * 1001 * 64 + 64) * 4


def test_max_batch_times_context_by_hand():
  # llama3-8b bf16 on data=2,model=2, 24 GiB per device, 10% reserve, 8192-token sequences.
  # Weights per device, in parameters: per layer wq+wo 2*4096*32*128/2 = 16,777,216, wk+wv 2*4096*8*128/2 =
  # 4,194,304, MLP 3*4096*14336/2 = 88,080,384, norms 8,192 -> 109,060,096; x 32 layers = 3,489,923,072;
  # embedding + LM head 2*128256*4096/2 = 525,336,576; final norm 4,096 -> 4,015,263,744 params = 8,030,527,488 B.
  # Reserve ceil(0.1 * 25,769,803,776) = 2,576,980,378 B; free = 25,769,803,776 - 2,576,980,378 - 8,030,527,488
  # = 15,162,295,910 B. KV per token per device: 2 * 32 layers * 4 heads * 128 * 2 B = 65,536 B
  # -> 231,358 tokens per device -> 28 sequences of 8192 per model group, x 2 data groups = 56.
  p = plan(llama("llama3-8b"), {"data": 2, "model": 2}, "bfloat16", 8192, 24 * GiB, "tp", reserve=0.1)
  assert p.weight_bytes_per_device == 8_030_527_488
  assert p.reserve_bytes == 2_576_980_378
  assert p.kv_free_bytes_per_device == 15_162_295_910
  assert p.kv_bytes_per_token_per_device == 65_536
  assert p.tokens_per_device == 231_358
  assert (p.batch_shards, p.max_batch, p.max_tokens) == (2, 56, 462_716)
  assert p.max_context_batch1 == 8192 and p.fits


def test_does_not_fit():
  p = plan(llama("llama3-70b"), {"model": 2}, "bfloat16", 8192, 40 * GiB, "tp")
  assert not p.fits and p.kv_free_bytes_per_device < 0
  assert (p.tokens_per_device, p.max_batch, p.max_tokens) == (0, 0, 0)
  assert "DOES NOT FIT" in planner.format_plan(p)


def test_tp_collectives_are_two_all_reduces_of_the_activations():
  p = plan(llama("llama3-70b"), {"model": 8}, "bfloat16", 8192, 80 * GiB, "tp")
  assert [(x.block, x.op, x.axis) for x in p.collectives] == [("attention", "all-reduce", "model"),
                                                                ("mlp", "all-reduce", "model")]
  ring = 2 * 7 / 8 * D70 * 2  # ring all-reduce: each device sends 2 (m-1)/m of the [D] row per token
  assert [x.bytes_per_token for x in p.collectives] == [ring, ring] == [28672, 28672]
  assert "3.2.1" in p.comm_model and "65,536" in p.comm_model  # the paper's 2*B*T*D per block, 2 blocks


def test_2d_layout():
  X, Y = 2, 4
  p = plan(llama("llama3-70b"), {"x": X, "y": Y}, "bfloat16", 8192, 80 * GiB, "2d")
  # Every matrix split over x*y = 8; norms split over x; KV heads over y, sequences over x.
  per_layer = (2 * D70 * N70 * H70 + 2 * D70 * K70 * H70 + 3 * D70 * F70) // 8 + 2 * D70 // X
  assert p.weight_bytes_per_device == (L70 * per_layer + 2 * V70 * D70 // 8 + D70 // X) * 2
  assert (p.kv_heads_per_device, p.batch_shards) == (2, 2)
  ops = [(x.op, x.axis) for x in p.collectives]
  assert ops.count(("all-gather", "y")) == ops.count(("reduce-scatter", "y")) == 2
  assert ops.count(("all-gather", "x")) == ops.count(("reduce-scatter", "x")) == 2
  # Paper's feed-forward block: (2*D/X + 2*F/Y) * 2 B = (8192 + 14336) * 2 = 45,056 B per token.
  assert "3.2.2" in p.comm_model and "45,056" in p.comm_model
  mlp = sum(x.bytes_per_token for x in p.collectives if x.block == "mlp")
  assert mlp == (3 / 4 * D70 / X * 2 + 1 / 2 * 3 * F70 / Y) * 2  # 2 x (AG, RS over y) + RS (gate, up) + AG over x
  with pytest.raises(ValueError, match=r"'x' has size 3.* 8192 d_model"):
    plan(llama("llama3-70b"), {"x": 3, "y": 4}, "bfloat16", 8192, 80 * GiB, "2d")


@pytest.mark.parametrize("text, bad", [
    ("", "''"), ("model", "'model'"), ("model=", "'model='"), ("=8", "'=8'"), ("model=two", "'model=two'"),
    ("model=0", "'model=0'"), ("model=-2", "'model=-2'"), ("model=8,", "''"), ("data=2;model=4", "'data=2;model=4'"),
    ("model=8,model=2", "'model' appears twice"),
])
def test_mesh_parse_errors(text, bad):
  with pytest.raises(ValueError, match=bad):
    parse_mesh(text)


def test_mesh_parse():
  assert list(parse_mesh("data=2,model=4").items()) == [("data", 2), ("model", 4)]
  assert parse_mesh(" x=2 , y=4 ") == {"x": 2, "y": 4}


def test_mesh_that_cannot_hold_the_model():
  with pytest.raises(ValueError, match=r"mesh axis 'model' has size 3, which does not divide the model's 28672 d_ff"):
    plan(llama("llama3-70b"), {"model": 3}, "bfloat16", 8192, 80 * GiB, "tp")
  with pytest.raises(ValueError, match=r"'x' is not an axis of layout 'tp'.*--layout 2d"):
    plan(llama("llama3-70b"), {"x": 2, "y": 4}, "bfloat16", 8192, 80 * GiB, "tp")
  with pytest.raises(ValueError, match=r"layout 'tp' shards 'heads' over mesh axis 'model'"):
    plan(llama("llama3-70b"), {"data": 8}, "bfloat16", 8192, 80 * GiB, "tp")
  with pytest.raises(ValueError, match="max_position_embeddings 8192"):
    plan(llama("llama3-8b"), {"model": 1}, "bfloat16", 16384, 80 * GiB, "tp")
  with pytest.raises(ValueError, match="dtype 'int4'"):
    plan(llama("llama3-8b"), {"model": 1}, "int4", 8192, 80 * GiB, "tp")
  with pytest.raises(ValueError, match="reserve"):
    plan(llama("llama3-8b"), {"model": 1}, "bfloat16", 8192, 80 * GiB, "tp", reserve=1.0)


def test_hf_config_json(tmp_path):
  cfg = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192}
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  for path in (tmp_path, tmp_path / "config.json"):
    c = planner.load_model_config(str(path))
    assert plan(c, {"model": 2}, "bfloat16", 8192, 80 * GiB, "tp").weight_bytes_per_device == 8_030_527_488
  with pytest.raises(ValueError, match="Unknown model preset 'llama-3-70b'.*HF config.json"):
    planner.load_model_config("llama-3-70b")


@pytest.mark.parametrize("name, published", [
    # total parameters on the model cards (Qwen: "Number of Parameters"; Mistral: 7.25B in its safetensors)
    ("qwen2.5-0.5b", 0.49e9), ("qwen2.5-1.5b", 1.54e9), ("qwen2.5-3b", 3.09e9), ("qwen2.5-7b", 7.61e9),
    ("qwen2.5-14b", 14.7e9), ("qwen2.5-72b", 72.7e9), ("qwen3-0.6b", 0.6e9), ("qwen3-1.7b", 1.7e9),
    ("qwen3-4b", 4.0e9), ("qwen3-8b", 8.2e9), ("qwen3-14b", 14.8e9), ("qwen3-32b", 32.8e9),
    ("mistral-7b-v0.3", 7.25e9),
    # Gemma 2 cards: 2.61B / 9.24B / 27.2B; Gemma 3 cards count the 0.42B SigLIP vision tower from 4B up (4.3B,
    # 12.2B, 27.4B), the text presets do not; Phi-3 cards: 3.8B, 14B
    ("gemma-2-2b", 2.61e9), ("gemma-2-9b", 9.24e9), ("gemma-2-27b", 27.2e9), ("gemma-3-1b", 1.0e9),
    ("gemma-3-4b", 4.3e9 - 0.42e9), ("gemma-3-12b", 12.2e9 - 0.42e9), ("gemma-3-27b", 27.4e9 - 0.42e9),
    ("phi-3-mini", 3.82e9), ("phi-3-medium", 13.96e9),
])
def test_family_presets_have_the_published_sizes(name, published):
  c = ModelConfig.from_preset(name)
  assert c.num_params == pytest.approx(published, rel=0.015)  # the cards round to 2-3 digits
  p = plan(c, {"model": 1}, "bfloat16", 4096, 1000 * GiB, "tp")
  assert p.weight_bytes_per_device == c.num_params * 2  # one device holds every parameter, biases and norms too


def test_qwen_biases_split_with_their_heads():
  c = ModelConfig.from_preset("qwen2.5-72b")  # 64 query / 8 KV heads, q/k/v biases
  D, F, N, K, H, V, L = c.d_model, c.d_ff, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size, c.num_layers
  per_layer = (2 * D * N * H + 2 * D * K * H + 3 * D * F + (N + 2 * K) * H) // 8 + 2 * D
  p = plan(c, {"model": 8}, "bfloat16", 8192, 80 * GiB, "tp")
  assert p.weight_bytes_per_device == (L * per_layer + 2 * V * D // 8 + D) * 2


def _cli(*flags):
  code = ("import sys; from jaxllm import cli; cli.COMMANDS.setdefault('plan','Capacity planner'); "
          f"sys.argv=['jaxllm','plan',*{list(flags)!r}]; cli.run()")
  return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli():
  runs = {  # started together: each process pays jax's import
      "table": _cli("--model=llama3-70b", "--mesh=model=8", "--dtype=bfloat16"),
      "json": _cli("--model=llama3-70b", "--mesh=model=8", "--max_model_len=8192", "--hbm_gib=80", "--json"),
      "bad_mesh": _cli("--model=llama3-70b", "--mesh=model=3"),
      "bad_flag": _cli("--model=llama3-70b", "--meshes=model=8"),
      "qwen": _cli("--model=qwen2.5-72b", "--mesh=model=8", "--devices_per_host=4"),
      "qwen7": _cli("--model=qwen2.5-7b", "--mesh=model=8"),
  }
  out = {k: (*p.communicate(timeout=60), p.returncode) for k, p in runs.items()}
  stdout, stderr, rc = out["table"]
  assert rc == 0, stderr
  for text in ("llama3-70b", "16.43 GiB", "40,960 B", "327,680 B", "all-reduce", "28,672", "177", "Pope et al."):
    assert text in stdout
  stdout, stderr, rc = out["json"]
  assert rc == 0, stderr
  d = json.loads(stdout)
  assert (d["weight_bytes_per_device"], d["max_batch"], d["mesh"]) == (17_640_734_720, 177, {"model": 8})
  stdout, stderr, rc = out["bad_mesh"]
  assert rc == 1 and "Traceback" not in stderr
  assert stderr.strip().count("\n") == 0 and "'model' has size 3" in stderr
  stdout, stderr, rc = out["qwen"]
  assert rc == 0 and "qwen2.5-72b (72.71B params" in stdout and "Per host (4 devices each, 2 hosts)" in stdout, stderr
  stdout, stderr, rc = out["qwen7"]  # 28 query heads over 4 KV heads: padded to 32 to split over model=8
  assert rc == 0 and "28 query heads do not split over model=8" in stdout and "32 in all" in stdout, stderr
  stdout, stderr, rc = out["bad_flag"]
  assert rc == 2 and "Traceback" not in stderr and "meshes" in stderr
