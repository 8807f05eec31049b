"""Model configuration: one frozen dataclass, built from a preset, an HF `config.json` or GGUF metadata.

Everything that changes the math of the model lives here and nowhere else. Three ways in:

    ModelConfig.from_preset("llama3.1-8b")          # configs/models.toml, exact names
    ModelConfig.from_hf_dict(json.load(...))         # allow-listed keys; unsupported math is an error
    ModelConfig.from_gguf_metadata(fields)           # llama.* keys of a GGUF file

Variants are made with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import math
import os
import tomllib
from typing import Any, Mapping

import numpy as np

ROPE_TYPES = ("default", "llama3", "linear")
MLP_ACTIVATIONS = ("silu", "gelu_tanh", "gelu")  # SwiGLU (Llama), GeGLU with tanh-approximated / exact GELU (Gemma)
NO_WINDOW = 1 << 30  # a global layer's window in `layer_windows` (the kernels' "no limit": no distance reaches it)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """RoPE frequency scaling. `llama3` is Llama-3.1's piecewise scaling; `linear` divides positions by `factor`."""

  rope_type: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ("llama3", "linear"):
      raise ValueError(f"rope_scaling.rope_type={self.rope_type!r} is not supported; supported: 'llama3', 'linear'.")
    if not self.factor > 0:
      raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}.")
    if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
      raise ValueError(
          f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must exceed low_freq_factor ({self.low_freq_factor})."
      )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """A Llama-family decoder. Shape letters: V vocab, D model width, F MLP width, L layers, N/K query/KV heads, H head dim."""

  name: str = "custom"
  vocab_size: int  # V
  d_model: int  # D
  d_ff: int  # F
  num_layers: int  # L
  num_heads: int  # N
  num_kv_heads: int  # K
  head_dim: int  # H
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  max_position_embeddings: int = 4096
  # Family variations on the Llama block (each a flag or a number, never a family name: the layers stay one path).
  qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2, and `attention_bias` models)
  o_bias: bool = False  # a bias on the output projection (`attention_bias` models; not Qwen2)
  qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3, Gemma 3)
  sliding_window: int | None = None  # local layers attend to the last `sliding_window` positions (self included)
  sliding_layers: tuple[bool, ...] | None = None  # which layers are local; None: all (when sliding_window is set)
  rope_local_theta: float | None = None  # local layers' RoPE base, unscaled (Gemma 3); None: the global RoPE
  mlp_activation: str = "silu"  # the gated MLP's activation, one of MLP_ACTIVATIONS
  norm_plus_one: bool = False  # RMSNorm scales by (1 + w), in float32 (Gemma)
  post_norms: bool = False  # RMSNorm on the attention and MLP outputs before the residual adds (Gemma 2 / 3)
  scale_embeddings: bool = False  # embeddings times sqrt(d_model) (Gemma)
  attn_scale: float | None = None  # attention logits times this; None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar)
  attn_soft_cap: float | None = None  # attention logits -> cap * tanh(logits / cap) (Gemma 2)
  final_soft_cap: float | None = None  # LM-head logits -> cap * tanh(logits / cap) (Gemma 2)

  def __post_init__(self):
    for f in ("vocab_size", "d_model", "d_ff", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "max_position_embeddings"):
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"ModelConfig.{f} must be a positive integer, got {v!r}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads}) for grouped-query attention."
      )
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}.")
    if not self.rope_theta > 0:
      raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}.")
    if not self.rms_norm_eps > 0:
      raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}.")
    if self.sliding_window is not None and (isinstance(self.sliding_window, bool) or
                                            not isinstance(self.sliding_window, int) or self.sliding_window < 1):
      raise ValueError(f"sliding_window must be None or an integer >= 1, got {self.sliding_window!r}.")
    if self.sliding_layers is not None:
      object.__setattr__(self, "sliding_layers", tuple(bool(x) for x in self.sliding_layers))
      if len(self.sliding_layers) != self.num_layers:
        raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.num_layers} layers.")
    if self.mlp_activation not in MLP_ACTIVATIONS:
      raise ValueError(f"mlp_activation={self.mlp_activation!r} is not supported; supported: {MLP_ACTIVATIONS}.")
    for f in ("attn_scale", "attn_soft_cap", "final_soft_cap", "rope_local_theta"):
      v = getattr(self, f)
      if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
        raise ValueError(f"ModelConfig.{f} must be None or a positive number, got {v!r}.")

  @property
  def q_per_kv(self) -> int:  # G
    return self.num_heads // self.num_kv_heads

  def layer_windows(self) -> np.ndarray:
    """int32 [L]: each layer's sliding window, NO_WINDOW for global layers (carried through the layer scan)."""
    local = self.sliding_layers if self.sliding_layers is not None else (True,) * self.num_layers
    w = NO_WINDOW if self.sliding_window is None else self.sliding_window
    return np.asarray([w if is_local else NO_WINDOW for is_local in local], np.int32)

  def layer_inv_freq(self) -> np.ndarray:
    """float32 [L, H/2]: each layer's RoPE inverse frequencies (Gemma 3's local layers have their own base)."""
    inv = rope_inv_freq(self)
    local = self.layer_windows() < NO_WINDOW
    if self.rope_local_theta is None or not local.any():
      return np.broadcast_to(inv, (self.num_layers, inv.size)).copy()
    local_inv = rope_inv_freq(dataclasses.replace(self, rope_theta=self.rope_local_theta, rope_scaling=None))
    return np.where(local[:, None], local_inv, inv).astype(np.float32)

  @property
  def num_params(self) -> int:
    D, F, N, K, H, V, L = (self.d_model, self.d_ff, self.num_heads, self.num_kv_heads, self.head_dim,
                           self.vocab_size, self.num_layers)
    per_layer = D * N * H * 2 + D * K * H * 2 + 3 * D * F + 2 * D * (2 if self.post_norms else 1)
    per_layer += (N * H + 2 * K * H) * self.qkv_bias + D * self.o_bias + 2 * H * self.qk_norm
    return V * D * (1 if self.tie_embeddings else 2) + L * per_layer + D

  # ---------------------------------------------------------------- presets
  @classmethod
  def from_preset(cls, name: str) -> "ModelConfig":
    presets = _presets()
    if name not in presets:
      raise ValueError(f"Unknown model preset {name!r}. Known presets: {', '.join(sorted(presets))}.")
    return presets[name]

  # ---------------------------------------------------------------- HF config.json
  @classmethod
  def from_hf_dict(cls, cfg: Mapping[str, Any], name: str = "custom") -> "ModelConfig":
    """Builds a config from an HF Llama `config.json`. Keys outside the allow-list are an error. A multimodal
    wrapper's config (`_MULTIMODAL`) gives its language model's: the text config, with the defaults published
    configs leave out filled in; its vision settings are not read (jaxllm serves text)."""
    cfg = _text_config(cfg)
    unknown = sorted(set(cfg) - _HF_HANDLED - _HF_IGNORED)
    if unknown:
      raise ValueError(
          f"HF config has keys jaxllm does not handle: {unknown}. They may change the model's math, so the model is "
          "not loaded rather than run wrongly."
      )
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in cfg]
    if missing:
      raise ValueError(f"HF config is missing required keys {missing}.")
    if cfg.get("rope_interleaved"):
      raise ValueError("HF config rope_interleaved=true is not supported; jaxllm expects HF's split-halves RoPE "
                       "layout (convert the weights, or load the GGUF).")
    model_type = cfg.get("model_type", "llama")
    if model_type not in HF_FAMILIES:
      raise ValueError(f"HF config model_type={model_type!r} is not supported; supported: {sorted(HF_FAMILIES)}.")
    family = HF_FAMILIES[model_type]
    archs = cfg.get("architectures") or [family.architecture]
    if any(a != family.architecture for a in archs):
      raise ValueError(f"HF config architectures={archs!r} is not supported for model_type={model_type!r}; only "
                       f"{family.architecture} is.")
    unknown = sorted(set(cfg) & family.refused)
    if unknown:
      raise ValueError(f"HF config keys {unknown} are not supported for model_type={model_type!r}.")
    act_key = "hidden_activation" if family.gemma else "hidden_act"
    act = cfg.get(act_key) or ("gelu_pytorch_tanh" if family.gemma else "silu")
    if act not in _HF_ACTIVATIONS:
      raise ValueError(f"HF config {act_key}={act!r} is not supported; supported: {sorted(_HF_ACTIVATIONS)}.")
    for key, ok in (("mlp_bias", False), ("use_bidirectional_attention", False)):
      if cfg.get(key) not in (None, ok):
        raise ValueError(f"HF config {key}={cfg[key]!r} is not supported; jaxllm requires {key}={ok!r}.")
    if cfg.get("pretraining_tp", 1) not in (1, None) and not isinstance(cfg.get("pretraining_tp"), int):
      raise ValueError(f"HF config pretraining_tp={cfg['pretraining_tp']!r} must be an integer.")
    if cfg.get("quantization_config"):
      raise ValueError("HF config has a quantization_config; quantized HF checkpoints are not supported.")

    num_heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    num_layers = cfg["num_hidden_layers"]
    sliding_layers = _hf_sliding_layers(cfg, model_type, num_layers)
    window = cfg.get("sliding_window") if any(sliding_layers) else None
    rope_theta, rope_scaling, rope_local_theta = _hf_rope(cfg, family)
    qpas = cfg.get("query_pre_attn_scalar")
    return cls(
        name=name,
        vocab_size=cfg["vocab_size"],
        d_model=hidden,
        d_ff=cfg["intermediate_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or hidden // num_heads,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", family.gemma)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        qkv_bias=family.qkv_bias or bool(cfg.get("attention_bias", False)),
        o_bias=bool(cfg.get("attention_bias", False)),
        qk_norm=family.qk_norm,
        sliding_window=window,
        sliding_layers=None if window is None or all(sliding_layers) else sliding_layers,
        rope_local_theta=rope_local_theta if window is not None else None,
        mlp_activation=_HF_ACTIVATIONS[act],
        norm_plus_one=family.gemma,
        post_norms=family.gemma,
        scale_embeddings=family.gemma,
        attn_scale=float(qpas) ** -0.5 if qpas else None,
        attn_soft_cap=_positive_or_none(cfg, "attn_logit_softcapping"),
        final_soft_cap=_positive_or_none(cfg, "final_logit_softcapping"),
    )

  @classmethod
  def from_hf_file(cls, path: str | os.PathLike) -> "ModelConfig":
    try:
      with open(path) as f:
        cfg = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e}).") from None
    return cls.from_hf_dict(cfg, name=os.path.basename(os.path.dirname(os.path.abspath(path))))

  # ---------------------------------------------------------------- GGUF metadata
  @classmethod
  def from_gguf_metadata(cls, meta: Mapping[str, Any], name: str = "custom") -> "ModelConfig":
    """`meta` maps GGUF keys (e.g. 'llama.block_count') to plain Python values."""
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHES:
      raise ValueError(f"GGUF general.architecture={arch!r} is not supported; supported: {sorted(GGUF_ARCHES)}.")

    def get(key, default=None):
      v = meta.get(f"{arch}.{key}", default)
      if v is None:
        raise ValueError(f"GGUF metadata is missing '{arch}.{key}'.")
      return v

    window = int(meta[f"{arch}.attention.sliding_window"]) if meta.get(f"{arch}.attention.sliding_window") else None
    d_model = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
                   or d_model // num_heads)
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ())
    if not vocab:
      raise ValueError(f"GGUF metadata has neither '{arch}.vocab_size' nor 'tokenizer.ggml.tokens'.")
    scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
    rope_scaling = None
    if scaling_type == "linear":
      rope_scaling = RopeScaling(rope_type="linear", factor=float(meta[f"{arch}.rope.scaling.factor"]))
    elif scaling_type not in ("none", None):
      raise ValueError(f"GGUF {arch}.rope.scaling.type={scaling_type!r} is not supported.")
    return cls(
        name=name,
        vocab_size=int(vocab),
        d_model=d_model,
        d_ff=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=not meta.get("_has_output_weight", True),
        max_position_embeddings=int(get("context_length", 4096)),
        qkv_bias=bool(meta.get("_has_qkv_bias", False)),
        o_bias=bool(meta.get("_has_o_bias", False)),
        qk_norm=bool(meta.get("_has_qk_norm", False)),
        sliding_window=window,
        **_gguf_gemma(meta, arch, d_model, num_heads, head_dim, int(get("block_count")), window),
    )

  # ---------------------------------------------------------------- serialization
  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    d = dict(d)
    if d.get("rope_scaling"):
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    if d.get("sliding_layers") is not None:
      d["sliding_layers"] = tuple(d["sliding_layers"])
    return cls(**d)


