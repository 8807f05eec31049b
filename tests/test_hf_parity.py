"""Logit parity with transformers' LlamaForCausalLM on tiny random models written by `save_pretrained`."""

import json
import os

import numpy as np
import pytest
import torch
import transformers

from jaxllm import checkpoint
from tests.oracle import Generator

F32_TOL = 1e-4

VARIANTS = {
    # name: (heads, kv_heads, tied, rope)
    "mha": (4, 4, False, None),
    "gqa": (4, 2, False, None),
    "mqa": (4, 1, True, None),
    "gqa-tied": (8, 2, True, None),
    "llama3-rope": (4, 2, False, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "linear-rope": (4, 2, False, {"rope_type": "linear", "factor": 2.0}),
}


def make_hf_model(tmp_path, heads, kv_heads, tied, rope, dtype=torch.float32, shard=False, seed=0):
  torch.manual_seed(seed)
  kwargs = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)
  if rope is not None:
    kwargs["rope_scaling"] = dict(rope)
  config = transformers.LlamaConfig(**kwargs)
  model = transformers.LlamaForCausalLM(config).to(dtype).eval()
  with torch.no_grad():  # HF initialises norms to 1; random norms make the test sensitive to how they are applied
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path, max_shard_size="40KB" if shard else "5GB")
  return model


def edit_config(path, change: dict, drop=()) -> None:
  """The config.json in directory `path` with `change` merged in and the `drop` keys removed."""
  file = path / "config.json"
  cfg = json.loads(file.read_text())
  cfg.update(change)
  for key in drop:
    del cfg[key]
  file.write_text(json.dumps(cfg))


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers_f32(tmp_path, variant, rng):
  model = make_hf_model(tmp_path, *VARIANTS[variant])
  ckpt = checkpoint.load_checkpoint(str(tmp_path), "float32")
  gen = Generator(checkpoint.build_model(ckpt.config, ckpt.params, "float32"))
  tokens = rng.integers(0, 300, size=(2, 40))
  np.testing.assert_allclose(gen.logits(tokens), hf_logits(model, tokens), atol=F32_TOL, rtol=0)


def test_sharded_safetensors_index(tmp_path, rng):
  model = make_hf_model(tmp_path, 4, 2, False, None, shard=True)
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
  ckpt = checkpoint.load_checkpoint(str(tmp_path))
  gen = Generator(checkpoint.build_model(ckpt.config, ckpt.params, "float32"))
  tokens = rng.integers(0, 300, size=(1, 17))
  np.testing.assert_allclose(gen.logits(tokens), hf_logits(model, tokens), atol=F32_TOL, rtol=0)


def test_bfloat16_checkpoint_and_params(tmp_path, rng):
  """A bf16 safetensors file is read without torch; bf16 params track the f32 result to bf16 precision."""
  model = make_hf_model(tmp_path, 4, 2, False, None, dtype=torch.bfloat16)
  ckpt32 = checkpoint.load_checkpoint(str(tmp_path), "float32")
  ckpt16 = checkpoint.load_checkpoint(str(tmp_path), "bfloat16")
  assert ckpt16.params["embed_VD"].dtype.name == "bfloat16"
  tokens = rng.integers(0, 300, size=(2, 24))
  ref = hf_logits(model.float(), tokens)  # the bf16 weights, upcast exactly, computed in f32
  got32 = Generator(checkpoint.build_model(ckpt32.config, ckpt32.params, "float32")).logits(tokens)
  got16 = Generator(checkpoint.build_model(ckpt16.config, ckpt16.params, "bfloat16")).logits(tokens)
  np.testing.assert_allclose(got32, ref, atol=F32_TOL, rtol=0)
  scale = np.abs(ref).max()
  assert np.abs(got16 - ref).max() <= 2e-2 * scale, np.abs(got16 - ref).max()


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gemma2"}, "gemma2"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "relu"}, "hidden_act='relu'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "yarn"),
    ({"sliding_window": 128}, "sliding_window"),
    ({"model_type": "mistral"}, "mistral"),
])
def test_unsupported_hf_config_is_a_clear_error(tmp_path, change, message):
  make_hf_model(tmp_path, 4, 2, False, None)
  edit_config(tmp_path, change)
  with pytest.raises(ValueError, match=message):
    checkpoint.load_checkpoint(str(tmp_path))


def test_missing_required_config_key_is_a_clear_error(tmp_path):
  make_hf_model(tmp_path, 4, 2, False, None)
  edit_config(tmp_path, {}, drop=["num_attention_heads"])
  with pytest.raises(ValueError, match="num_attention_heads"):
    checkpoint.load_checkpoint(str(tmp_path))


def test_smollm2_style_config_keys_are_accepted(tmp_path, rng):
  """Published SmolLM2 configs (a nanotron export) carry bookkeeping keys that do not change the math."""
  model = make_hf_model(tmp_path, 4, 2, True, None)
  edit_config(tmp_path, {"is_llama_config": True, "rope_interleaved": False,
                          "transformers.js_config": {"kv_cache_dtype": {}}})
  ckpt = checkpoint.load_checkpoint(str(tmp_path))
  tokens = rng.integers(0, 300, size=(1, 9))
  got = Generator(checkpoint.build_model(ckpt.config, ckpt.params, "float32")).logits(tokens)
  np.testing.assert_allclose(got, hf_logits(model, tokens), atol=F32_TOL, rtol=0)
  edit_config(tmp_path, {"rope_interleaved": True})
  with pytest.raises(ValueError, match="rope_interleaved"):
    checkpoint.load_checkpoint(str(tmp_path))


def test_missing_tensor_and_bad_shape_name_the_tensor(tmp_path):
  from safetensors.numpy import load_file, save_file

  make_hf_model(tmp_path, 4, 2, False, None)
  f = tmp_path / "model.safetensors"
  tensors = load_file(f)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, f, metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
    checkpoint.load_checkpoint(str(tmp_path))
  tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((5, 5), np.float32)
  save_file(tensors, f, metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"up_proj.*shape \(5, 5\)"):
    checkpoint.load_checkpoint(str(tmp_path))
