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
