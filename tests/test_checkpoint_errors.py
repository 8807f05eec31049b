"""Unreadable checkpoints: one clear error each, naming the path."""

import pytest

from jaxllm import LLM, checkpoint


def test_nonexistent_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope"):
    checkpoint.load_checkpoint(str(tmp_path / "nope"))


def test_corrupt_gguf(tmp_path):
  bad = tmp_path / "model.gguf"
  bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
  with pytest.raises(ValueError, match="model.gguf"):
    checkpoint.load_checkpoint(str(bad))


def test_truncated_default_gguf(tmp_path, default_gguf):
  with open(default_gguf, "rb") as f:
    head = f.read(2_000_000)
  bad = tmp_path / "truncated.gguf"
  bad.write_bytes(head)
  with pytest.raises(ValueError, match="truncated.gguf"):
    checkpoint.load_checkpoint(str(bad))


def test_not_a_checkpoint_file(tmp_path):
  f = tmp_path / "notes.txt"
  f.write_text("hello")
  with pytest.raises(ValueError, match="notes.txt"):
    checkpoint.load_checkpoint(str(f))


def test_directory_without_config(tmp_path):
  with pytest.raises(ValueError, match="config.json"):
    checkpoint.load_checkpoint(str(tmp_path))


def test_corrupt_safetensors(tmp_path):
  (tmp_path / "config.json").write_text('{"model_type": "llama", "vocab_size": 10, "hidden_size": 8, '
                                        '"intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}')
  (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
  with pytest.raises(ValueError, match="model.safetensors"):
    checkpoint.load_checkpoint(str(tmp_path))


def test_corrupt_config_json(tmp_path):
  (tmp_path / "config.json").write_text("{oops")
  with pytest.raises(ValueError, match="config.json"):
    checkpoint.load_checkpoint(str(tmp_path))


def test_bad_dtype():
  with pytest.raises(ValueError, match="float16"):
    LLM("default", dtype="float16")


def test_auto_dtype_follows_the_backend_and_bfloat16_on_cpu_is_flagged(monkeypatch, caplog):
  """dtype='auto' (every entry point's default) is bfloat16 on an accelerator and float32 on CPU, where XLA emulates
  bfloat16 matmuls; asking bfloat16 on CPU is kept but logged, with what to use instead."""
  import jax

  assert checkpoint.resolve_dtype("auto") == "float32"
  with caplog.at_level("WARNING", logger="jaxllm"):
    assert checkpoint.resolve_dtype("bfloat16") == "bfloat16"
    assert checkpoint.resolve_dtype("float32") == "float32"
  assert [r.message for r in caplog.records if "dtype=bfloat16 on CPU" in r.message and "float32" in r.message]
  assert len(caplog.records) == 1
  with pytest.raises(ValueError, match="'auto' or one of"):
    checkpoint.resolve_dtype("float16")
  for backend in ("gpu", "tpu"):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    caplog.clear()
    assert checkpoint.resolve_dtype("auto") == "bfloat16" and checkpoint.resolve_dtype("bfloat16") == "bfloat16"
    assert not caplog.records
