"""The families beside Llama, each on tiny random models written by transformers' `save_pretrained` (and by the
`gguf` writer laid out as llama.cpp lays them out): f32 logits against transformers, greedy decoding through the
paged engine, and scoring against transformers' log-softmax.

Sliding windows are 7-9 tokens against prompts of 23-40 and 55-token generations, with 16-token pages and a 16-token
chunked-prefill budget: the window is honoured across page boundaries and across prefill chunks, and a sequence of
more than 3x the window through the paged engine equals transformers' full forward."""

import dataclasses

import numpy as np
import pytest
import torch
import transformers

from jaxllm import LLM, SamplingParams, checkpoint
from jaxllm.serving.config import EngineConfig
from tests.oracle import Generator
from tests.test_gguf_writer import write_gguf
from tests.test_hf_parity import F32_TOL, edit_config, hf_logits

V = 300
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3, max_position_embeddings=256,
              rms_norm_eps=1e-6, rope_theta=10000.0, initializer_range=0.1)  # peaked logits: no greedy near-ties
FAMILIES = {
    # name: (transformers config class, model class, config keys)
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2,
                                                      tie_word_embeddings=False)),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_attention_heads=8, num_key_value_heads=2,
                                                           tie_word_embeddings=True)),
    # head_dim 32 with 4 heads of a 64-wide model: q/k/v are 128 wide, not d_model
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                                      tie_word_embeddings=True)),
    "qwen3-bias": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                                           attention_bias=True, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                                            sliding_window=7, tie_word_embeddings=False)),
    # Gemma 2: alternating local / global layers, both soft-caps, query_pre_attn_scalar != head_dim, GeGLU, (1 + w)
    # norms, post-norms, scaled embeddings
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                                         sliding_window=7, query_pre_attn_scalar=24,
                                                         attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    # Gemma 3: q/k norms, local layers with their own RoPE base, global layers with linear RoPE scaling
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=7, num_hidden_layers=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}})),
    # Phi-3 (4k): fused qkv / gate_up projections, a window over every layer
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=9,
                                                   pad_token_id=0, eos_token_id=1, bos_token_id=2)),
    "llama-attention-bias": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2,
                                                                     attention_bias=True)),
}


def make_family_model(path, family, seed=0, **overrides):
  config_cls, model_cls, keys = FAMILIES[family]
  torch.manual_seed(seed)
  config = getattr(transformers, config_cls)(**{**COMMON, **keys, **overrides})
  model = getattr(transformers, model_cls)(config).float().eval()
  unit = 0.0 if config.model_type.startswith("gemma") else 1.0  # Gemma's norms scale by (1 + w)
  with torch.no_grad():  # HF starts norms at 1 and biases at 0: random ones make the test see how they are applied
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(unit + 0.1 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.1 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(request.param)
  return request.param, make_family_model(path, request.param), path


def test_logits_match_transformers_f32(family, rng):
  name, model, path = family
  ckpt = checkpoint.load_checkpoint(str(path), "float32")
  c = ckpt.config
  assert (c.qkv_bias, c.qk_norm) == ("qwen2" in name or "bias" in name, "qwen3" in name or "gemma3" in name)
  assert c.head_dim == model.config.head_dim if hasattr(model.config, "head_dim") else 64 // c.num_heads
  assert c.sliding_window == getattr(model.config, "sliding_window", None)
  gen = Generator(checkpoint.build_model(c, ckpt.params, "float32"))
  tokens = rng.integers(0, V, size=(2, 40))
  want = hf_logits(model, tokens)
  np.testing.assert_allclose(gen.logits(tokens), want, atol=F32_TOL, rtol=0)
  if c.sliding_window is not None:  # the window matters on these prompts: without it the logits are far off
    unwindowed = dataclasses.replace(c, sliding_window=None, sliding_layers=None)
    assert np.abs(Generator(checkpoint.build_model(unwindowed, ckpt.params, "float32")).logits(tokens)
                  - want).max() > 100 * F32_TOL


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "gemma2", "gemma3", *(
    pytest.param(f, marks=pytest.mark.slow) for f in ("qwen2-tied", "qwen3-bias", "llama-attention-bias", "phi3"))],
    indirect=True)  # ~8 s of compiling each
