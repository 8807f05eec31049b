"""`jaxllm convert` (orbax round trip) and `jaxllm generate`, run as a user runs them: as processes."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxllm import checkpoint
from tests.oracle import Generator
from tests.test_hf_parity import hf_logits, make_hf_model


def jaxllm_cli(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "jaxllm.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_convert_round_trip_is_exact(tmp_path, rng):
  src, out = tmp_path / "hf", tmp_path / "converted"
  model = make_hf_model(src, 4, 2, False, None)
  r = jaxllm_cli("convert", f"--model={src}", f"--output={out}")
  assert r.returncode == 0, r.stderr
  original = checkpoint.load_checkpoint(str(src))
  restored = checkpoint.load_checkpoint(str(out))
  assert restored.config == original.config
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), original.params, restored.params)
  assert all(jax.tree.leaves(same))
  tokens = rng.integers(0, 300, size=(1, 12))
  got = Generator(checkpoint.build_model(restored.config, restored.params, "float32")).logits(tokens)
  np.testing.assert_allclose(got, hf_logits(model, tokens), atol=1e-4, rtol=0)
  again = jaxllm_cli("convert", f"--model={src}", f"--output={out}")
  assert again.returncode != 0 and "already exists" in again.stderr


def test_convert_and_generate_on_a_mesh(tmp_path, rng):
  """`convert --mesh` writes the shards from their devices; a load with a mesh restores them straight onto it (the
  2 KV heads on model=4, replicated 2x at load) and generates the tokens one device generates, with a float and
  with an int8 KV cache."""
  import os

  src, out = tmp_path / "hf", tmp_path / "converted"
  make_hf_model(src, 4, 2, False, None)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")

  def cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxllm.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env)

  r = cli("convert", f"--model={src}", f"--output={out}", "--mesh=model=4")
  assert r.returncode == 0, r.stderr
  prompt_ids = ",".join(str(t) for t in rng.integers(3, 300, size=9))
  single = cli("generate", f"--model={out}", f"--prompt_token_ids={prompt_ids}", "--max_tokens=8")
  sharded = cli("generate", f"--model={out}", f"--prompt_token_ids={prompt_ids}", "--max_tokens=8", "--mesh=model=4")
  assert single.returncode == 0 and sharded.returncode == 0, single.stderr + sharded.stderr
  assert sharded.stdout == single.stdout and len(single.stdout.split(",")) == 8
  # An int8 KV cache sharded by KV heads (each head's scales beside it) generates what one device's int8 cache does.
  single_q = cli("generate", f"--model={out}", f"--prompt_token_ids={prompt_ids}", "--max_tokens=8",
                 "--kv_cache_dtype=int8")
  sharded_q = cli("generate", f"--model={out}", f"--prompt_token_ids={prompt_ids}", "--max_tokens=8",
                  "--kv_cache_dtype=int8", "--mesh=model=4")
  assert single_q.returncode == 0 and sharded_q.returncode == 0, single_q.stderr + sharded_q.stderr
  assert sharded_q.stdout == single_q.stdout and len(single_q.stdout.split(",")) == 8
  bad = cli("convert", f"--model={src}", f"--output={tmp_path / 'x'}", "--mesh=model=3")
  assert bad.returncode == 1 and "3 positions but 4 devices" in bad.stderr


def test_converted_default_model_keeps_its_tokenizer(tmp_path, default_llm):
  from jaxllm import LLM, SamplingParams

  out = tmp_path / "smollm2"
  r = jaxllm_cli("convert", "--model=default", f"--output={out}")
  assert r.returncode == 0, r.stderr
  llm = LLM(str(out))
  assert llm.tokenizer.encode("Hello, world! 123") == default_llm.tokenizer.encode("Hello, world! 123")
  assert llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == \
      default_llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
  # the default (Q4_1 GGUF) converts as it loads by default: q8_0 weights, restored exactly as a direct load reads them
  assert llm.quantization == "q8_0"
  direct = checkpoint.load_checkpoint("default").params
  restored = checkpoint.load_checkpoint(str(out)).params
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), direct, restored)
  assert all(jax.tree.leaves(same))
  out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                 SamplingParams(max_tokens=16, temperature=0))[0]
  assert out.text == "The capital of France is Paris."


def test_generate_command_chat():
  r = jaxllm_cli("generate", "--model=default", "--chat", "--prompt=What is the capital of France?",
                 "--max_tokens=16")
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == "The capital of France is Paris."


@pytest.mark.parametrize("args, message", [
    (["generate", "--prompt=hi", "--dtype=float16"], "float16"),
    (["generate", "--prompt=hi", "--model=/no/such/model"], "/no/such/model"),
    (["generate", "--prompt=hi", "--max_tokens=0"], "max_tokens"),
    (["generate", "--prompt=hi", "--max_tokens=abc"], "max_tokens"),
    (["frobnicate"], "frobnicate"),
])
def test_cli_errors_name_the_bad_value(args, message):
  r = jaxllm_cli(*args)
  assert r.returncode != 0
  assert message in r.stderr
  assert "Traceback" not in r.stderr


@pytest.mark.parametrize("command,expected", [("score", ["--input", "--stride", "--mesh"]),
                                              ("generate", ["--prompt", "--max_tokens", "--mesh"]),
                                              ("serve", ["--max_num_seqs", "--port"])])
def test_subcommand_help_lists_its_flags(command, expected):
  r = jaxllm_cli(command, "--help", timeout=120)
  assert r.returncode == 0 and r.stdout.startswith(f"usage: jaxllm {command}"), r.stderr[-2000:]
  for flag in expected:
    assert f"  {flag}:" in r.stdout, (flag, r.stdout[:2000])
