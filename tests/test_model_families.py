"""The families beside Llama, each on tiny random models written by transformers' `save_pretrained` (and by the
`gguf` writer laid out as llama.cpp lays them out): f32 logits against transformers, greedy decoding through the
paged engine, and scoring against transformers' log-softmax."""

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
                                                            sliding_window=None, tie_word_embeddings=False)),
    "llama-attention-bias": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2,
                                                                     attention_bias=True)),
}


def make_family_model(path, family, seed=0):
  config_cls, model_cls, keys = FAMILIES[family]
  torch.manual_seed(seed)
  config = getattr(transformers, config_cls)(**COMMON, **keys)
  model = getattr(transformers, model_cls)(config).float().eval()
  with torch.no_grad():  # HF starts norms at 1 and biases at 0: random ones make the test see how they are applied
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.1 * torch.randn_like(p))
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
  assert (c.qkv_bias, c.qk_norm) == ("qwen2" in name or "bias" in name, "qwen3" in name)
  assert c.head_dim == model.config.head_dim if hasattr(model.config, "head_dim") else 64 // c.num_heads
  gen = Generator(checkpoint.build_model(c, ckpt.params, "float32"))
  tokens = rng.integers(0, V, size=(2, 40))
  np.testing.assert_allclose(gen.logits(tokens), hf_logits(model, tokens), atol=F32_TOL, rtol=0)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", *(pytest.param(f, marks=pytest.mark.slow) for f in (
    "qwen2-tied", "qwen3-bias", "llama-attention-bias"))], indirect=True)  # ~8 s of compiling each
def test_greedy_decoding_and_scores_through_the_engine_match_transformers(family, rng):
  """32 greedy tokens through the paged engine (chunked prefill with a 16-token budget) are transformers'
  `generate`; prompt scores are transformers' log-softmax."""
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
  row = prompts[1]
  scored = llm.score(token_pairs=[(row[:1], row[1:])])[0]
  ref = torch.log_softmax(torch.tensor(hf_logits(model, [row])[0]), -1).numpy()
  want = ref[np.arange(len(row) - 1), row[1:]]
  np.testing.assert_allclose(np.asarray(scored.logprobs), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name, arch", [("qwen2", "qwen2"), ("qwen3", "qwen3"), ("qwen3-bias", "qwen3"),
                                        ("mistral", "llama")])
def test_gguf_written_like_llama_cpp_matches_transformers(tmp_path, name, arch, rng):
  model = make_family_model(tmp_path / "hf", name)
  write_gguf(tmp_path / "m.gguf", model, arch=arch)
  ckpt = checkpoint.load_checkpoint(str(tmp_path / "m.gguf"))
  assert (ckpt.config.qk_norm, ckpt.config.tie_embeddings) == ("qwen3" in name, model.config.tie_word_embeddings)
  tokens = rng.integers(0, V, size=(2, 21))
  got = Generator(checkpoint.build_model(ckpt.config, ckpt.params, "float32")).logits(tokens)
  np.testing.assert_allclose(got, hf_logits(model, tokens), atol=F32_TOL, rtol=0)


@pytest.mark.parametrize("family, change, message", [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1,
               "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]}, "sliding_window=16"),
    ("mistral", {"sliding_window": 4096}, "sliding_window=4096"),
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