def test_greedy_decoding_and_scores_through_the_engine_match_transformers(family, rng):
  """32 greedy tokens through the paged engine (chunked prefill with a 16-token budget, 16-token pages) are
  transformers' `generate`; prompt scores are transformers' log-softmax."""
  name, model, path = family
  llm = LLM(str(path), engine_config=EngineConfig(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=16))
  prompts = [rng.integers(0, V, size=n).tolist() for n in (5, 23)]
  outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(temperature=0, max_tokens=32,
                                                                                ignore_eos=True))
  for prompt, out in zip(prompts, outs):
    ids = torch.tensor([prompt])
    with torch.no_grad():  # the mask given: generate would take a token equal to pad_token_id for padding
      want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                            do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert list(out.outputs[0].token_ids) == want, name
    # Each generated token's logprob, computed by the paged engine's decode steps, is transformers' full forward
    # over the whole sequence (55 tokens: past 3x every window here) at that position.
    full = prompt + want
    ref = torch.log_softmax(torch.tensor(hf_logits(model, [full])[0]), -1).numpy()
    np.testing.assert_allclose(out.outputs[0].logprobs, ref[np.arange(len(prompt) - 1, len(full) - 1), want],
                               atol=1e-4, rtol=0)
  row = prompts[1]
  scored = llm.score(token_pairs=[(row[:1], row[1:])])[0]
  ref = torch.log_softmax(torch.tensor(hf_logits(model, [row])[0]), -1).numpy()
  want = ref[np.arange(len(row) - 1), row[1:]]
  np.testing.assert_allclose(np.asarray(scored.logprobs), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name, arch", [("qwen2", "qwen2"), ("qwen3", "qwen3"), ("qwen3-bias", "qwen3"),
                                        ("mistral", "llama"), ("gemma2", "gemma2"), ("gemma3", "gemma3"),
                                        ("phi3", "phi3")])
def test_gguf_written_like_llama_cpp_matches_transformers(tmp_path, name, arch, rng):
  # GGUF has no query_pre_attn_scalar: a Gemma file is run with llama.cpp's scale, so the model uses that one
  overrides = dict(query_pre_attn_scalar=32) if arch.startswith("gemma") else {}
  model = make_family_model(tmp_path / "hf", name, **overrides)
  write_gguf(tmp_path / "m.gguf", model, arch=arch)
  ckpt = checkpoint.load_checkpoint(str(tmp_path / "m.gguf"))
  assert (ckpt.config.qk_norm, ckpt.config.tie_embeddings) == ("qwen3" in name or "gemma3" in name,
                                                              model.config.tie_word_embeddings)
  assert ckpt.config.sliding_window == getattr(model.config, "sliding_window", None)
  tokens = rng.integers(0, V, size=(2, 21))
  got = Generator(checkpoint.build_model(ckpt.config, ckpt.params, "float32")).logits(tokens)
  np.testing.assert_allclose(got, hf_logits(model, tokens), atol=F32_TOL, rtol=0)


@pytest.mark.parametrize("family, change, message", [
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma2", {"hidden_activation": "relu"}, "hidden_activation='relu'"),
    ("phi3", {"rope_scaling": {"type": "longrope", "long_factor": [1.0] * 8, "short_factor": [1.0] * 8}},
     "longrope"),
    ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75}},
     "partial_rotary_factor=0.75"),
    ("mistral", {"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]}, "layer_types"),
    ("qwen3", {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]}, "qwen3_moe"),
    ("mistral", {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}, "mixtral"),
    ("qwen2", {"architectures": ["Qwen2VLForConditionalGeneration"]}, "Qwen2VLForConditionalGeneration"),
    ("qwen3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "yarn"),
])
def test_unsupported_variants_are_refused_naming_the_key(tmp_path, family, change, message):
  make_family_model(tmp_path, family)
  edit_config(tmp_path, change)
  with pytest.raises(ValueError, match=message):
    checkpoint.load_checkpoint(str(tmp_path))


