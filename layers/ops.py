"""Shared numerics: every weight matmul accumulates in float32 and returns the activation dtype.

This states on every backend what TPU/GPU matrix units do anyway (bf16 inputs, f32 accumulation), so CPU runs of a
bfloat16 model see the same numerics as accelerator runs.

Weight-only int8 (`quantization="int8"`): a weight is stored as int8 beside a scale per output channel (symmetric:
w ~= q * scale, q in [-127, 127], scale = max |w| over the contraction axes / 127). `dense` feeds the int8 weight to
the dot converted to the activation dtype (XLA fuses the convert into the dot's operand, so HBM holds and streams int8)
and multiplies the f32 accumulator by the scales of its output channels, which is exact algebra: the scale does not
vary along the contracted axes.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

QUANTIZATIONS = (None, "int8")
_init = nnx.initializers.normal(0.02)


def dense(spec: str, x: jax.Array, w: jax.Array, scale: jax.Array | None = None) -> jax.Array:
  """einsum(spec, x, w) in f32, times `scale` (the output channels' int8 scales, broadcast over the trailing output
  dims) when w is quantized; returned in x's dtype."""
  if scale is None:
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(x.dtype)
  y = jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def quantize_int8(w, reduce_axes: tuple[int, ...]):
  """(q int8, scale) of a float array, scale over the axes not in `reduce_axes` (numpy in, numpy out; jax likewise).
  An all-zero channel gets scale 1 (q = 0)."""
  xp = np if isinstance(w, np.ndarray) else jnp
  w32 = w.astype(xp.float32)
  amax = xp.max(xp.abs(w32), axis=reduce_axes, keepdims=True)
  scale = xp.where(amax > 0, amax / 127.0, 1.0)
  q = xp.clip(xp.round(w32 / scale), -127, 127).astype(xp.int8)
  return q, xp.squeeze(scale, axis=reduce_axes)


def check_quantization(quantization):
  if quantization not in QUANTIZATIONS:
    raise ValueError(f"quantization={quantization!r} is not supported; choose one of {QUANTIZATIONS}.")
  return quantization


def weight(key, shape: tuple[int, ...], axes: tuple[str, ...], dtype, quantization, *, reduce_axes: tuple[int, ...]):
  """A weight Param (random init) and its scale Param (None unless quantized): int8 per output channel, the scale
  over the dims not in `reduce_axes` (the contraction dims), with those dims' logical axes."""
  w = _init(key, shape, dtype)
  if quantization is None:
    return nnx.Param(w, out_sharding=axes), None
  q, scale = quantize_int8(w, reduce_axes)
  scale_axes = tuple(a for i, a in enumerate(axes) if i not in reduce_axes)
  return nnx.Param(q, out_sharding=axes), nnx.Param(scale.astype(dtype), out_sharding=scale_axes)


def value(p):
  """A Param's array, or None for an absent (None) one."""
  return None if p is None else p[...]