# GGUF architectures (llama.cpp's names; its converter writes Mistral as "llama"): which tensors a file has says
# which variations it uses (biases, q/k norms).
GGUF_ARCHES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")


def _gguf_gemma(meta: Mapping[str, Any], arch: str, d_model: int, num_heads: int, head_dim: int, num_layers: int,
                window: int | None) -> dict:
  """The Gemma 2 / 3 fields of a GGUF config, as llama.cpp runs those arches: local layers by
  `attention.sliding_window_pattern` (else its defaults: every 2nd / 6th layer global), the local RoPE base from
  `rope.freq_base_swa` (else 10000), the attention scale 1/sqrt(head_dim) except for the 27B models' 1/sqrt(d_model /
  heads) (llama.cpp's rule: query_pre_attn_scalar is not in the file), soft-caps from their keys. Norms are plain:
  llama.cpp's converter already added the 1 to their weights."""
  if arch not in ("gemma2", "gemma3"):
    return {}
  pattern = meta.get(f"{arch}.attention.sliding_window_pattern") or (2 if arch == "gemma2" else 6)
  if isinstance(pattern, (list, tuple)):
    sliding = tuple(bool(x) for x in pattern)
  else:
    sliding = tuple(i % int(pattern) < int(pattern) - 1 for i in range(num_layers))
  big = (arch, num_layers) in (("gemma2", 46), ("gemma3", 62))
  softcap = lambda key: float(meta[key]) if meta.get(key) else None  # noqa: E731
  return dict(
      sliding_layers=sliding if window is not None else None,
      rope_local_theta=float(meta.get(f"{arch}.rope.freq_base_swa") or 10000.0) if arch == "gemma3" else None,
      mlp_activation="gelu_tanh", post_norms=True, scale_embeddings=True,
      attn_scale=(d_model / num_heads if big else head_dim) ** -0.5,
      attn_soft_cap=softcap(f"{arch}.attn_logit_softcapping"),
      final_soft_cap=softcap(f"{arch}.final_logit_softcapping"),
  )


