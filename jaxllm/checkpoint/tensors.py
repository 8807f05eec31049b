"""Checkpoint tensors in HF Llama naming, and their conversion into jaxllm's parameter tree.

Every reader (safetensors, GGUF) is a `TensorSource`: a mapping from HF names (`model.layers.3.self_attn.q_proj.weight`)
to host numpy arrays in HF's layout (torch Linear: [out, in]) with RoPE in the split-halves layout. `params_from_hf`
turns a source into the nested dict of jaxllm params (stacked [L, ...] layer weights, einsum layouts like `wq_DNH`),
reading one tensor at a time and failing with the tensor's name when one is missing or mis-shaped.
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol

import ml_dtypes
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.layers.ops import check_quantization, quantize


class TensorSource(Protocol):
  """HF-named tensors of one checkpoint."""

  def names(self) -> Iterable[str]:
    ...

  def get(self, name: str) -> np.ndarray:
    ...


def _np_dtype(dtype) -> np.dtype:
  name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


class SplitFused:
  """A TensorSource that shows Phi-3's fused projections under Llama's names: `self_attn.qkv_proj.weight`
  [(N + 2K) * H, D] as q_proj / k_proj / v_proj (rows in that order) and `mlp.gate_up_proj.weight` [2F, D] as
  gate_proj / up_proj (gate first, as transformers' Phi3MLP chunks it). Other names pass through."""

  _PARTS = {"self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                          "self_attn.v_proj.weight"),
            "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}

  def __init__(self, source: TensorSource, config: ModelConfig):
    c = config
    self._source = source
    self._sizes = {"self_attn.qkv_proj.weight": (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim,
                                                 c.num_kv_heads * c.head_dim),
                   "mlp.gate_up_proj.weight": (c.d_ff, c.d_ff)}
    self._split = {}  # split name -> (fused name, part index)
    for name in source.names():
      prefix, _, suffix = name.partition(".layers.")
      layer, _, rest = suffix.partition(".")
      if rest in self._PARTS:
        for i, part in enumerate(self._PARTS[rest]):
          self._split[f"{prefix}.layers.{layer}.{part}"] = (name, i)

  def names(self) -> Iterable[str]:
    fused = {name for name, _ in self._split.values()}
    return [n for n in self._source.names() if n not in fused] + list(self._split)

  def get(self, name: str) -> np.ndarray:
    if name not in self._split:
      return self._source.get(name)
    fused, i = self._split[name]
    t = self._source.get(fused)
    sizes = self._sizes[fused.rpartition(".layers.")[2].partition(".")[2]]
    if t.shape[0] != sum(sizes):
      raise ValueError(f"checkpoint tensor {fused!r} has {t.shape[0]} rows, expected {sum(sizes)} "
                       f"(the sum of {sizes}) for this config.")
    start = sum(sizes[:i])
    return t[start:start + sizes[i]]


class LanguageModelOnly:
  """A TensorSource that shows a multimodal checkpoint's language model under the text model's names and hides the
  rest (vision tower, projector): transformers' `Gemma3ForConditionalGeneration` stores it as
  `language_model.model.*` (the published checkpoints) or `model.language_model.*` (transformers >= 4.52), its head
  as `language_model.lm_head.weight` or `lm_head.weight`. A text-only checkpoint passes through unchanged."""

  _PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
               ("language_model.lm_head.", "lm_head."))

  def __init__(self, source: TensorSource):
    self._source = source
    self._names = {}
    for name in source.names():
      for old, new in self._PREFIXES:
        if name.startswith(old):
          self._names[new + name[len(old):]] = name
    if self._names:
      self._names.update({n: n for n in source.names() if n.startswith("lm_head.")})

  def names(self) -> Iterable[str]:
    return list(self._names) if self._names else self._source.names()

  def get(self, name: str) -> np.ndarray:
    return self._source.get(self._names.get(name, name))


def params_from_hf(config: ModelConfig, source: TensorSource, dtype="float32", quantization: str | None = None) -> dict:
  """Builds the pure-dict params of `jaxllm.layers.Llama` (as `nnx.State.to_pure_dict()` lays them out).

  quantization="int8" / "q8_0": each attention projection and MLP tensor is quantized as it is read (one layer's
  tensor at a time in float32 on the host, never the whole model), giving int8 weights and their per-output-channel
  or per-block scales (`jaxllm.layers.ops.quantize`) under the names `Llama(..., quantization=...)` has. A GGUF
  Q8_0 tensor comes back from "q8_0" bit-exactly (its own int8 values and float16 block scales).

  Gemma's norms: `post_attention_layernorm` is the norm on the attention output there (`pre_feedforward_layernorm`
  the one before the MLP), unlike Llama where it is the pre-MLP norm; weights are kept as stored (the layer adds 1).
  """
  c = config
  D, F, N, K, H, V, L = c.d_model, c.d_ff, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size, c.num_layers
  out_dtype = _np_dtype(dtype)
  check_quantization(quantization)
  source = SplitFused(LanguageModelOnly(source), c)
  available = set(source.names())

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in available:
      raise ValueError(f"checkpoint is missing tensor {name!r} (expected shape {shape}).")
    t = source.get(name)
    if tuple(t.shape) != shape:
      raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(t.shape)}, expected {shape} for this config.")
    return t

  def stack(suffix: str, shape: tuple[int, ...], convert: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    first = convert(get(f"model.layers.0.{suffix}", shape))
    out = np.empty((L,) + first.shape, out_dtype)
    out[0] = first
    for i in range(1, L):
      out[i] = convert(get(f"model.layers.{i}.{suffix}", shape))
    return out

  def weights(into: dict, name: str, scale_name: str, suffix: str, shape, convert, reduce_axes) -> None:
    """into[name] = the stacked weight; quantized: int8, and into[scale_name] its stacked scales."""
    if quantization is None:
      into[name] = stack(suffix, shape, convert)
      return
    qs, scales = zip(*(quantize(np.asarray(convert(get(f"model.layers.{i}.{suffix}", shape)), np.float32),
                                quantization, reduce_axes, out_dtype) for i in range(L)))
    into[name], into[scale_name] = np.stack(qs), np.stack(scales)

  params = {
      "final_norm": {"weight": get("model.norm.weight", (D,)).astype(out_dtype)},
      "layers": {
          "attn_norm": {"weight": stack("input_layernorm.weight", (D,), lambda w: w)},
          "mlp_norm": {"weight": stack("pre_feedforward_layernorm.weight" if c.post_norms else
                                       "post_attention_layernorm.weight", (D,), lambda w: w)},
          "attn": {},
          "mlp": {},
      },
  }
  params["embed_VD"] = get("model.embed_tokens.weight", (V, D)).astype(out_dtype)
  attn, mlp = params["layers"]["attn"], params["layers"]["mlp"]
  weights(attn, "wq_DNH", "wq_scale", "self_attn.q_proj.weight", (N * H, D), lambda w: w.T.reshape(D, N, H), (0,))
  weights(attn, "wk_DKH", "wk_scale", "self_attn.k_proj.weight", (K * H, D), lambda w: w.T.reshape(D, K, H), (0,))
  weights(attn, "wv_DKH", "wv_scale", "self_attn.v_proj.weight", (K * H, D), lambda w: w.T.reshape(D, K, H), (0,))
  weights(attn, "wo_NHD", "wo_scale", "self_attn.o_proj.weight", (D, N * H), lambda w: w.T.reshape(N, H, D),
          (0, 1))
  weights(mlp, "w_gate_DF", "w_gate_scale", "mlp.gate_proj.weight", (F, D), lambda w: w.T, (0,))
  weights(mlp, "w_up_DF", "w_up_scale", "mlp.up_proj.weight", (F, D), lambda w: w.T, (0,))
  weights(mlp, "w_down_FD", "w_down_scale", "mlp.down_proj.weight", (D, F), lambda w: w.T, (0,))
  if c.post_norms:
    params["layers"]["post_attn_norm"] = {"weight": stack("post_attention_layernorm.weight", (D,), lambda w: w)}
    params["layers"]["post_mlp_norm"] = {"weight": stack("post_feedforward_layernorm.weight", (D,), lambda w: w)}
  if c.qkv_bias:
    attn["bq_NH"] = stack("self_attn.q_proj.bias", (N * H,), lambda b: b.reshape(N, H))
    attn["bk_KH"] = stack("self_attn.k_proj.bias", (K * H,), lambda b: b.reshape(K, H))
    attn["bv_KH"] = stack("self_attn.v_proj.bias", (K * H,), lambda b: b.reshape(K, H))
  if c.o_bias:
    attn["bo_D"] = stack("self_attn.o_proj.bias", (D,), lambda b: b)
  if c.qk_norm:
    attn["q_norm"] = {"weight": stack("self_attn.q_norm.weight", (H,), lambda w: w)}
    attn["k_norm"] = {"weight": stack("self_attn.k_norm.weight", (H,), lambda w: w)}
  if not c.tie_embeddings:
    params["lm_head_DV"] = get("lm_head.weight", (V, D)).T.astype(out_dtype)
  return params
