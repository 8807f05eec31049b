"""Quantized KV pages: int8 or float8_e4m3fn values with one float32 scale per (token, KV head).

    values, scales = quantize_kv(x_TKH, "int8")       # x ~= values * scales[..., None]
    x_TKH = dequantize_kv(values, scales, jnp.bfloat16)

A quantized cache holds `QuantizedPages(values [..., K, C, H], scales [..., K, C])` where a float cache holds one
[..., K, C, H] array; every ragged paged attention implementation takes the scales beside the pages
(`k_scales=`, `v_scales=`) and dequantizes what it reads inside the kernel.

Why one scale per token and head (what MaxText / JetStream's int8 KV does), not vLLM's per-tensor scale: each token's
K/V are quantized once, when the step that computes them writes them, with nothing known in advance. A per-token scale
needs no calibration and no rescaling of earlier tokens, and an outlier token costs precision only for itself. The
scale adds 4 bytes per token and head: int8 K/V with H = 64 take (64 + 4) / 128 = 0.53x of bfloat16, with H = 128
0.52x.

  int8  symmetric: scale = max|x| / 127, values = round(x / scale) in [-127, 127];
  fp8   float8_e4m3fn (3 mantissa bits, |x| <= 448): scale = max|x| / 448, values = x / scale rounded to e4m3.
A row of zeros gets scale 0 (and values 0), so dequantization is exact there.
"""

import jax
import jax.numpy as jnp
from flax import struct

KV_CACHE_DTYPES = {"int8": jnp.dtype(jnp.int8), "fp8": jnp.dtype(jnp.float8_e4m3fn)}
QUANTIZED_DTYPES = tuple(KV_CACHE_DTYPES.values())
_QMAX = {jnp.dtype(jnp.int8): 127.0, jnp.dtype(jnp.float8_e4m3fn): 448.0}
SCALE_DTYPE = jnp.dtype(jnp.float32)


@struct.dataclass
class QuantizedPages:
  """A quantized KV pool: values [..., K, C, H] (int8 or float8_e4m3fn) and scales [..., K, C] float32."""

  values: jax.Array
  scales: jax.Array


def is_quantized(dtype) -> bool:
  return jnp.dtype(dtype) in QUANTIZED_DTYPES


def kv_cache_dtype(name: str, model_dtype):
  """The dtype of the KV values for `--kv_cache_dtype name`: "auto" is the model's dtype; "int8", "fp8"."""
  if name == "auto":
    return jnp.dtype(model_dtype)
  if name not in KV_CACHE_DTYPES:
    raise ValueError(f"kv_cache_dtype={name!r} is not supported; choose auto, {', '.join(KV_CACHE_DTYPES)}.")
  return KV_CACHE_DTYPES[name]


def bytes_per_token_head(head_dim: int, dtype) -> int:
  """Bytes one token of one KV head takes in K (or V): its values, plus its scale when quantized."""
  dtype = jnp.dtype(dtype)
  return head_dim * dtype.itemsize + (SCALE_DTYPE.itemsize if is_quantized(dtype) else 0)


def quantize_kv(x, dtype) -> tuple[jax.Array, jax.Array]:
  """x [..., H] float -> (values [..., H] in dtype, scales [...] float32), one scale per vector over H."""
  dtype = jnp.dtype(dtype)
  qmax = _QMAX[dtype]
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1) / qmax
  y = jnp.clip(x / jnp.where(scale > 0, scale, 1.0)[..., None], -qmax, qmax)
  values = jnp.round(y).astype(dtype) if dtype == jnp.int8 else y.astype(dtype)
  return values, scale.astype(SCALE_DTYPE)


def dequantize_kv(values, scales, dtype):
  """values [..., H] * scales [...] -> [..., H] in dtype (the product in float32)."""
  return (values.astype(jnp.float32) * scales.astype(jnp.float32)[..., None]).astype(dtype)
