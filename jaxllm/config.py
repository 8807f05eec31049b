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
  qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)

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

  @property
  def q_per_kv(self) -> int:  # G
    return self.num_heads // self.num_kv_heads

  @property
  def num_params(self) -> int:
    D, F, N, K, H, V, L = (self.d_model, self.d_ff, self.num_heads, self.num_kv_heads, self.head_dim,
                           self.vocab_size, self.num_layers)
    per_layer = D * N * H * 2 + D * K * H * 2 + 3 * D * F + 2 * D
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
    """Builds a config from an HF Llama `config.json`. Keys outside the allow-list are an error."""
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
    for key, ok in (("hidden_act", "silu"), ("mlp_bias", False)):
      if key in cfg and cfg[key] != ok:
        raise ValueError(f"HF config {key}={cfg[key]!r} is not supported; jaxllm requires {key}={ok!r}.")
    window = _hf_sliding_window(cfg, model_type)
    if window is not None:
      raise ValueError(f"HF config sliding_window={window!r} (model_type={model_type!r}) is not supported yet: "
                       "jaxllm's attention has no sliding window, so this model would be run wrongly past "
                       f"{window} tokens.")
    if cfg.get("pretraining_tp", 1) not in (1, None) and not isinstance(cfg.get("pretraining_tp"), int):
      raise ValueError(f"HF config pretraining_tp={cfg['pretraining_tp']!r} must be an integer.")
    if cfg.get("quantization_config"):
      raise ValueError("HF config has a quantization_config; quantized HF checkpoints are not supported.")

    num_heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    rope_params = dict(cfg.get("rope_parameters") or {})  # transformers >= 5
    legacy = cfg.get("rope_scaling")  # transformers < 5
    if legacy:
      rope_params.update(legacy)
    rope_theta = rope_params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = rope_params.pop("rope_type", rope_params.pop("type", "default"))
    rope_scaling = None
    if rope_type not in ROPE_TYPES:
      raise ValueError(f"HF config rope_type={rope_type!r} is not supported; supported: {ROPE_TYPES}.")
    if rope_type != "default":
      allowed = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
      extra = sorted(set(rope_params) - allowed)
      if extra:
        raise ValueError(f"HF config rope parameters {extra} are not supported for rope_type={rope_type!r}.")
      rope_scaling = RopeScaling(rope_type=rope_type, **{k: rope_params[k] for k in allowed if k in rope_params})
    return cls(
        name=name,
        vocab_size=cfg["vocab_size"],
        d_model=hidden,
        d_ff=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or hidden // num_heads,
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        qkv_bias=family.qkv_bias or bool(cfg.get("attention_bias", False)),
        o_bias=bool(cfg.get("attention_bias", False)),
        qk_norm=family.qk_norm,
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

    if meta.get(f"{arch}.attention.sliding_window"):
      raise ValueError(f"GGUF {arch}.attention.sliding_window={meta[f'{arch}.attention.sliding_window']!r} is not "
                       "supported yet: jaxllm's attention has no sliding window.")
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
    )

  # ---------------------------------------------------------------- serialization
  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    d = dict(d)
    if d.get("rope_scaling"):
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return cls(**d)


# GGUF architectures (llama.cpp's names; its converter writes Mistral as "llama"): which tensors a file has says
# which variations it uses (biases, q/k norms).
GGUF_ARCHES = ("llama", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class _HFFamily:
  architecture: str
  qkv_bias: bool = False  # always on, whatever `attention_bias` says
  qk_norm: bool = False
  refused: frozenset = frozenset()  # keys this family's config must not carry (handled for another family only)


# The HF model types jaxllm reads: each is Llama's block with the named variations.
HF_FAMILIES = {
    "llama": _HFFamily("LlamaForCausalLM",
                       refused=frozenset({"use_sliding_window", "max_window_layers", "layer_types"})),
    "mistral": _HFFamily("MistralForCausalLM", refused=frozenset({"attention_bias"})),
    "qwen2": _HFFamily("Qwen2ForCausalLM", qkv_bias=True, refused=frozenset({"attention_bias"})),
    "qwen3": _HFFamily("Qwen3ForCausalLM", qk_norm=True),
}


def _hf_sliding_window(cfg: Mapping[str, Any], model_type: str) -> int | None:
  """The window of the config's sliding-window layers, or None when every layer attends to everything. Which layers
  slide: `layer_types` when given; else, as transformers derives them for Qwen, the layers from `max_window_layers`
  on when `use_sliding_window` is set; else (Llama, Mistral) every layer when `sliding_window` is set."""
  layer_types = cfg.get("layer_types")
  if layer_types is not None:
    if any(t not in ("full_attention", "sliding_attention") for t in layer_types):
      raise ValueError(f"HF config layer_types={sorted(set(layer_types))!r} is not supported.")
    sliding = "sliding_attention" in layer_types
  elif model_type in ("qwen2", "qwen3"):
    first_sliding = cfg.get("max_window_layers", 28)
    sliding = cfg.get("use_sliding_window", False) and first_sliding < cfg.get("num_hidden_layers", 0)
  else:
    sliding = True
  return cfg.get("sliding_window") if sliding else None


# Keys of the HF configs that jaxllm implements.
_HF_HANDLED = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling", "rope_parameters", "rms_norm_eps",
    "tie_word_embeddings", "max_position_embeddings", "hidden_act", "attention_bias", "mlp_bias", "model_type",
    "architectures", "pretraining_tp", "quantization_config", "rope_interleaved",
    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
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