@dataclasses.dataclass(frozen=True)
class _HFFamily:
  architecture: str
  qkv_bias: bool = False  # always on, whatever `attention_bias` says
  qk_norm: bool = False
  gemma: bool = False  # (1 + w) norms, post-norms, scaled embeddings, `hidden_activation`
  refused: frozenset = frozenset()  # keys this family's config must not carry (handled for another family only)


_GEMMA_ONLY = frozenset({"query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                         "rope_local_base_freq", "sliding_window_pattern", "_sliding_window_pattern",
                         "hidden_activation"})
_QWEN_ONLY = frozenset({"use_sliding_window", "max_window_layers"})
# The HF model types jaxllm reads: each is Llama's block with the named variations. Phi-3's fused qkv / gate_up
# projections are split when the checkpoint is read (`jaxllm.checkpoint.tensors`).
HF_FAMILIES = {
    # transformers' Llama ignores `sliding_window`: refused rather than guessed at
    "llama": _HFFamily("LlamaForCausalLM", refused=_QWEN_ONLY | _GEMMA_ONLY | {"layer_types", "sliding_window"}),
    "mistral": _HFFamily("MistralForCausalLM", refused=_QWEN_ONLY | _GEMMA_ONLY | {"attention_bias"}),
    "qwen2": _HFFamily("Qwen2ForCausalLM", qkv_bias=True, refused=_GEMMA_ONLY | {"attention_bias"}),
    "qwen3": _HFFamily("Qwen3ForCausalLM", qk_norm=True, refused=_GEMMA_ONLY),
    "gemma2": _HFFamily("Gemma2ForCausalLM", gemma=True, refused=_QWEN_ONLY),
    "gemma3_text": _HFFamily("Gemma3ForCausalLM", gemma=True, qk_norm=True, refused=_QWEN_ONLY),
    "phi3": _HFFamily("Phi3ForCausalLM", refused=_QWEN_ONLY | _GEMMA_ONLY | {"attention_bias"}),
}
# Multimodal wrappers whose language model jaxllm loads: model type -> (architecture, the text model type, the text
# config's defaults for keys that published configs omit (transformers fills them from its text config class), and
# the RoPE defaults for a text config without `rope_parameters`).
_MULTIMODAL = {
    "gemma3": ("Gemma3ForConditionalGeneration", "gemma3_text", dict(
        vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072,
        rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6,
        tie_word_embeddings=True), dict(rope_theta=1_000_000.0, rope_local_base_freq=10000.0)),
}


