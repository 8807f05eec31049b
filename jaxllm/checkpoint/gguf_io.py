"""GGUF checkpoints (llama.cpp): metadata -> ModelConfig, tensors -> HF-named float arrays.

Architectures: "llama" (Llama, and Mistral as llama.cpp converts it), "qwen2", "qwen3", "gemma2", "gemma3" (text)
and "phi3" (its fused attn_qkv / ffn_up are split like HF Phi-3's, by `jaxllm.checkpoint.tensors.SplitFused`). Gemma
files hold norm weights with llama.cpp's +1 already added, so they load as plain RMSNorm weights.

Reading a GGUF file:
  * tensors are dequantized with the `gguf` package (every type it implements: F32/F16/BF16, Q4_0/1, Q5_0/1, Q8_0,
    the K-quants, IQ types...), one tensor at a time, to float32;
  * llama.cpp's converter permutes the rows of Q and K weights of "llama" files from HF's split-halves RoPE layout to
    the interleaved one; `_unpermute` undoes it so the model sees HF layout (see `jaxllm.layers.rope`). Qwen files
    keep HF's layout (llama.cpp runs them with NEOX RoPE);
  * a `rope_freqs` tensor (Llama-3.1/3.2 files) is matched against Llama-3 scaling parameters and becomes the config's
    `rope_scaling`; a factor table that matches no known setting is an error, not a silent approximation.
"""

from __future__ import annotations

import os
import re

import numpy as np

from jaxllm.config import ModelConfig, RopeScaling, rope_inv_freq

_BIG_FIELDS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")

_MATRIX = re.compile(r"blk\.\d+\.(attn_(q|k|v|qkv|output)|ffn_(gate|up|down))\.weight$")

_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Where an architecture's tensors differ from llama's: Gemma's ffn_norm is the pre-MLP norm and it has post-norms on
# the attention and MLP outputs; Phi-3 fuses q/k/v and gate/up.
_ARCH_LAYER = {
    "gemma": {"ffn_norm.weight": "pre_feedforward_layernorm.weight",
              "post_attention_norm.weight": "post_attention_layernorm.weight",
              "post_ffw_norm.weight": "post_feedforward_layernorm.weight"},
    "phi3": {"attn_qkv.weight": "self_attn.qkv_proj.weight", "ffn_up.weight": "mlp.gate_up_proj.weight"},
}
_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def open_gguf(path: str):
  import gguf  # deferred: only GGUF users pay for the import

  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file {path} does not exist.")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader raises ValueError/struct errors/IndexError on corrupt input
    raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}).") from None


def gguf_metadata(reader) -> dict:
  """Plain-Python metadata values (the big tokenizer arrays are left out; `tokenizer.ggml.tokens` becomes its count)."""
  meta = {}
  for key, field in reader.fields.items():
    if key in _BIG_FIELDS:
      continue
    try:
      meta[key] = field.contents()
    except Exception:  # a field type this gguf version cannot decode is not needed by us
      continue
  if "tokenizer.ggml.tokens" in reader.fields:
    meta["tokenizer.ggml.tokens.count"] = len(reader.fields["tokenizer.ggml.tokens"].data)
  return meta


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's `permute`: rows (head, pair, 2) -> (head, 2, pair)."""
  return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint:
  """A GGUF file as a TensorSource in HF naming, plus its ModelConfig."""

  def __init__(self, path: str, reader=None):
    self.path = path
    self.reader = reader if reader is not None else open_gguf(path)
    self.metadata = gguf_metadata(self.reader)
    self._tensors = {}
    arch = self.metadata.get("general.architecture")
    if any(t.name.startswith("rope_factors_") for t in self.reader.tensors):
      raise ValueError(f"{path}: {arch} file with LongRoPE factors (rope_factors_long/short): "
                       "LongRoPE is not supported.")
    for t in self.reader.tensors:
      hf = _hf_name(t.name, arch)
      if hf is not None:
        self._tensors[hf] = t
    meta = dict(self.metadata)
    meta["_has_output_weight"] = "lm_head.weight" in self._tensors
    for flag, tensor in (("_has_qkv_bias", "q_proj.bias"), ("_has_o_bias", "o_proj.bias"),
                         ("_has_qk_norm", "q_norm.weight")):
      meta[flag] = f"model.layers.0.self_attn.{tensor}" in self._tensors
    self.arch = meta.get("general.architecture")
    if not meta.get(f"{self.arch}.vocab_size"):
      meta[f"{self.arch}.vocab_size"] = meta.get("tokenizer.ggml.tokens.count")
    name = os.path.splitext(os.path.basename(path))[0]
    config = ModelConfig.from_gguf_metadata(meta, name=name)
    rope_freqs = next((t for t in self.reader.tensors if t.name == "rope_freqs.weight"), None)
    if rope_freqs is not None:
      config = _with_llama3_scaling(config, self._dequantize(rope_freqs), path)
    self.config = config

  def names(self):
    return self._tensors.keys()

  def matrices_quantized(self) -> bool:
    """Whether the file stores every attention / MLP matrix block-quantized (Q4_0, Q4_1, Q8_0, the K-quants...), as
    llama.cpp's quantized files do, rather than as F32 / F16 / BF16."""
    mats = [t for t in self.reader.tensors if _MATRIX.match(t.name)]
    return bool(mats) and all(t.tensor_type.name not in ("F32", "F16", "BF16", "F64") for t in mats)

  def _dequantize(self, t) -> np.ndarray:
    import gguf

    try:
      return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    except NotImplementedError:
      raise ValueError(f"{self.path}: tensor {t.name!r} uses quantization {t.tensor_type.name}, which the installed "
                       "gguf package cannot dequantize.") from None

  def get(self, name: str) -> np.ndarray:
    t = self._tensors[name]
    w = self._dequantize(t)
    expected = tuple(int(d) for d in reversed(t.shape))
    if w.size != int(np.prod(expected)):
      raise ValueError(f"{self.path}: tensor {t.name!r} has {w.size} values, expected shape {expected}.")
    w = w.reshape(expected)
    if self.arch != "llama":  # llama.cpp permutes Q/K to its interleaved RoPE for "llama" only (NEOX RoPE elsewhere)
      return w
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
      w = _unpermute(w, self.config.num_heads)
    elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
      w = _unpermute(w, self.config.num_kv_heads)
    return w


def _hf_name(gguf_name: str, arch: str | None) -> str | None:
  if gguf_name in _GLOBAL:
    return _GLOBAL[gguf_name]
  m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
  layer = {**_LAYER, **_ARCH_LAYER.get("gemma" if arch in ("gemma2", "gemma3") else arch, {})}
  if m and m.group(2) in layer:
    return f"model.layers.{m.group(1)}.{layer[m.group(2)]}"
  return None


def _with_llama3_scaling(config: ModelConfig, factors: np.ndarray, path: str) -> ModelConfig:
  """GGUF stores Llama-3 scaling as per-frequency divisors; find the RopeScaling that produces them."""
  import dataclasses

  plain = rope_inv_freq(dataclasses.replace(config, rope_scaling=None))
  target = plain / factors.reshape(-1)
  for factor in (8.0, 16.0, 32.0, 4.0, 2.0):
    for original in (8192, 4096, 2048, 16384):
      cand = dataclasses.replace(config, rope_scaling=RopeScaling(
          rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position_embeddings=original))
      if np.allclose(rope_inv_freq(cand), target, rtol=1e-4, atol=0):
        return cand
  raise ValueError(f"{path}: its rope_freqs table matches no Llama-3 rope scaling setting jaxllm knows.")