def test_qwen2_without_its_window_in_use_loads(tmp_path):
  """Published Qwen2.5 configs carry `sliding_window` with `use_sliding_window: false`: every layer is global."""
  make_family_model(tmp_path, "qwen2")
  edit_config(tmp_path, {"use_sliding_window": False, "sliding_window": 32, "max_window_layers": 2})
  assert checkpoint.load_checkpoint(str(tmp_path)).config.qkv_bias


def test_qwen_window_from_max_window_layers_matches_transformers(tmp_path, rng):
  """Qwen's own rule: with `use_sliding_window`, layers from `max_window_layers` on slide (as transformers derives)."""
  model = make_family_model(tmp_path, "qwen2")
  edit_config(tmp_path, {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}, drop=("layer_types",))
  c = checkpoint.load_checkpoint(str(tmp_path)).config
  assert (c.sliding_window, c.sliding_layers) == (6, (False, True, True))
  hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path).float().eval()
  assert hf.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
  tokens = rng.integers(0, V, size=(1, 30))
  got = Generator(checkpoint.build_model(c, checkpoint.load_checkpoint(str(tmp_path)).params, "float32")).logits(tokens)
  np.testing.assert_allclose(got, hf_logits(hf, tokens), atol=F32_TOL, rtol=0)
  assert np.abs(hf_logits(model, tokens) - hf_logits(hf, tokens)).max() > 100 * F32_TOL  # the window mattered


def test_gemma3_multimodal_checkpoint_serves_its_language_model(tmp_path, rng):
  """Gemma 3 4B-27B are published as `Gemma3ForConditionalGeneration`: model_type `gemma3`, the text model's config
  under `text_config` with transformers' defaults left out, its tensors under `language_model.model.*` (or
  `model.language_model.*` as transformers 4.52-4.5x wrote them) beside a vision tower. jaxllm loads the language
  model (logits equal transformers' text-only forward) and the processor's `chat_template.json`."""
  import json

  from safetensors.numpy import load_file, save_file

  text = {**COMMON, **FAMILIES["gemma3"][2]}
  vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=28, patch_size=14)
  torch.manual_seed(0)
  model = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
      text_config=transformers.Gemma3TextConfig(**text), vision_config=vision, mm_tokens_per_image=4)).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "language_model" in name and "norm" in name:
        p.copy_(0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path)
  tokens = rng.integers(0, V, size=(2, 30))
  want = hf_logits(model, tokens)

  def logits():
    ckpt = checkpoint.load_checkpoint(str(tmp_path), "float32")
    assert ckpt.config.qk_norm and ckpt.config.sliding_window == 7 and ckpt.config.num_layers == 4
    return Generator(checkpoint.build_model(ckpt.config, ckpt.params, "float32")).logits(tokens)

  np.testing.assert_allclose(logits(), want, atol=F32_TOL, rtol=0)
  # As published: defaults omitted (query_pre_attn_scalar, rms_norm_eps, the activation, RoPE bases; the scaling as
  # legacy `rope_scaling`), tensors of the transformers 4.52 layout.
  config = json.loads((tmp_path / "config.json").read_text())
  for key in ("query_pre_attn_scalar", "rms_norm_eps", "hidden_activation", "rope_parameters", "model_type"):
    config["text_config"].pop(key)
  config["text_config"]["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
  (tmp_path / "config.json").write_text(json.dumps(config))
  tensors = load_file(tmp_path / "model.safetensors")
  save_file({k.replace("language_model.model.", "model.language_model."): v for k, v in tensors.items()},
            tmp_path / "model.safetensors", metadata={"format": "pt"})
  np.testing.assert_allclose(logits(), want, atol=F32_TOL, rtol=0)
  # The processor's template is the tokenizer's chat template when tokenizer_config.json has none.
  from tests.test_tokenizer import _write_tokenizer_json_dir
  _write_tokenizer_json_dir(tmp_path, {"chat_template": None})
  (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{% for m in messages %}<{{ m.role }}>"
                                                                            "{{ m.content }}{% endfor %}"}))
  tok = checkpoint.load_checkpoint(str(tmp_path)).tokenizer
  assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False) == "<user>hi"
  edit_config(tmp_path, {"architectures": ["Gemma3ForCausalLM"]})
  with pytest.raises(ValueError, match="Gemma3ForCausalLM"):
    checkpoint.load_checkpoint(str(tmp_path))