def _text_config(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
  """The language model's config of a multimodal wrapper's `cfg` (unchanged for a text model's config)."""
  model_type = cfg.get("model_type")
  if model_type not in _MULTIMODAL:
    return cfg
  arch, text_type, defaults, rope = _MULTIMODAL[model_type]
  archs = cfg.get("architectures") or [arch]
  if any(a != arch for a in archs):
    raise ValueError(f"HF config architectures={archs!r} is not supported for model_type={model_type!r}; only "
                     f"{arch} is.")
  text = cfg.get("text_config") or {}
  if not isinstance(text, Mapping) or text.get("model_type", text_type) != text_type:
    raise ValueError(f"HF config text_config must be a {text_type!r} config for model_type={model_type!r}.")
  out = {**defaults, **({} if "rope_parameters" in text else rope), **text}
  out.update(model_type=text_type, architectures=[HF_FAMILIES[text_type].architecture])
  return out


_HF_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def _positive_or_none(cfg: Mapping[str, Any], key: str) -> float | None:
  v = cfg.get(key)
  if v is None:
    return None
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
    raise ValueError(f"HF config {key}={v!r} must be a positive number or null.")
  return float(v)


def _hf_sliding_layers(cfg: Mapping[str, Any], model_type: str, num_layers: int) -> tuple[bool, ...]:
  """Which layers use the sliding window (all False when the config has no window in use), as transformers decides:
  `layer_types` when given; else Gemma 2 alternates local / global from layer 0, Gemma 3 makes every
  `sliding_window_pattern`-th layer global; Qwen slides from layer `max_window_layers` on when `use_sliding_window`
  is set; Llama, Mistral and Phi-3 slide everywhere when `sliding_window` is set."""
  if cfg.get("sliding_window") is None:
    return (False,) * num_layers
  layer_types = cfg.get("layer_types")
  if layer_types is not None:
    if any(t not in ("full_attention", "sliding_attention") for t in layer_types) or len(layer_types) != num_layers:
      raise ValueError(f"HF config layer_types={layer_types!r} is not supported (one of 'full_attention' / "
                       f"'sliding_attention' for each of the {num_layers} layers).")
    return tuple(t == "sliding_attention" for t in layer_types)
  if model_type == "gemma2":
    return tuple(i % 2 == 0 for i in range(num_layers))
  if model_type == "gemma3_text":
    pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6
    return tuple((i + 1) % pattern != 0 for i in range(num_layers))
  if model_type in ("qwen2", "qwen3"):
    first = cfg.get("max_window_layers", 28)
    return tuple(bool(cfg.get("use_sliding_window")) and i >= first for i in range(num_layers))
  return (True,) * num_layers


def _hf_rope(cfg: Mapping[str, Any], family: _HFFamily) -> tuple[float, RopeScaling | None, float | None]:
  """(theta, scaling) of the global RoPE and the local layers' theta (None: the global RoPE) from `rope_parameters`
  (transformers >= 5; Gemma 3 keys it by layer type) or the legacy `rope_theta` / `rope_scaling` /
  `rope_local_base_freq`."""
  params = dict(cfg.get("rope_parameters") or {})
  partial = cfg.get("partial_rotary_factor", 1.0)  # older configs carry it at the top level
  if partial != 1.0:
    raise ValueError(f"HF config partial_rotary_factor={partial!r} is not supported (only 1.0: RoPE on the whole "
                     "head).")
  local = None
  if "full_attention" in params or "sliding_attention" in params:  # per layer type (Gemma 3)
    local = dict(params.get("sliding_attention") or {})
    params = dict(params.get("full_attention") or {})
  legacy = dict(cfg.get("rope_scaling") or {})
  if legacy:  # transformers < 5: its type wins over a default rope_parameters
    params.update(legacy)
    params["rope_type"] = legacy.get("rope_type", legacy.get("type", params.get("rope_type")))
    params.pop("type", None)
  theta, scaling = _rope_of(params, cfg.get("rope_theta", 10000.0))
  local_theta = cfg.get("rope_local_base_freq")
  if local is not None:
    local_theta, local_scaling = _rope_of(local, local_theta or theta)
    if local_scaling is not None:
      raise ValueError("HF config rope_parameters.sliding_attention with scaling is not supported.")
  return theta, scaling, (float(local_theta) if local_theta is not None else None)


def _rope_of(params: dict, default_theta) -> tuple[float, RopeScaling | None]:
  params = dict(params)
  theta = float(params.pop("rope_theta", default_theta))
  rope_type = params.pop("rope_type", params.pop("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"HF config rope_type={rope_type!r} is not supported; supported: {ROPE_TYPES}.")
  partial = params.pop("partial_rotary_factor", 1.0)
  if partial != 1.0:
    raise ValueError(f"HF config partial_rotary_factor={partial!r} is not supported (only 1.0: RoPE on the whole "
                     "head).")
  if rope_type == "default":
    return theta, None
  allowed = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
  extra = sorted(set(params) - allowed)
  if extra:
    raise ValueError(f"HF config rope parameters {extra} are not supported for rope_type={rope_type!r}.")
  return theta, RopeScaling(rope_type=rope_type, **{k: params[k] for k in allowed if k in params})


# Keys of the HF configs that jaxllm implements.
_HF_HANDLED = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling", "rope_parameters", "rms_norm_eps",
    "tie_word_embeddings", "max_position_embeddings", "hidden_act", "attention_bias", "mlp_bias", "model_type",
    "architectures", "pretraining_tp", "quantization_config", "rope_interleaved",
    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "hidden_activation",
    "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "rope_local_base_freq",
    "sliding_window_pattern", "_sliding_window_pattern", "use_bidirectional_attention", "partial_rotary_factor",
}
# Keys that do not change inference math (training knobs, ids the tokenizer owns, bookkeeping).
_HF_IGNORED = {
    "attention_dropout", "initializer_range", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
    "torch_dtype", "dtype", "transformers_version", "_name_or_path", "output_attentions", "output_hidden_states",
    "return_dict", "tie_encoder_decoder", "is_encoder_decoder", "chunk_size_feed_forward", "id2label", "label2id",
    "problem_type", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "is_decoder", "add_cross_attention", "cross_attention_hidden_size", "finetuning_task", "architectures_to_skip",
    "torchscript", "pruned_heads", "tf_legacy_loss", "use_bfloat16", "max_length", "min_length",
    "num_return_sequences", "temperature", "top_k", "top_p", "do_sample", "use_return_dict",
    "is_llama_config", "transformers.js_config",  # nanotron / transformers.js bookkeeping (SmolLM2 configs)
    "embd_pdrop", "resid_pdrop", "cache_implementation",  # dropout (Phi-3), HF's cache choice (Gemma)
    "original_max_position_embeddings",  # Phi-3: only its LongRoPE (refused) reads it
}


@functools.cache
def _presets() -> dict[str, ModelConfig]:
  raw = tomllib.loads(importlib.resources.files("jaxllm.configs").joinpath("models.toml").read_text())

  def resolve(n, seen=()):
    entry = dict(raw[n])
    base = entry.pop("base", None)
    if base:
      if base in seen:
        raise ValueError(f"configs/models.toml: preset {n!r} inherits from itself via {base!r}.")
      entry = {**resolve(base, seen + (n,)), **entry}
    return entry

  out = {}
  for n in raw:
    d = resolve(n)
    if "rope_scaling" in d:
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    global_every = d.pop("global_every", None)  # Gemma's pattern: every n-th layer global, the others local
    if global_every:
      d["sliding_layers"] = tuple((i + 1) % global_every != 0 for i in range(d["num_layers"]))
    out[n] = ModelConfig(name=n, **d)
  return out


def load_presets() -> dict[str, ModelConfig]:
  """All presets of configs/models.toml by name; a table's `base = "..."` inherits another's keys."""
  return dict(_presets())


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Per-pair inverse frequencies [H/2] (float32), with the config's scaling applied, as HF computes them."""
  H = config.head_dim
  inv = (1.0 / (config.rope_theta ** (np.arange(0, H, 2, dtype=np.int64).astype(np.float32) / H))).astype(np.float32)
  s = config.rope_scaling
  if s is None:
    return inv
  if s.rope_type == "linear":
    return (inv / s.factor).astype(np.float32)
  # llama3: long wavelengths divided by `factor`, short kept, the band between interpolated smoothly.
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
  smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)
